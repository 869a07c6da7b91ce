"""Forward messages to an SMTP relay (aiosmtplib), at least once.

Theory of operation: messages are spooled while RETR streams them (a relay
must never see half a message); each commit sends its window over one SMTP
session kept for the whole poll: connect, STARTTLS (mandatory when
configured, never a plaintext fallback) or implicit TLS, EHLO, AUTH, then
MAIL / RCPT... / DATA per message, and QUIT at ``close()``.  aiosmtplib turns
every bare CR and bare LF into CRLF (RFC 5321 §2.3.8, the SMTP smuggling
class) and dot-stuffs the data; ``data()`` takes one ``bytes`` object, so the
message (bounded by ``max_message_size``) is read whole from its spool file.

Replies: 2xx accepted, 4xx ``TemporaryDeliveryError``, 5xx
``PermanentDeliveryError``.  Recipients refused with 5xx while others
accepted are named in ``RelayCommitResult.warning``; a 4xx for any recipient
holds the whole message back for the next poll.  The rules shared with LMTP
live in ``RelayDestination``.

Duplicate window: the relay takes the message over with its 250 reply to the
final ".".  If that reply never reaches the store (gpopd killed, connection
lost or timed out after the "."), the message stays on the POP3 server and
is forwarded again at the next poll; nothing at the relay can tell
``find_delivered()`` otherwise, so delivery is at least once.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from abc import abstractmethod
from collections.abc import Collection, Sequence, Set
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path
from typing import Self

import aiosmtplib

from gpopd.config import SmtpDelivery
from gpopd.delivery.base import CommitResult, Destination, MessageInfo, Staged, Writer
from gpopd.delivery.spool import SpooledMessage, SpoolWriter
from gpopd.errors import ConfigError, DeliveryError, PermanentDeliveryError, TemporaryDeliveryError

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
    "SmtpDestination",
    "delivery_error",
    "envelope_address",
    "envelope_sender",
    "server_words",
    "tls_client_context",
]

# The sender is looked for in this much of the message's start; a header
# section larger than this is spam or an attack, and gets the null sender.
MAX_HEAD_SCAN = 64 * 1024
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


@dataclass(eq=False)
class RelayStaged(SpooledMessage):
    """A spooled message plus what the relay must know before sending it."""

    eight_bit: bool = False
    nul: bool = False
    line_feeds: int = 0
    sender: str | None = None

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
        self, info: MessageInfo, directory: Path | None = None, *, want_sender: bool = True
    ) -> None:
        self._spool = SpoolWriter(info, directory)
        self._eight_bit = False
        self._nul = False
        self._line_feeds = 0
        self._head: bytearray | None = bytearray() if want_sender else None
        self._head_done = not want_sender
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
        sender = None if self._head is None else envelope_sender(bytes(self._head))
        self._head = None
        staged = RelayStaged(
            spooled.info,
            spooled.size,
            spooled.file,
            eight_bit=self._eight_bit,
            nul=self._nul,
            line_feeds=self._line_feeds,
            sender=sender,
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
    ) -> None:
        self.name = name
        self._spool_dir = spool_dir
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
        return RelayWriter(info, self._spool_dir, want_sender=self._sender is None)

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
        if not all(address.isascii() for address in (sender, *self._recipients)):
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


class SmtpDestination(RelayDestination):
    """Forward each message to the relay of an ``SmtpDelivery``."""

    def __init__(
        self,
        cfg: SmtpDelivery,
        *,
        spool_dir: Path | None = None,
        local_hostname: str | None = None,
    ) -> None:
        name = f"smtp:{cfg.host}:{cfg.effective_port}"
        super().__init__(name, cfg.recipient, cfg.sender, spool_dir)
        self.cfg = cfg
        self._local_hostname = local_hostname
        try:
            secret = None if cfg.password is None else cfg.password.secret
        except RuntimeError as exc:  # loaded without resolving secrets
            raise ConfigError(f"{name}: password: {exc}") from None
        self._password = None if secret is None else secret.get_secret_value()
        self._smtp: aiosmtplib.SMTP | None = None

    @classmethod
    def from_config(cls, cfg: SmtpDelivery) -> Self:
        return cls(cfg)

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                async with asyncio.timeout(self.cfg.timeout):
                    await smtp.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass  # every message is settled already; a rude goodbye loses nothing
        finally:
            smtp.close()

    # -- one message ---------------------------------------------------------

    async def _transaction(self, item: RelayStaged, sender: str) -> str | None:
        smtp = self._smtp
        if smtp is None:
            raise RelayDropped("no session")
        offered = {name.upper() for name in smtp.esmtp_extensions}
        options = self._mail_parameters(item, sender, offered)
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        try:
            await smtp.mail(sender, options=options, encoding=encoding)
            refused: list[str] = []
            for recipient in self._recipients:
                try:
                    await smtp.rcpt(recipient, encoding=encoding)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    if exc.code == 421 or not 500 <= exc.code <= 599:
                        raise
                    refused.append(f"RCPT TO:<{recipient}> refused: {self._words(exc)}")
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise RelayDropped(f"connection lost before DATA: {exc}") from None
        except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPRecipientRefused) as exc:
            command = "MAIL FROM" if isinstance(exc, aiosmtplib.SMTPSenderRefused) else "RCPT TO"
            what = f"{command}:<{exc.args[2]}> refused: {self._words(exc)}"
            await self._reset(smtp)
            if exc.code == 421:
                raise RelayDropped(what) from None
            if command == "RCPT TO":
                # Deliver to none now, to every recipient at the next poll.
                raise TemporaryDeliveryError(
                    f"{self.name}: {'; '.join([*refused, what])}"
                ) from None
            raise delivery_error(exc.code, f"{self.name}: {what}") from None
        except aiosmtplib.SMTPTimeoutError:
            raise
        except aiosmtplib.SMTPException as exc:
            # Anything else aiosmtplib may raise here: the session is unsure.
            raise RelayStalled(server_words(str(exc))) from None
        if len(refused) == len(self._recipients):
            await self._reset(smtp)
            raise PermanentDeliveryError(f"{self.name}: {'; '.join(refused)}")

        data = await asyncio.to_thread(item.read_all)
        try:
            await smtp.data(data)
        except aiosmtplib.SMTPDataError as exc:
            await self._reset(smtp)
            raise delivery_error(
                exc.code, f"{self.name}: message refused: {self._words(exc)}"
            ) from None
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            # After the final "." the relay may have queued the message: the
            # next poll sends it again (the documented duplicate window).
            error = TemporaryDeliveryError(
                f"{self.name}: no reply to DATA ({exc}); the relay may have "
                "accepted the message, so a duplicate is possible"
            )
            if isinstance(exc, aiosmtplib.SMTPTimeoutError):
                self._broken = error
            raise error from None
        return "; ".join(refused) or None

    # -- the session ---------------------------------------------------------

    def _session_usable(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    async def _start_session(self) -> None:
        mode = self.cfg.effective_tls
        context = None
        if mode != "none":
            try:
                context = await asyncio.to_thread(tls_client_context, self.cfg.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise RelaySessionFailed(
                    PermanentDeliveryError(f"{self.name}: cannot load the CA file: {exc}")
                ) from None
        smtp = aiosmtplib.SMTP(
            hostname=self.cfg.host,
            port=self.cfg.effective_port,
            timeout=self.cfg.timeout,
            use_tls=mode == "implicit",
            start_tls=False,
            tls_context=context,
            local_hostname=self._local_hostname,
        )
        try:
            await self._open(smtp, mode)
        except BaseException:
            smtp.close()
            raise
        self._smtp = smtp

    async def _open(self, smtp: aiosmtplib.SMTP, mode: str) -> None:
        try:
            await smtp.connect()
            if mode == "starttls":
                await smtp.ehlo()
                if not smtp.supports_extension("starttls"):
                    raise RelaySessionFailed(
                        PermanentDeliveryError(
                            f"{self.name}: the relay does not offer STARTTLS, which tls: starttls "
                            "requires; nothing was sent in plaintext"
                        )
                    )
                await smtp.starttls()
            await smtp.ehlo()
            if self.cfg.username is not None and self._password is not None:
                await self._login(smtp, self.cfg.username, self._password)
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
            raise RelaySessionFailed(self._session_error(exc)) from None

    def _session_error(self, exc: Exception) -> DeliveryError:
        cause = exc.__cause__ if isinstance(exc, aiosmtplib.SMTPConnectError) else exc
        if isinstance(cause, ssl.SSLError):
            return PermanentDeliveryError(f"{self.name}: TLS failed: {cause}")
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
                stage = "greeting"
            elif isinstance(exc, aiosmtplib.SMTPHeloError):
                stage = "EHLO"
            else:
                stage = "STARTTLS"
            return delivery_error(exc.code, f"{self.name}: {stage} refused: {self._words(exc)}")
        # Refused, unreachable, timed out or closed: nothing to do but wait.
        return TemporaryDeliveryError(f"{self.name}: relay unreachable: {exc}")

    async def _login(self, smtp: aiosmtplib.SMTP, username: str, password: str) -> None:
        try:
            await smtp.login(username, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            words = self._scrub(self._words(exc), password, username)
            raise RelaySessionFailed(
                delivery_error(exc.code, f"{self.name}: AUTH as {username!r} refused: {words}")
            ) from None
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            raise
        except aiosmtplib.SMTPException as exc:
            # No AUTH offered, or no mechanism in common.
            words = self._scrub(server_words(str(exc)), password, username)
            raise RelaySessionFailed(
                PermanentDeliveryError(f"{self.name}: cannot log in: {words}")
            ) from None

    async def _reset(self, smtp: aiosmtplib.SMTP) -> None:
        if not smtp.is_connected:
            return
        try:
            await smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            # A session whose state is unknown is not reused.
            self._abandon()

    def _abandon(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    @staticmethod
    def _words(exc: aiosmtplib.SMTPResponseException) -> str:
        return f"{exc.code} {server_words(exc.message)}"

    @staticmethod
    def _scrub(text: str, password: str, username: str | None = None) -> str:
        # A hostile or broken server may echo what it was sent.
        secrets = {password, base64.b64encode(password.encode()).decode()}
        if username is not None:
            plain = f"\0{username}\0{password}".encode()
            secrets.add(base64.b64encode(plain).decode())
        for secret in sorted(secrets, key=len, reverse=True):
            if secret:
                text = text.replace(secret, "********")
        return text
