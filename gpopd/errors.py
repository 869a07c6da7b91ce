"""The one error tree of gpopd.

Every error carries what a person needs to act on it: the account, the
command that failed and the server's own words.  The protocol engine
(``gpopd.pop3``) has its own ``ProtocolError`` and does not import this module.
"""

from __future__ import annotations

# sysexits(3): the exit codes the CLI uses.
EX_OK = 0
EX_USAGE = 64
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78


class GpopdError(Exception):
    """Base class of every error gpopd raises on purpose."""


class ConfigError(GpopdError):
    """The configuration is invalid; ``problems`` lists every finding.

    Each problem is one line such as
    ``/etc/gpopd/gpopd.yaml:8:11: accounts.bob.port: Input should be a valid integer``.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TransportError(GpopdError, ConnectionError):
    """The connection to a server failed or broke."""


class ConnectTimeout(TransportError, TimeoutError):
    """Connecting (TCP or the TLS handshake) took longer than allowed."""


class ReadTimeout(TransportError, TimeoutError):
    """The server sent nothing for longer than the read timeout."""


class TlsError(TransportError):
    """TLS could not be established safely: untrusted certificate, wrong name,
    STLS not offered, or plaintext injected after STLS."""


class ServerError(GpopdError):
    """The server answered ``-ERR``.

    ``code`` is the RFC 2449/3206 response code (``"AUTH"``, ``"SYS/TEMP"``...)
    or ``None``; ``text`` is the rest of the server's line.
    """

    def __init__(
        self, command: str, text: str, code: str | None = None, *, hint: str | None = None
    ) -> None:
        self.command = command
        self.text = text
        self.code = code
        self.hint = hint
        shown = f"[{code}] {text}" if code else text
        message = f"{command} failed: -ERR {shown}".rstrip()
        super().__init__(f"{message} ({hint})" if hint else message)


class AuthError(ServerError):
    """Credentials or account policy refused: needs a person, do not retry fast."""


class MailboxBusyError(ServerError):
    """``[IN-USE]``, ``[LOGIN-DELAY]`` or ``[SYS/TEMP]``: back off and retry."""


class RateLimitedError(MailboxBusyError):
    """The server says the account polls too often (Gmail's "exceeded POP
    command or bandwidth limits"): wait at least ``retry_after`` seconds."""

    retry_after = 3600.0


class TokenRejectedError(AuthError):
    """The server refused an OAuth2 access token (SASL XOAUTH2/OAUTHBEARER).

    ``status`` is the HTTP-like status from the server's JSON challenge
    (``"400"``, ``"401"``) when it sent one.  A fresh token may succeed.
    """

    def __init__(self, command: str, text: str, status: str | None = None) -> None:
        self.status = status
        super().__init__(command, text, "AUTH")


class DeliveryError(GpopdError):
    """A destination did not accept a message."""


class TemporaryDeliveryError(DeliveryError):
    """Keep the message on the server and retry at the next poll."""


class PermanentDeliveryError(DeliveryError):
    """Keep the message on the server, record the failure, alert."""


class StoreError(GpopdError):
    """The state database failed."""
