"""What the SMTP and LMTP destinations share: spooling, the envelope, the retry rules.

Messages are spooled while RETR streams them (a relay must never see half a
message), then ``RelayDestination.commit()`` sends each one over a session
the subclass keeps for the whole poll.  Replies: 2xx accepted, 4xx
``TemporaryDeliveryError``, 5xx ``PermanentDeliveryError``.  A server that
failed in a way another try within the same poll cannot fix marks the
destination broken, so later messages fail at once.

Duplicate window (both protocols): the server takes the message over with its
reply to the final ".".  If that reply never reaches the store, the message
stays on the POP3 server and is forwarded again at the next poll; nothing at
the far side can tell ``find_delivered()`` otherwise, so delivery is at least
once.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from abc import abstractmethod
from collections.abc import Collection, Sequence, Set
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path

from gpopd.delivery.base import CommitResult, Destination, MessageInfo, Staged, Writer
from gpopd.delivery.spool import SpooledMessage, SpoolWriter
from gpopd.errors import ConfigError, DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from gpopd.failpoints import failpoint

__all__ = [
    "EIGHT_BIT_REFUSED",
    "NUL_REFUSED",
    "UTF8_REFUSED",
    "RelayCommitResult",
    "RelayDestination",
    "RelayDropped",
    "RelaySessionFailed",
    "RelayStaged",
    "RelayStalled",
    "RelayWriter",
    "delivery_error",
    "envelope_address",
    "envelope_sender",
    "header_recipients",
    "server_words",
    "tls_client_context",
]

# The sender is looked for in this much of the message's start; a header
# section larger than this is spam or an attack, and gets the null sender.
MAX_HEAD_SCAN = 64 * 1024
# More addresses than this in a recipient header is not a mailbox's own
# envelope: the configured recipients are used instead.
MAX_HEADER_RECIPIENTS = 32
# Bound on the far side's words kept in an error (a hostile server may talk).
MAX_SERVER_WORDS = 512
EIGHT_BIT_REFUSED = "relay does not offer 8BITMIME; the message has 8-bit content"
NUL_REFUSED = (
    "the message contains NUL bytes, which SMTP and LMTP cannot carry without "
    "BINARYMIME; it was left on the server unchanged"
)
UTF8_REFUSED = "an envelope address is not ASCII and the server does not offer SMTPUTF8"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# What may stand between the angle brackets of MAIL FROM / RCPT TO here:
# no whitespace, brackets, quotes or controls (command injection).
_MAILBOX = re.compile(r'[^\s<>"\x00-\x1f\x7f]+')
# A sender taken from a header must be a plain ASCII local@domain.
_HEADER_MAILBOX = re.compile(r"[A-Za-z0-9.!#$%&'*+\-/=?^_`{|}~]+@[A-Za-z0-9.\-\[\]:]+")
_NULL_PATH = re.compile(r"\s*<\s*>\s*")


def server_words(text: str) -> str:
    """The far side's reply text made safe for one log line and bounded."""
    text = _CONTROL.sub(" / ", text.strip())
    if len(text) > MAX_SERVER_WORDS:
        text = text[:MAX_SERVER_WORDS] + "..."
    return text


def delivery_error(code: int, what: str) -> DeliveryError:
    """``PermanentDeliveryError`` for a 5xx reply, ``TemporaryDeliveryError`` otherwise."""
    if 500 <= code <= 599:
        return PermanentDeliveryError(what)
    return TemporaryDeliveryError(what)


def envelope_address(address: str) -> str:
    """The mailbox of a configured envelope address; ``""`` for the null path ``<>``.

    Raises ``ValueError`` for anything that could not go between the angle
    brackets of an SMTP command unchanged.
    """
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
        if not text:
            return ""
    if not _MAILBOX.fullmatch(text):
        raise ValueError(f"{address!r} is not a usable envelope address")
    return text


def _header_mailbox(value: str) -> str | None:
    for _, address in getaddresses([value]):
        if _HEADER_MAILBOX.fullmatch(address):
            return address
    return None


def envelope_sender(head: bytes) -> str:
    """The envelope sender for a message starting with ``head``.

    The topmost Return-Path wins (``<>`` marks a bounce, which must keep the
    null sender so that it cannot bounce back); then the first From address;
    else the null sender ``""``.
    """
    end = head.find(b"\n\n")
    headers = BytesHeaderParser(policy=compat32).parsebytes(head if end < 0 else head[: end + 1])
    return_paths = headers.get_all("Return-Path") or []
    if return_paths:
        value = str(return_paths[0])
        if _NULL_PATH.fullmatch(value):
            return ""
        address = _header_mailbox(value)
        if address is not None:
            return address
    from_value = headers.get("From")
    if from_value is not None:
        address = _header_mailbox(str(from_value))
        if address is not None:
            return address
    return ""


