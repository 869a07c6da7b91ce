"""What Gmail's POP3 server says, and the SASL payloads it accepts (PROTOCOL.md §4-§5).

Pure data, records and parsing, no sockets: :mod:`tests.support.gmailpop` serves these
texts, and tests use the same constants to check what a client saw.  Texts
marked "stand-in" were never observed from Gmail; the rest are its words.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
from dataclasses import dataclass

DEFAULT_ADDRESS = "alice@gmail.com"
DEFAULT_APP_PASSWORD = "abcdwxyzabcdwxyz"  # Gmail app passwords are 16 letters
# Long enough that ``AUTH XOAUTH2 <base64>`` on one line exceeds 255 octets, as a real
# Google access token does.
DEFAULT_TOKEN = "ya29.a0AfB_byC" + "".join(f"{n * 7919 % 65536:04x}" for n in range(52))
BATCH_SIZE = 250
RECENT_DAYS = 30
# Far above 255: an overlong client line is recorded for the test to see, not refused.
MAX_LINE = 1024 * 1024

CAPA_BEFORE_LOGIN = (
    "USER",
    "RESP-CODES",
    "EXPIRE 0",
    "LOGIN-DELAY 300",
    "TOP",
    "UIDL",
    "X-GOOGLE-RICO",
    "SASL PLAIN XOAUTH2 OAUTHBEARER",
)
CAPA_AFTER_LOGIN = (
    "USER",
    "RESP-CODES",
    "PIPELINING",
    "EXPIRE 0",
    "LOGIN-DELAY 300",
    "TOP",
    "UIDL",
    "X-GOOGLE-RICO",
)

ERROR_JSON = b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}'
ERROR_CHALLENGE = b"+ " + base64.b64encode(ERROR_JSON) + b"\r\n"

BAD_CREDENTIALS = b"-ERR [AUTH] Username and password not accepted.\r\n"
INVALID_TOKEN = b"-ERR [AUTH] Invalid credentials\r\n"  # stand-in
SASL_CANCELLED = b"-ERR [AUTH] Authentication cancelled\r\n"  # stand-in
BAD_SASL = b"-ERR [AUTH] Invalid SASL argument\r\n"  # stand-in
BAD_SASL_RESPONSE = b"-ERR [AUTH] Invalid response to the error challenge\r\n"  # stand-in
NO_SUCH_MESSAGE = b"-ERR no such message\r\n"  # stand-in
BAD_COMMAND = b"-ERR bad command\r\n"  # stand-in


class Fault(enum.Enum):
    """An account state that makes Gmail refuse; ``text`` is its reply line."""

    BAD_CREDENTIALS = enum.auto()
    WEB_LOGIN_REQUIRED = enum.auto()
    APP_PASSWORD_REQUIRED = enum.auto()
    POP_DISABLED = enum.auto()
    POP_DISABLED_ON_STAT = enum.auto()
    BANDWIDTH_EXCEEDED = enum.auto()
    STILL_ENABLING = enum.auto()

    @property
    def text(self) -> bytes:
        return _FAULT_TEXT[self]


_POP_DISABLED = (
    b"-ERR [SYS/PERM] Your account is not enabled for POP access. Please visit your"
    b" Gmail settings page and enable your account for POP access.\r\n"
)
_FAULT_TEXT = {
    Fault.BAD_CREDENTIALS: BAD_CREDENTIALS,
    Fault.WEB_LOGIN_REQUIRED: (
        b"-ERR [AUTH] Web login required: https://support.google.com/mail/answer/78754\r\n"
    ),
    Fault.APP_PASSWORD_REQUIRED: (
        b"-ERR [AUTH] Application-specific password required:"
        b" https://support.google.com/accounts/answer/185833\r\n"
    ),
    Fault.POP_DISABLED: _POP_DISABLED,
    Fault.POP_DISABLED_ON_STAT: _POP_DISABLED,
    # The help page's wording; the response code is a stand-in.
    Fault.BANDWIDTH_EXCEEDED: (
        b"-ERR [SYS/TEMP] Account exceeded POP command or bandwidth limits\r\n"
    ),
    # Gmail's words from its help page; the response code is a stand-in.
    Fault.STILL_ENABLING: (
        b"-ERR [SYS/TEMP] We are still working on enabling pop for your account so windowed"
        b" mode is not available. Try again later or consider using POP3 in recent mode.\r\n"
    ),
}
# OAuth never meets these: they are about the password or the web sign-in.
PASSWORD_FAULTS = frozenset(
    {Fault.BAD_CREDENTIALS, Fault.WEB_LOGIN_REQUIRED, Fault.APP_PASSWORD_REQUIRED}
)
TRANSACTION_FAULT_VERBS = frozenset({"STAT", "LIST", "UIDL", "RETR", "TOP"})


def uid_for(seq: int) -> str:
    """The deterministic ``GmailId`` UID of the ``seq``-th message added (from 0)."""
    return f"GmailId{0x18C3A0B1F2000000 + seq * 0x1F3D5:016x}"


def xoauth2_payload(user: str, token: str) -> bytes:
    """The decoded XOAUTH2 initial response Google documents."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer_payload(
    user: str, token: str, host: str | None = "127.0.0.1", port: int | None = 995
) -> bytes:
    """The decoded RFC 7628 OAUTHBEARER initial response."""
    pairs = ([f"host={host}"] if host else []) + ([f"port={port}"] if port else [])
    pairs.append(f"auth=Bearer {token}")
    return ("n,a=" + user + ",\x01" + "".join(p + "\x01" for p in pairs) + "\x01").encode()


