"""The configuration: frozen pydantic models and the loader that fills them.

``load_config`` reads one YAML file (YAML 1.2: ``no`` is a string, ``0123`` is
the number 123), layers ``GPOPD_*`` environment variables over it through
pydantic-settings' own env source, validates everything at once and raises a
single ``ConfigError`` listing every problem as ``FILE:LINE:COL: key.path:
message``.  Line numbers come from ruamel.yaml's node marks, because the YAML
loader built into pydantic-settings has none and accepts duplicate keys.

Durations are stored as ``float`` seconds (what asyncio takes); sizes as
``int`` bytes with K/M/G meaning powers of 1024.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from gpopd import gmail
from gpopd.errors import ConfigError
from gpopd.secrets import (
    AbsolutePath,
    EnvironmentSecret,
    Secret,
    SecretContext,
    UnreadableFile,
    read_regular_file,
    secret_context,
)
from gpopd.yamlsource import (
    PER_ACCOUNT_KEYS,
    YamlConfigSource,
    merges_with,
)

DEFAULT_CONFIG_PATH = Path("/etc/gpopd/gpopd.yaml")
CONFIG_PATH_VAR = "GPOPD_CONFIG"
ENV_PREFIX = "GPOPD_"
ENV_NESTED_DELIMITER = "__"
MAX_CONFIG_BYTES = 1024 * 1024

ACCOUNT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
# Fields of type ``Secret``: an inline value for them from the environment is
# exempt from the file-permission rule.
SECRET_KEYS = frozenset({"password", "client_secret", "refresh_token", "access_token"})

TlsMode = Literal["implicit", "starttls", "none"]
AuthMethod = Literal["auto", "user", "plain", "xoauth2", "oauthbearer"]
PASSWORD_AUTH_METHODS = frozenset({"auto", "user", "plain"})
OAUTH_AUTH_METHODS = frozenset({"xoauth2", "oauthbearer"})

MAX_DURATION = 3650 * 86400.0
MAX_SIZE = 1024**4
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def _format_seconds(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= _DURATION_UNITS[unit] and seconds % _DURATION_UNITS[unit] == 0:
            return f"{seconds / _DURATION_UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def parse_duration(value: object) -> float:
    """Seconds from an int/float or a text such as ``"90s"``, ``"10m"``, ``"1h30m"``."""
    bad = PydanticCustomError(
        "duration", "must be a duration such as 90s, 10m, 1h30m, 2d or a number of seconds"
    )
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise bad
    if isinstance(value, int):
        if value > MAX_DURATION:  # before float(): a huge int would overflow
            raise PydanticCustomError("duration_max", f"must be at most {MAX_DURATION / 86400:g}d")
        return float(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise bad
        return value
    text = "".join(value.split())
    if _NUMBER.fullmatch(text):
        return float(text)
    if not text or _DURATION_PART.sub("", text):
        raise bad
    return float(sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text)))


def _duration(minimum: float, *, inclusive: bool = True) -> Callable[[object], float]:
    def check(value: object) -> float:
        seconds = parse_duration(value)
        if seconds < minimum or (not inclusive and seconds == minimum):
            word = "at least" if inclusive else "more than"
            shown = _format_seconds(minimum) if minimum else "0"
            raise PydanticCustomError("duration_min", f"must be {word} {shown}")
        if seconds > MAX_DURATION:
            raise PydanticCustomError("duration_max", f"must be at most {MAX_DURATION / 86400:g}d")
        return seconds

    return check


def parse_size(value: object) -> int:
    """Bytes from an int or a text such as ``"512KB"``, ``"50MB"``, ``"1GiB"`` (1K = 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        number, prefix, suffix = match.groups()
        if suffix.lower() == "i" or (suffix.lower() == "ib" and not prefix):
            raise PydanticCustomError("size", "must be a size such as 512KB, 50MB, 1GB or bytes")
        size = int(float(number) * 1024 ** _SIZE_POWERS[prefix.lower()])
    else:
        raise PydanticCustomError("size", "must be a size such as 512KB, 50MB, 1GB or bytes")
    if size < 1:
        raise PydanticCustomError("size_min", "must be at least 1 byte")
    if size > MAX_SIZE:
        raise PydanticCustomError("size_max", "must be at most 1TB")
    return size


def _check_account_name(name: str) -> str:
    if not ACCOUNT_NAME_RE.fullmatch(name):
        raise PydanticCustomError(
            "account_name",
            "account names start with a letter or digit and contain only letters, digits "
            "and . _ @ - (at most 64 characters)",
        )
    return name


def _check_text(value: str) -> str:
    if not value:
        raise PydanticCustomError("text_empty", "must not be empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise PydanticCustomError("text_control", "must not contain control characters")
    return value


def _check_host(value: str) -> str:
    _check_text(value)
    if any(ch.isspace() for ch in value) or len(value) > 253:
        raise PydanticCustomError("host", "must be a host name or an IP address")
    return value


def _check_readable(path: Path) -> Path:
    try:
        read_regular_file(path, MAX_CONFIG_BYTES)
    except UnreadableFile as exc:
        raise PydanticCustomError(
            "unreadable", "cannot read {path}: {reason}", {"path": str(path), "reason": exc.reason}
        ) from None
    return path


AccountName = Annotated[str, AfterValidator(_check_account_name)]
Text = Annotated[str, AfterValidator(_check_text)]
Host = Annotated[str, AfterValidator(_check_host)]
Port = Annotated[int, Field(ge=1, le=65535)]
Count = Annotated[int, Field(ge=1)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]
ReadableFile = Annotated[AbsolutePath, AfterValidator(_check_readable)]
PollInterval = Annotated[float, BeforeValidator(_duration(1.0))]
Timeout = Annotated[float, BeforeValidator(_duration(0.0, inclusive=False))]


# Trace headers gpopd may prepend to each message, on request only.
HeaderName = Literal["received", "delivered_to", "uidl", "key"]
AddHeaders = Annotated[tuple[HeaderName, ...], Field(max_length=4)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class MaildirDelivery(_Model):
    """Deliver into a Maildir (``tmp``/``new``/``cur`` are created if missing)."""

    type: Literal["maildir"]
    path: AbsolutePath


class MboxDelivery(_Model):
    """Append to an mbox file (mboxrd), locked with fcntl and a dotlock."""

    type: Literal["mbox"]
    path: AbsolutePath


class MdaDelivery(_Model):
    """Pipe each message into a command (no shell): exit 0 delivered, 75 retry later."""

    type: Literal["mda"]
    command: Annotated[tuple[Text, ...], Field(min_length=1)]
    timeout: Timeout = 300.0


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def _check_header_name(value: str) -> str:
    # RFC 5322 field names: printable ASCII but the colon.
    if not 0 < len(value) <= 76 or any(not 33 <= ord(ch) <= 126 or ch == ":" for ch in value):
        raise PydanticCustomError(
            "header_name", "must be a header field name such as Subject or X-Original-To"
        )
    return value


HeaderField = Annotated[str, AfterValidator(_check_header_name)]


class SmtpDelivery(_Model):
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
        return "none" if self.host.lower() in _LOOPBACK else "starttls"

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


class LmtpDelivery(_Model):
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


class Route(_Model):
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


class _ExplicitName(str):
    """A ``name`` the user wrote inside an account, where only the key may name it."""

    __slots__ = ()


def _name_from_key(value: object) -> object:
    if isinstance(value, _ExplicitName):
        raise PydanticCustomError(
            "name_from_key", "is taken from the account's key under accounts; remove it"
        )
    return value


def _check_endpoint(value: str) -> str:
    _check_text(value)
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise PydanticCustomError("url", "must be a URL such as https://host/path") from None
    if parts.scheme not in ("https", "http") or not host or parts.fragment:
        raise PydanticCustomError("url", "must be a URL such as https://host/path")
    if parts.scheme == "http" and host.lower() not in _LOOPBACK:
        # Tokens and client secrets travel in the request: only a listener on
        # this machine may go without TLS.
        raise PydanticCustomError(
            "url_https", "must start with https:// (http:// only on loopback)"
        )
    return value


Endpoint = Annotated[str, AfterValidator(_check_endpoint)]


class OAuth(_Model):
    """``oauth:`` of an account using ``auth: xoauth2`` or ``oauthbearer``.

    Either a ``refresh_token`` that gpopd exchanges at ``token_url`` for
    access tokens (``gpopd auth ACCOUNT`` obtains one), or an ``access_token``
    source, typically a command, which is run again for every session.
    """

    client_id: Text | None = None
    client_secret: Secret | None = None
    refresh_token: Secret | None = None
    access_token: Secret | None = None
    token_url: Endpoint = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
    auth_url: Endpoint = "https://accounts.google.com/o/oauth2/v2/auth"
    scope: Text = "https://mail.google.com/"
    ca_file: ReadableFile | None = None

    @model_validator(mode="after")
    def _token_source(self) -> Self:
        if self.access_token is not None and self.refresh_token is not None:
            raise PydanticCustomError(
                "oauth_token_source",
                "give either access_token or refresh_token, not both",
                {"gpopd_key": "access_token"},
            )
        if self.access_token is None:
            if self.refresh_token is None:
                raise PydanticCustomError(
                    "oauth_token_missing",
                    "needs refresh_token (run `gpopd auth ACCOUNT` to obtain one) or access_token",
                    {"gpopd_key": "refresh_token"},
                )
            if self.client_id is None:
                raise PydanticCustomError(
                    "oauth_client_missing",
                    "refresh_token needs client_id",
                    {"gpopd_key": "client_id"},
                )
        return self


class AccountDefaults(_Model):
    """``defaults:``: any account key but the per-account ones, merged under each account."""

    port: Port | None = None
    tls: TlsMode | None = None
    allow_plaintext: bool | None = None
    ca_file: ReadableFile | None = None
    auth: AuthMethod | None = None
    keep: bool | None = None
    max_messages_per_poll: Count | None = None
    max_message_size: ByteSize | None = None
    delete_after: Timeout | None = None
    poll_interval: PollInterval | None = None
    connect_timeout: Timeout | None = None
    timeout: Timeout | None = None
    add_headers: AddHeaders | None = None
    quarantine: AbsolutePath | None = None
    allow_fast_polling: bool | None = None
    skip_sent: bool | None = None
    gmail_batch_threshold: Count | None = None
    max_sessions_per_poll: Count | None = None
    routes: Routes | None = None
    delivery: Deliveries | None = None


class Account(_Model):
    """One mailbox to poll and where its messages go; ``name`` is its key under ``accounts``."""

    name: Annotated[str, BeforeValidator(_name_from_key)]
    host: Host
    port: Port | None = None
    tls: TlsMode = "implicit"
    allow_plaintext: bool = False
    ca_file: ReadableFile | None = None
    username: Text
    password: Secret | None = None
    auth: AuthMethod = "auto"
    keep: bool = True
    max_messages_per_poll: Count | None = None
    max_message_size: ByteSize = 50 * 1024**2
    delete_after: Timeout | None = None
    poll_interval: PollInterval = 600.0
    connect_timeout: Timeout = 30.0
    timeout: Timeout = 120.0
    add_headers: AddHeaders = ()
    # A Maildir that also receives every message a destination refuses for good.
    quarantine: AbsolutePath | None = None
    # Gmail: no poll_interval under 5 minutes unless the user insists.
    allow_fast_polling: bool = False
    # Gmail's POP includes sent mail: skip messages From the account itself.
    skip_sent: bool = False
    # A session that listed at least this many messages and fetched them all
    # is followed at once by another one (Gmail offers ~250 per session).
    gmail_batch_threshold: Count = 200
    max_sessions_per_poll: Count = 100
    oauth: OAuth | None = None
    # Tried in order before ``delivery``, which takes what no route matched.
    routes: Routes = ()
    delivery: Deliveries

    @property
    def effective_port(self) -> int:
        """``port``, or 995 for implicit TLS and 110 otherwise."""
        if self.port is not None:
            return self.port
        return 995 if self.tls == "implicit" else 110

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        # ``gpopd_key`` lets the loader point at the offending key's line.
        if self.tls == "none" and not self.allow_plaintext:
            raise PydanticCustomError(
                "plaintext_refused",
                "tls: none sends the password unencrypted; set allow_plaintext: true to allow it",
                {"gpopd_key": "tls"},
            )
        if self.auth in OAUTH_AUTH_METHODS and self.oauth is None:
            raise PydanticCustomError(
                "oauth_missing",
                f"auth: {self.auth} needs an oauth section (refresh_token or access_token)",
                {"gpopd_key": "oauth"},
            )
        if self.oauth is not None and self.auth not in OAUTH_AUTH_METHODS:
            raise PydanticCustomError(
                "oauth_unused",
                f"oauth is used only with auth: xoauth2 or oauthbearer, not auth: {self.auth}",
                {"gpopd_key": "oauth"},
            )
        if self.auth in PASSWORD_AUTH_METHODS and self.password is None:
            raise PydanticCustomError(
                "password_missing",
                f"auth: {self.auth} needs a password",
                {"gpopd_key": "password"},
            )
        if (
            gmail.is_gmail_host(self.host)
            and self.poll_interval < gmail.GMAIL_MIN_INTERVAL
            and not self.allow_fast_polling
        ):
            raise PydanticCustomError(
                "gmail_poll_interval",
                "Gmail asks clients to wait 5 minutes between logins (LOGIN-DELAY 300) and "
                "answers faster polling with a lockout; use at least 5m, or set "
                "allow_fast_polling: true to insist",
                {"gpopd_key": "poll_interval"},
            )
        if self.delete_after is not None and not self.keep:
            raise PydanticCustomError(
                "delete_after_without_keep",
                "delete_after needs keep: true (with keep: false messages are deleted as "
                "soon as they are delivered); remove one of them, or set delete_after: null",
                {"gpopd_key": "delete_after"},
            )
        return self


def _inherit_defaults(data: Any) -> Any:
    """Merge ``defaults`` under each account and name each account after its key."""
    if not isinstance(data, Mapping):
        return data
    data = dict(data)
    defaults = data.get("defaults")
    if defaults is None:
        data.pop("defaults", None)
        defaults = {}
    elif isinstance(defaults, AccountDefaults):
        # Set fields as they are: dumping would flatten secret sources.
        defaults = {k: getattr(defaults, k) for k in defaults.model_fields_set}
    accounts = data.get("accounts")
    if "accounts" in data and accounts is None:  # an empty "accounts:" section
        data["accounts"] = {}
    elif isinstance(accounts, Mapping):
        inherited = (
            {k: v for k, v in defaults.items() if k not in PER_ACCOUNT_KEYS}
            if isinstance(defaults, Mapping)
            else {}
        )
        merged = {}
        for key, account in accounts.items():
            if isinstance(account, Mapping):
                name = _ExplicitName(account["name"]) if "name" in account else key
                own = {**account, "name": name}
                # A delivery of the same kind fills its gaps from the default
                # one; a delivery of another kind replaces it whole.
                if merges_with(inherited.get("delivery"), own.get("delivery")):
                    own["delivery"] = {**inherited["delivery"], **own["delivery"]}
                merged[key] = {**inherited, **own}
            else:
                merged[key] = account
        data["accounts"] = merged
    return data


class Settings(BaseSettings):
    """The whole configuration, as validated at start-up and on each reload.

    ``Settings(...)`` validates its arguments only; ``load_config`` is what
    layers the YAML file and ``GPOPD_*`` variables.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    state_dir: AbsolutePath = Path("/var/lib/gpopd")
    log_file: AbsolutePath | None = None
    max_sessions: Count = 32
    max_sessions_per_host: Count = 8
    defaults: AccountDefaults = Field(default_factory=AccountDefaults)
    accounts: dict[AccountName, Account]

    _inherit = model_validator(mode="before")(_inherit_defaults)

    @field_validator("accounts")
    @classmethod
    def _at_least_one_distinct(cls, accounts: dict[str, Account]) -> dict[str, Account]:
        if not accounts:
            raise PydanticCustomError("no_accounts", "at least one account is needed")
        seen: dict[str, str] = {}
        for name in accounts:
            if (other := seen.setdefault(name.casefold(), name)) != name:
                # Environment variables are upper-case, so names meet case-insensitively.
                raise PydanticCustomError(
                    "account_case", f"account names {other!r} and {name!r} differ only in case"
                )
        return accounts

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def config_path(cli_value: str | None, environ: Mapping[str, str]) -> Path:
    """The file to load: ``--config``, else ``$GPOPD_CONFIG``, else the default."""
    chosen = cli_value if cli_value is not None else environ.get(CONFIG_PATH_VAR) or None
    return Path(chosen).expanduser() if chosen is not None else DEFAULT_CONFIG_PATH


class _EnvironmentSource(EnvSettingsSource):
    """pydantic-settings' env source, reading a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


def _environment_overrides(doc: YamlConfigSource, environ: Mapping[str, str]) -> None:
    """Deep-merge every ``GPOPD_*`` variable over ``doc``, one variable at a time.

    One at a time so that each value's origin (and each parse error) is known
    by variable name; shallower variables first so deeper ones win, as
    pydantic-settings itself merges them.
    """
    accounts = doc.data.get("accounts") if isinstance(doc.data, dict) else None
    names = {n.casefold(): n for n in accounts} if isinstance(accounts, dict) else {}
    variables = [(k, v) for k, v in environ.items() if k.upper().startswith(ENV_PREFIX)]
    variables.sort(key=lambda kv: (kv[0].count(ENV_NESTED_DELIMITER), kv[0]))
    for var, value in variables:
        try:
            found = _EnvironmentSource(Settings, {var: value})()
        except (SettingsError, ValueError, TypeError):
            doc.add_problem(f"environment variable {var}", "cannot parse the value as JSON")
            continue
        if not found:
            continue  # not a setting (GPOPD_CONFIG, for one)
        path = var[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER)
        _keep_text(found, path, value)
        if isinstance(found.get("accounts"), dict):
            found["accounts"] = {
                names.get(k.casefold(), k): v for k, v in found["accounts"].items()
            }
        doc.merge(found, var)


def _keep_text(found: dict[str, Any], path: list[str], raw: str) -> None:
    """Undo JSON decoding of scalars: ``PASSWORD=0123`` stays the text ``0123``.

    Only mappings and lists are worth decoding; pydantic converts text to
    numbers and booleans where a field wants them.
    """
    node: Any = found
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        node = node[key]
    last = path[-1]
    if isinstance(node, dict) and last in node and not isinstance(node[last], dict | list):
        node[last] = EnvironmentSecret(raw) if last in SECRET_KEYS else raw


def load_config(
    path: Path,
    *,
    environ: Mapping[str, str] | None = None,
    resolve_secrets: bool = True,
) -> Settings:
    """Load, merge and validate the configuration; raise ``ConfigError`` listing every problem.

    ``environ`` (default ``os.environ``) supplies the ``GPOPD_*`` overrides,
    ``{env: ...}`` secrets, ``$CREDENTIALS_DIRECTORY`` and the environment of
    secret commands.  With ``resolve_secrets=False`` secret sources are only
    checked for shape and ``SecretSource.secret`` is unavailable.
    """
    environ = os.environ if environ is None else environ
    try:
        raw, mode = read_regular_file(path, MAX_CONFIG_BYTES)
    except UnreadableFile as exc:
        raise ConfigError([f"{path}: cannot read: {exc.reason}"]) from None
    doc = YamlConfigSource(Settings, path, raw)
    _environment_overrides(doc, environ)
    context = SecretContext(
        environ=environ,
        resolve=resolve_secrets,
        inline_allowed=(mode & 0o044) == 0,
        config_file=path,
    )
    settings: Settings | None = None
    try:
        with secret_context(context):
            settings = Settings.model_validate(doc.data)
    except ValidationError as exc:
        doc.add_validation_errors(exc)
    if doc.problems or settings is None:
        raise ConfigError(doc.problems)
    return settings