def header_recipients(head: bytes, name: str) -> tuple[str, ...] | None:
    """The envelope recipients named by the topmost ``name`` header of ``head``.

    Only the topmost occurrence counts: lower ones were added by earlier
    hops (a list's address, an old alias) and must not receive the message
    again.  ``None`` when the header is absent, names no address, names more
    than ``MAX_HEADER_RECIPIENTS``, or any of its addresses is not a plain
    ASCII local@domain (nothing else may reach an RCPT TO command).
    """
    end = head.find(b"\n\n")
    headers = BytesHeaderParser(policy=compat32).parsebytes(head if end < 0 else head[: end + 1])
    values = headers.get_all(name) or []
    if not values:
        return None
    found: dict[str, str] = {}
    for _, address in getaddresses([str(values[0])]):
        if not _HEADER_MAILBOX.fullmatch(address):
            return None
        found.setdefault(address.lower(), address)
    if not 0 < len(found) <= MAX_HEADER_RECIPIENTS:
        return None
    return tuple(found.values())


@dataclass(eq=False)
class RelayStaged(SpooledMessage):
    """A spooled message plus what the relay must know before sending it."""

    eight_bit: bool = False
    nul: bool = False
    line_feeds: int = 0
    sender: str | None = None
    # From ``recipient_header``; ``None``: the configured recipients.
    recipients: tuple[str, ...] | None = None

    @property
    def transfer_size(self) -> int:
        """The size on the wire (RFC 1870 SIZE): every line end becomes CRLF."""
        return self.size + self.line_feeds


@dataclass(frozen=True, slots=True)
class RelayCommitResult(CommitResult):
    """A commit result that may name recipients refused while others accepted."""

    warning: str | None = None


class RelayWriter(Writer):
    """Spools a message, noting 8-bit content, NUL bytes and the header's sender."""

    def __init__(
        self,
        info: MessageInfo,
        directory: Path | None = None,
        *,
        want_sender: bool = True,
        recipient_header: str | None = None,
    ) -> None:
        self._spool = SpoolWriter(info, directory)
        self._eight_bit = False
        self._nul = False
        self._line_feeds = 0
        self._want_sender = want_sender
        self._recipient_header = recipient_header
        wants_head = want_sender or recipient_header is not None
        self._head: bytearray | None = bytearray() if wants_head else None
        self._head_done = not wants_head
        self._staged: RelayStaged | None = None

    def write(self, data: bytes) -> None:
        self._spool.write(data)
        if not self._eight_bit and not data.isascii():
            self._eight_bit = True
        if not self._nul and b"\0" in data:
            self._nul = True
        self._line_feeds += data.count(b"\n")
        if not self._head_done and self._head is not None:
            self._head += data[: MAX_HEAD_SCAN - len(self._head)]
            if b"\n\n" in self._head or len(self._head) >= MAX_HEAD_SCAN:
                self._head_done = True

    def finish(self) -> RelayStaged:
        spooled = self._spool.finish()
        head = b"" if self._head is None else bytes(self._head)
        sender = envelope_sender(head) if self._want_sender else None
        recipients = (
            header_recipients(head, self._recipient_header)
            if self._recipient_header is not None
            else None
        )
        self._head = None
        staged = RelayStaged(
            spooled.info,
            spooled.size,
            spooled.file,
            eight_bit=self._eight_bit,
            nul=self._nul,
            line_feeds=self._line_feeds,
            sender=sender,
            recipients=recipients,
        )
        spooled.file = None  # now owned by ``staged``
        self._staged = staged
        return staged

    def abort(self) -> None:
        # After finish() the staged message owns the spool file until commit()
        # releases it; aborting then still discards an uncommitted message.
        self._spool.abort()
        self._head = None
        if self._staged is not None:
            self._staged.release()


def tls_client_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the certificate and the host name; TLS 1.2 at least."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class RelaySessionFailed(Exception):
    """The session could not be opened; ``error`` applies to the rest of the poll."""

    def __init__(self, error: DeliveryError) -> None:
        super().__init__(str(error))
        self.error = error


class RelayDropped(Exception):
    """The connection ended before the server could have accepted the message."""


class RelayStalled(Exception):
    """The server stopped answering sensibly; the rest of the poll is not tried."""


