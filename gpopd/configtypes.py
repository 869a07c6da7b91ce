"""The field types of the configuration models and the parsers behind them.

Durations are stored as ``float`` seconds (what asyncio takes); sizes as
``int`` bytes with K/M/G meaning powers of 1024.  Every check raises a
``PydanticCustomError`` so that the loader reports it at the key's line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from gpopd.secrets import AbsolutePath, UnreadableFile, read_regular_file

MAX_CONFIG_BYTES = 1024 * 1024

ACCOUNT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

TlsMode = Literal["implicit", "starttls", "none"]
# Hosts that may be reached without TLS: nothing leaves this machine.
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})

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


def check_text(value: str) -> str:
    if not value:
        raise PydanticCustomError("text_empty", "must not be empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise PydanticCustomError("text_control", "must not contain control characters")
    return value


def _check_host(value: str) -> str:
    check_text(value)
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
Text = Annotated[str, AfterValidator(check_text)]
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


class ConfigModel(BaseModel):
    """Base of every configuration section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
