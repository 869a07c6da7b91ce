"""POP3 commands: frozen value objects and their validated wire form.

Every argument is checked before it reaches the wire: a CR or LF inside an
argument would let a value (a user name, a token) smuggle a second command
to the server, so any control character is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from ._errors import LocalProtocolError
from ._limits import MAX_COMMAND_LENGTH, MAX_SASL_RESPONSE


@dataclass(frozen=True, slots=True)
class Command:
    """Base class of every command the client can send."""


@dataclass(frozen=True, slots=True)
class User(Command):
    """``USER name`` (RFC 1939 section 7)."""

    name: str


@dataclass(frozen=True, slots=True)
class Pass(Command):
    """``PASS password``; the password never appears in ``repr()``."""

    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Auth(Command):
    """``AUTH mechanism [initial-response]`` (RFC 5034).

    ``initial_response`` is base64 text (``"="`` for an empty one) and never
    appears in ``repr()``.
    """

    mechanism: str
    initial_response: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class AuthResponse(Command):
    """The client's line during a SASL exchange: base64 text, ``""`` or ``"*"``.

    It answers the outstanding ``Auth`` and never appears in ``repr()``.
    """

    data: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Capa(Command):
    """``CAPA`` (RFC 2449)."""


@dataclass(frozen=True, slots=True)
class Stls(Command):
    """``STLS`` (RFC 2595)."""


@dataclass(frozen=True, slots=True)
class Stat(Command):
    """``STAT``."""


@dataclass(frozen=True, slots=True)
class List(Command):
    """``LIST`` or ``LIST n``."""

    msg: int | None = None


@dataclass(frozen=True, slots=True)
class Uidl(Command):
    """``UIDL`` or ``UIDL n``."""

    msg: int | None = None


@dataclass(frozen=True, slots=True)
class Retr(Command):
    """``RETR n``."""

    msg: int


@dataclass(frozen=True, slots=True)
class Top(Command):
    """``TOP n lines``."""

    msg: int
    lines: int


@dataclass(frozen=True, slots=True)
class Dele(Command):
    """``DELE n``."""

    msg: int


@dataclass(frozen=True, slots=True)
class Noop(Command):
    """``NOOP``."""


@dataclass(frozen=True, slots=True)
class Rset(Command):
    """``RSET``."""


@dataclass(frozen=True, slots=True)
class Quit(Command):
    """``QUIT``."""


COMMAND_TYPES: Final[tuple[type[Command], ...]] = (
    User,
    Pass,
    Auth,
    AuthResponse,
    Capa,
    Stls,
    Stat,
    List,
    Uidl,
    Retr,
    Top,
    Dele,
    Noop,
    Rset,
    Quit,
)

_KEYWORDS: Final[dict[type[Command], str]] = {
    User: "USER",
    Pass: "PASS",
    Auth: "AUTH",
    AuthResponse: "",
    Capa: "CAPA",
    Stls: "STLS",
    Stat: "STAT",
    List: "LIST",
    Uidl: "UIDL",
    Retr: "RETR",
    Top: "TOP",
    Dele: "DELE",
    Noop: "NOOP",
    Rset: "RSET",
    Quit: "QUIT",
}

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_BASE64: Final = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def keyword(command_type: type[Command]) -> str:
    """The upper-case POP3 keyword of a command type, or its class name if it has none."""
    return _KEYWORDS.get(command_type) or command_type.__name__


def describe(command: Command) -> str:
    """A short name for ``command`` in error messages, free of any secret."""
    match command:
        case List(msg=int() as msg) | Uidl(msg=int() as msg):
            return f"{keyword(type(command))} {msg}"
        case Retr(msg=msg) | Dele(msg=msg):
            return f"{keyword(type(command))} {msg}"
        case Top(msg=msg, lines=lines):
            return f"TOP {msg} {lines}"
        case Auth(mechanism=str() as mechanism) if not _CONTROL.search(mechanism):
            return f"AUTH {mechanism}"
        case AuthResponse():
            return "the AUTH response"
        case _:
            return keyword(type(command))


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise LocalProtocolError(f"{what} must be a str, not {type(value).__name__}")
    if _CONTROL.search(value):
        raise LocalProtocolError(f"{what} contains a control character (command injection)")
    return value


def _word(value: object, what: str) -> str:
    text = _text(value, what)
    if not text or " " in text:
        raise LocalProtocolError(f"{what} must be non-empty and contain no space")
    return text


def _number(value: object, what: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LocalProtocolError(f"{what} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise LocalProtocolError(f"{what} must be >= {minimum}, not {value}")
    return value


def _base64(value: object, what: str) -> str:
    text = _text(value, what)
    if not _BASE64.fullmatch(text):
        raise LocalProtocolError(f"{what} must be base64 text")
    return text


def _arguments(command: Command) -> list[str]:
    match command:
        case User(name=name):
            return [_word(name, "USER name")]
        case Pass(password=password):
            return [_text(password, "PASS password")]
        case Auth(mechanism=mechanism, initial_response=initial):
            args = [_word(mechanism, "AUTH mechanism")]
            if initial is not None:
                # RFC 5034 section 4: an empty initial response is sent as "=".
                if initial == "":
                    raise LocalProtocolError('an empty AUTH initial response is written "="')
                args.append(_base64(initial, "AUTH initial response"))
            return args
        case List(msg=msg) | Uidl(msg=msg):
            return [] if msg is None else [str(_number(msg, "message number", 1))]
        case Retr(msg=msg) | Dele(msg=msg):
            return [str(_number(msg, "message number", 1))]
        case Top(msg=msg, lines=lines):
            return [str(_number(msg, "message number", 1)), str(_number(lines, "TOP lines", 0))]
        case _:
            return []


def encode(command: Command) -> bytes:
    """Validate ``command`` and return its wire form, CRLF included.

    The connection has already checked that the state allows the command.
    """
    if isinstance(command, AuthResponse):
        data = command.data
        if data != "*":
            _base64(data, "AUTH response")
        wire = _text(data, "AUTH response").encode("ascii") + b"\r\n"
        limit, name = MAX_SASL_RESPONSE, "MAX_SASL_RESPONSE"
    else:
        line = " ".join([keyword(type(command)), *_arguments(command)])
        try:
            wire = line.encode("utf-8") + b"\r\n"
        except UnicodeEncodeError:
            raise LocalProtocolError(f"{describe(command)}: argument is not encodable") from None
        limit, name = MAX_COMMAND_LENGTH, "MAX_COMMAND_LENGTH"
    if len(wire) > limit:
        raise LocalProtocolError(
            f"{describe(command)} is {len(wire)} octets, over {name} ({limit} octets)"
        )
    return wire
