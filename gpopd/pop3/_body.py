"""Streaming dot-unstuffing of RETR/TOP content (RFC 1939 section 3).

This is the hot path: a mailbox can be hundreds of megabytes, so the content
is never split into lines in Python.  Each call works on at most ``SLICE``
bytes at the front of the receive buffer, in place (bytes methods with
offsets, no copy of the slice), and copies out only the content it decodes.
``"\\n."`` is rare in mail, so the loop over dot lines is short; line ends
are normalised by one bytes.replace over the content.  Only the bytes whose
meaning depends on what comes next stay in the buffer: a trailing CR (maybe
half of a CRLF) and a trailing line start of ``"."`` or ``".\\r"`` (maybe the
terminator).

A content line's length is tracked only for the unterminated line at the
end of each slice: a complete line inside one slice is shorter than the
slice, hence far below ``MAX_CONTENT_LINE``.
"""

from __future__ import annotations

import re
from typing import Final

from ._buffer import ReceiveBuffer
from ._errors import RemoteProtocolError
from ._limits import MAX_CONTENT_LINE

SLICE: Final = 256 * 1024

# Dots not at a line start tolerated per slice before _next_dot switches
# from memchr to the regular expression.
_DOT_MISSES: Final = 4

_LINE_START_DOT: Final = re.compile(rb"\n\.")

_LF: Final = 0x0A
_CR: Final = 0x0D

# What a line-start dot turns out to be.
_STUFFED: Final = 0
_AMBIGUOUS: Final = -1
# Any positive value: the dot ends the message, and the value is the index
# just past the terminator line.


def _classify_dot(s: bytes, j: int, n: int) -> int:
    """Classify the line-start dot at ``s[j]``, the content ending at ``n``."""
    if j + 1 == n:
        return _AMBIGUOUS
    after = s[j + 1]
    if after == _LF:
        return j + 2
    if after == _CR:
        if j + 2 == n:
            return _AMBIGUOUS
        if s[j + 2] == _LF:
            return j + 3
    return _STUFFED


def _next_dot(s: bytes, start: int, end: int, misses: int) -> tuple[int, int]:
    """Find the next line-start dot in ``s[start:end]``, never at ``start``.

    ``start`` is either the front of the slice, whose line start the caller
    knows, or just past a dot already classified, which is not a line start.

    Returns its index (or -1) and the misses still allowed.  A one-byte
    search runs at memchr speed while a two-byte one does not; in base64
    bodies, the bulk of mail, the only dots are the stuffed ones.  Once text
    full of dots has used up ``misses``, a regular expression takes over:
    for this two-byte pattern ``re`` scans about twice as fast as
    ``bytes.find``.
    """
    if misses > 0:
        i = s.find(b".", start + 1, end)
        while i > 0 and s[i - 1] != _LF:
            misses -= 1
            if not misses:
                start = i
                break
            i = s.find(b".", i + 1, end)
        else:
            return i, misses
    found = _LINE_START_DOT.search(s, start, end)
    return (-1 if found is None else found.start() + 1), 0


class Unstuffer:
    """Turns the byte-stuffed body of one RETR/TOP reply into plain content."""

    __slots__ = ("_at_line_start", "_line_length")

    def __init__(self) -> None:
        # The +OK line has just ended, so the content starts a line.
        self._at_line_start = True
        # Octets of the current line already consumed, when it is unfinished.
        self._line_length = 0

    def feed(self, buffer: ReceiveBuffer) -> tuple[bytes, bool]:
        """Consume what can be decided from the front of ``buffer``.

        Returns the content decoded from it (possibly empty) and whether the
        terminator was reached; bytes after the terminator stay in ``buffer``.
        """
        # Offsets into the buffer's own bytes, no copy of the slice: a read
        # often holds dozens of small messages after this one.
        s, front, end = buffer.view(SLICE)
        pieces: list[bytes] = []
        pos = front  # start of the next piece of content to keep
        done = False
        misses = _DOT_MISSES
        if self._at_line_start and s.startswith(b".", front, end):
            j = front
        else:
            j, misses = _next_dot(s, front, end, misses)
        while j >= 0:
            kind = _classify_dot(s, j, end)
            if kind == _STUFFED:
                pieces.append(s[pos:j])
                pos = j + 1
                j, misses = _next_dot(s, j, end, misses)
                continue
            content_end = j
            done = kind != _AMBIGUOUS
            consumed = kind if done else j
            break
        else:
            content_end = end
            if s[end - 1] == _CR:
                # Possibly the first half of a CRLF split across reads.
                content_end -= 1
            consumed = content_end
        pieces.append(s[pos:content_end])
        if content_end > front:
            self._track_line_length(s, front, content_end)
            self._at_line_start = s[content_end - 1] == _LF
        buffer.consume(consumed - front)
        # One pass, no object per line: on the mixed test corpus (18 MB)
        # bytes.replace takes 2.5 ms a MB where split+join took 5.8.
        return b"".join(pieces).replace(b"\r\n", b"\n"), done

    def _track_line_length(self, s: bytes, front: int, end: int) -> None:
        last = s.rfind(b"\n", front, end)
        if last < 0:
            self._line_length += end - front
        else:
            if self._line_length + last - front > MAX_CONTENT_LINE:
                # The line finished here may have started slices ago.
                first = s.find(b"\n", front, end)
                crlf = first > front and s[first - 1] == _CR
                _check(self._line_length + first - front - crlf)
            self._line_length = end - last - 1
        _check(self._line_length)


def _check(length: int) -> None:
    if length > MAX_CONTENT_LINE:
        raise RemoteProtocolError(
            f"message content line over MAX_CONTENT_LINE ({MAX_CONTENT_LINE} octets)"
        )
