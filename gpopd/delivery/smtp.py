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
live in ``gpopd.delivery.relay``.

Duplicate window: the relay takes the message over with its 250 reply to the
final ".".  If that reply never reaches the store (gpopd killed, connection
lost or timed out after the "."), the message stays on the POP3 server and
is forwarded again at the next poll; nothing at the relay can tell
``find_delivered()`` otherwise, so delivery is at least once.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from pathlib import Path
from typing import Self

import aiosmtplib

from gpopd.config import SmtpDelivery
from gpopd.delivery.relay import (
    RelayDestination,
    RelayDropped,
    RelaySessionFailed,
    RelayStaged,
    RelayStalled,
    delivery_error,
    server_words,
    tls_client_context,
)
from gpopd.errors import ConfigError, DeliveryError, PermanentDeliveryError, TemporaryDeliveryError

__all__ = ["SmtpDestination"]


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
        super().__init__(name, cfg.recipient, cfg.sender, spool_dir, cfg.recipient_header)
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
            recipients = self._recipients_for(item)
            for recipient in recipients:
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
        if len(refused) == len(recipients):
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