def parse_xoauth2(payload: bytes) -> tuple[str, str] | None:
    """``(user, token)`` of a well-formed XOAUTH2 payload, else None."""
    if not payload.startswith(b"user=") or not payload.endswith(b"\x01\x01"):
        return None
    fields = payload[:-2].split(b"\x01")
    if len(fields) != 2 or not fields[1].startswith(b"auth=Bearer "):
        return None
    user, token = fields[0][5:], fields[1][12:]
    if not user or not token or b" " in token:
        return None
    return user.decode("utf-8", "replace"), token.decode("ascii", "replace")


def parse_oauthbearer(payload: bytes) -> tuple[str, str] | None:
    """``(user, token)`` of a well-formed OAUTHBEARER payload, else None."""
    if not payload.startswith(b"n,a=") or not payload.endswith(b"\x01\x01"):
        return None
    header, sep, rest = payload.partition(b",\x01")
    user = header[4:]
    if not sep or not user or b"," in user:
        return None
    pairs: dict[bytes, bytes] = {}
    for item in rest[:-2].split(b"\x01"):
        key, eq, value = item.partition(b"=")
        if not eq or key not in (b"host", b"port", b"auth") or key in pairs:
            return None
        pairs[key] = value
    auth = pairs.get(b"auth", b"")
    token = auth[7:]
    if not auth.startswith(b"Bearer ") or not token or b" " in token:
        return None
    if b"port" in pairs and not pairs[b"port"].isdigit():
        return None
    return user.decode("utf-8", "replace"), token.decode("ascii", "replace")


@dataclass
class GmailMessage:
    """One message of the account as Gmail keeps it."""

    seq: int
    uid: str
    data: bytes
    date: dt.datetime
    sender: str
    popped: bool = False

    @property
    def size(self) -> int:
        """Octets with CRLF line ends, as LIST and STAT count them."""
        lines = self.data.replace(b"\r\n", b"\n").split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        return sum(len(line) + 2 for line in lines)


@dataclass(frozen=True)
class AuthAttempt:
    """One login attempt: which mechanism, in which form, and how it ended."""

    mechanism: str  # "USER", "PLAIN", "XOAUTH2" or "OAUTHBEARER"
    form: str  # "user-pass", "one-line" or "two-step"
    user: str | None
    ok: bool
    # The client's line after an error challenge (b"", b"*", b"AQ=="...), else None.
    error_response: bytes | None = None
