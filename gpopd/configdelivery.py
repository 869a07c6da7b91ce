"""The ``delivery:`` and ``routes:`` sections: where an account's messages go.

Each destination kind is a model picked by its ``type`` key; ``delivery``
takes one destination or a list of them, and each route sends the messages
whose header matches to its own ``delivery``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gpopd.configtypes import (
    LOOPBACK,
    ConfigModel,
    Host,
    Port,
    ReadableFile,
    Text,
    Timeout,
    TlsMode,
)
from gpopd.secrets import AbsolutePath, Secret


def _check_header_name(value: str) -> str:
    # RFC 5322 field names: printable ASCII but the colon.
    if not 0 < len(value) <= 76 or any(not 33 <= ord(ch) <= 126 or ch == ":" for ch in value):
        raise PydanticCustomError(
            "header_name", "must be a header field name such as Subject or X-Original-To"
        )
    return value


HeaderField = Annotated[str, AfterValidator(_check_header_name)]


class MaildirDelivery(ConfigModel):
    """Deliver into a Maildir (``tmp``/``new``/``cur`` are created if missing)."""

    type: Literal["maildir"]
    path: AbsolutePath


class MboxDelivery(ConfigModel):
    """Append to an mbox file (mboxrd), locked with fcntl and a dotlock."""

    type: Literal["mbox"]
    path: AbsolutePath


class MdaDelivery(ConfigModel):
    """Pipe each message into a command (no shell): exit 0 delivered, 75 retry later."""

    type: Literal["mda"]
    command: Annotated[tuple[Text, ...], Field(min_length=1)]
    timeout: Timeout = 300.0


class SmtpDelivery(ConfigModel):
    """Forward each message to an SMTP relay (aiosmtplib).

    ``tls`` defaults to ``starttls`` (then mandatory) except for a relay on
    the loopback interface, where plain SMTP is the usual setup.
    """

    type: Literal["smtp"]
    host: Host
    port: Port | None = None
    tls: TlsMode | None = None
    ca_file: ReadableFile | None = None
    username: Text | None = None
    password: Secret | None = None
    allow_plaintext: bool = False
    recipient: Annotated[tuple[Text, ...], Field(min_length=1)]
    # Envelope recipients from this header of each message, else ``recipient``.
    recipient_header: HeaderField | None = None
    sender: Text | None = None
    timeout: Timeout = 60.0

    @property
    def effective_tls(self) -> TlsMode:
        if self.tls is not None:
            return self.tls
        return "none" if self.host.lower() in LOOPBACK else "starttls"

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 465 if self.effective_tls == "implicit" else 25

    @model_validator(mode="after")
    def _credentials_need_tls(self) -> Self:
        if (self.username is None) != (self.password is None):
            raise PydanticCustomError(
                "smtp_credentials", "username and password go together", {"gpopd_key": "password"}
            )
        if self.password is not None and self.effective_tls == "none" and not self.allow_plaintext:
            raise PydanticCustomError(
                "plaintext_refused",
                "SMTP AUTH without TLS sends the password unencrypted; "
                "set tls: starttls or implicit, or allow_plaintext: true",
                {"gpopd_key": "tls"},
            )
        return self


class LmtpDelivery(ConfigModel):
    """Deliver over LMTP (RFC 2033) by TCP (``host``/``port``) or a Unix ``socket``."""

    type: Literal["lmtp"]
    host: Host | None = None
    port: Port = 24
    socket: AbsolutePath | None = None
    recipient: Annotated[tuple[Text, ...], Field(min_length=1)]
    # Envelope recipients from this header of each message, else ``recipient``.
    recipient_header: HeaderField | None = None
    sender: Text | None = None
    timeout: Timeout = 60.0

    @model_validator(mode="after")
    def _one_address(self) -> Self:
        if (self.host is None) == (self.socket is None):
            raise PydanticCustomError(
                "lmtp_address", "give exactly one of host or socket", {"gpopd_key": "host"}
            )
        return self


# New destinations join this union; ``type`` picks the model.
Delivery = Annotated[
    MaildirDelivery | MboxDelivery | MdaDelivery | SmtpDelivery | LmtpDelivery,
    Field(discriminator="type"),
]
MAX_DESTINATIONS = 16
MAX_ROUTES = 64


def _one_or_many(value: object) -> str:
    return "many" if isinstance(value, list | tuple) else "one"


def _one_or_list(value: object) -> object:
    # Checked here, not in the union's branches, so that an error names
    # ``delivery`` itself; the length before the items, as pydantic would
    # count only the valid ones.
    if isinstance(value, list | tuple):
        if not 0 < len(value) <= MAX_DESTINATIONS:
            raise PydanticCustomError(
                "delivery_count", f"must list between 1 and {MAX_DESTINATIONS} destinations"
            )
    elif not isinstance(value, Mapping | BaseModel):
        raise PydanticCustomError(
            "model_type", "Input should be a valid dictionary or object to extract fields from"
        )
    return value


# ``delivery:`` is one destination or a list of them, every one of which
# must accept each message (gpopd.delivery.fanout).
Deliveries = Annotated[
    Annotated[Delivery, Tag("one")] | Annotated[tuple[Delivery, ...], Tag("many")],
    Discriminator(_one_or_many),
    BeforeValidator(_one_or_list),
]


def _compile_pattern(value: object) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    if not isinstance(value, str) or not value:
        raise PydanticCustomError("pattern", "must be a regular expression")
    try:
        return re.compile(value)
    except re.error as exc:
        raise PydanticCustomError(
            "pattern", "is not a valid regular expression: {reason}", {"reason": str(exc)}
        ) from None


class Route(ConfigModel):
    """A rule of ``routes:``: messages whose ``header`` matches go to ``delivery``."""

    header: HeaderField
    matches: Annotated[re.Pattern[str], BeforeValidator(_compile_pattern)] | None = None
    contains: Text | None = None
    delivery: Deliveries

    @model_validator(mode="after")
    def _one_test(self) -> Self:
        if (self.matches is None) == (self.contains is None):
            raise PydanticCustomError(
                "route_test", "give exactly one of matches or contains", {"gpopd_key": "matches"}
            )
        return self


Routes = Annotated[tuple[Route, ...], Field(max_length=MAX_ROUTES)]
