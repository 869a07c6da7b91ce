"""Trace headers prepended to a message, only when ``add_headers`` asks for them.

They are written before the first byte of the message; the message itself is
never parsed, re-serialised or re-folded.  Every value that comes from the
server or the configuration is reduced to printable ASCII without CR, LF or
other control characters, so nothing can inject a header line.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Collection
from email.utils import formatdate

from gpopd import __version__

_UNSAFE = re.compile(r"[^\x21-\x7e ]+")
# RFC 5322 keeps lines under 998 octets; a UID is at most 70, a host 255.
_MAX_VALUE = 400


def clean(value: str) -> str:
    """``value`` as printable ASCII: controls (CR, LF, NUL...) and non-ASCII become "?"."""
    return _UNSAFE.sub("?", value).strip()[:_MAX_VALUE]


def trace_headers(
    wanted: Collection[str],
    *,
    host: str,
    tls: str,
    username: str,
    uid: str,
    key: str,
    when: float | None = None,
    local_host: str | None = None,
) -> bytes:
    """The requested header lines, LF-terminated, in a fixed order."""
    lines: list[str] = []
    if "received" in wanted:
        protocol = "POP3" if tls == "none" else "POP3S"
        server = clean(host)
        lines.append(
            f"Received: from {server} ({server})\n"
            f"\tby {clean(local_host or socket.getfqdn())} (gpopd {__version__})"
            f" with {protocol} id {key[:16]}\n"
            f"\tfor <{clean(username)}>; {formatdate(when, localtime=False)}"
        )
    if "delivered_to" in wanted:
        lines.append(f"Delivered-To: {clean(username)}")
    if "uidl" in wanted:
        lines.append(f"X-Gpopd-UIDL: {clean(uid)}")
    if "key" in wanted:
        lines.append(f"X-Gpopd-Key: {key}")
    return "".join(line + "\n" for line in lines).encode("ascii")