class RelayDestination(Destination):
    """What the SMTP and LMTP destinations share: spooling, the envelope, the retry rules.

    A subclass opens its session in ``_start_session()``, sends one message
    in ``_transaction()`` and drops the session in ``_abandon()``.
    """

    exactly_once = False

    def __init__(
        self,
        name: str,
        recipients: Sequence[str],
        sender: str | None,
        spool_dir: Path | None,
        recipient_header: str | None = None,
    ) -> None:
        self.name = name
        self._spool_dir = spool_dir
        self._recipient_header = recipient_header
        try:
            self._recipients = tuple(envelope_address(r) for r in recipients)
            self._sender = None if sender is None else envelope_address(sender)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        if "" in self._recipients:
            raise ConfigError(f"{name}: a recipient cannot be the null path <>")
        # Set once the server failed in a way another try within the same
        # poll cannot fix (unreachable, TLS, AUTH, silence): later messages
        # fail at once instead of each waiting for a timeout or logging in again.
        self._broken: DeliveryError | None = None
        self._lock = asyncio.Lock()

    async def prepare(self, account: str) -> None:
        return None

    def open(self, info: MessageInfo) -> Writer:
        return RelayWriter(
            info,
            self._spool_dir,
            want_sender=self._sender is None,
            recipient_header=self._recipient_header,
        )

    def _recipients_for(self, item: RelayStaged) -> tuple[str, ...]:
        """The message's own recipients (``recipient_header``), else the configured ones."""
        return item.recipients or self._recipients

    async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
        items: list[RelayStaged] = []
        for item in staged:
            if not isinstance(item, RelayStaged):
                raise TypeError(f"{self.name} cannot commit {type(item).__name__}")
            if item.file is None:
                raise ValueError(f"message {item.info.uid} was already committed or aborted")
            items.append(item)
        results: list[CommitResult] = []
        try:
            async with self._lock:
                for item in items:
                    results.append(await self._deliver(item))
        except BaseException:
            self._abandon()  # cancelled halfway: the session's state is unknown
            raise
        finally:
            for item in items:
                item.release()
        return results

    async def find_delivered(self, account: str, keys: Collection[str]) -> set[str]:
        # A relay or an LMTP server keeps no trace gpopd could look up.
        return set()

    async def _deliver(self, item: RelayStaged) -> CommitResult:
        if self._broken is not None:
            return CommitResult(item, type(self._broken)(str(self._broken)))
        if item.nul:
            return CommitResult(item, PermanentDeliveryError(f"{self.name}: {NUL_REFUSED}"))
        sender = self._sender if self._sender is not None else item.sender or ""
        retried = False
        while True:
            fresh = not self._session_usable()
            if fresh:
                self._abandon()  # whatever is left of a session closed by the server
                try:
                    await self._start_session()
                except RelaySessionFailed as failure:
                    self._broken = failure.error
                    return CommitResult(item, failure.error)
            try:
                warning = await self._transaction(item, sender)
            except DeliveryError as exc:
                return CommitResult(item, exc)
            except RelayDropped as exc:
                self._abandon()
                if fresh or retried:
                    return CommitResult(item, TemporaryDeliveryError(f"{self.name}: {exc}"))
                retried = True  # the server closed an idle session: one new session
                continue
            except (TimeoutError, RelayStalled) as exc:
                self._abandon()
                reason = str(exc) or "no reply in time"
                self._broken = TemporaryDeliveryError(f"{self.name}: {reason}")
                return CommitResult(item, self._broken)
            failpoint("after-relay-accept")
            return RelayCommitResult(item, None, warning and f"{self.name}: {warning}")

    def _mail_parameters(self, item: RelayStaged, sender: str, offered: Set[str]) -> list[str]:
        """The ESMTP parameters of MAIL FROM for ``item``, given the extensions offered.

        Raises ``PermanentDeliveryError`` when the message needs an extension
        the server lacks: the message is never altered to fit.
        """
        parameters = []
        if item.eight_bit:
            if "8BITMIME" not in offered:
                raise PermanentDeliveryError(f"{self.name}: {EIGHT_BIT_REFUSED}")
            parameters.append("BODY=8BITMIME")
        if "SIZE" in offered:
            parameters.append(f"SIZE={item.transfer_size}")
        if not all(address.isascii() for address in (sender, *self._recipients_for(item))):
            if "SMTPUTF8" not in offered:
                raise PermanentDeliveryError(f"{self.name}: {UTF8_REFUSED}")
            parameters.append("SMTPUTF8")
        return parameters

    @abstractmethod
    def _session_usable(self) -> bool:
        """Whether a session is open and not known to be closed."""

    @abstractmethod
    async def _start_session(self) -> None:
        """Open a session; raise ``RelaySessionFailed``."""

    @abstractmethod
    async def _transaction(self, item: RelayStaged, sender: str) -> str | None:
        """Send one message and return a warning or ``None``.

        Raises ``DeliveryError`` for the message's own failure, ``RelayDropped``
        while nothing can have been delivered, ``RelayStalled`` or ``TimeoutError``.
        """

    @abstractmethod
    def _abandon(self) -> None:
        """Drop the session at once."""
