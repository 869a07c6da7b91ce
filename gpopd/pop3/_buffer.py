"""The receive buffer.

Bytes from the server are kept as received and only joined when parsed, so
the common case of a read that is parsed completely costs no copy at all:
the RETR hot path hands the very ``bytes`` object it was given to the
unstuffer.
"""

from __future__ import annotations

from ._errors import RemoteProtocolError


class ReceiveBuffer:
    """Unparsed bytes from the server, consumed from the front."""

    __slots__ = ("_chunks", "_data", "_size", "_start")

    def __init__(self) -> None:
        self._data = b""
        self._start = 0  # offset of the first unconsumed byte of _data
        self._chunks: list[bytes] = []  # received after _data, not yet joined
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes at the end."""
        self._chunks.append(bytes(data))
        self._size += len(data)

    def _join(self) -> None:
        if self._chunks:
            if self._start < len(self._data):
                self._chunks.insert(0, self._data[self._start :])
            self._data = b"".join(self._chunks)
            self._start = 0
            self._chunks.clear()

    def peek(self, limit: int) -> bytes:
        """Up to ``limit`` bytes from the front, without consuming them."""
        self._join()
        start = self._start
        return self._data[start : start + limit]

    def view(self, limit: int) -> tuple[bytes, int, int]:
        """The front of the buffer without a copy: ``(data, start, end)``.

        ``data[start:end]`` is what ``peek(limit)`` would return.  Parsers
        that search with offsets use this: slicing a copy of up to ``limit``
        bytes for every 4 KB message of a large read made small messages
        cost as much as large ones.
        """
        self._join()
        start = self._start
        return self._data, start, min(len(self._data), start + limit)

    def consume(self, count: int) -> None:
        """Drop ``count`` bytes from the front; they must have been peeked."""
        self._start += count
        self._size -= count
        if self._start == len(self._data):
            self._data = b""
            self._start = 0

    def take_line(self, limit: int, what: str) -> bytes | None:
        """Remove and return the first line with its line end.

        Returns ``None`` while the line is incomplete; raises once ``limit``
        octets have arrived without a line end, so a server that never ends
        a line makes us hold at most ``limit`` octets plus one read.
        """
        self._join()
        start = self._start
        end = self._data.find(b"\n", start, start + limit)
        if end < 0:
            if self._size >= limit:
                raise RemoteProtocolError(f"{what} ({limit} octets) exceeded without a line end")
            return None
        line = self._data[start : end + 1]
        self.consume(end + 1 - start)
        return line
