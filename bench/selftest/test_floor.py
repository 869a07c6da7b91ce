"""The floor client's response scanner."""

from __future__ import annotations

import pytest

from bench.floor import FloorError, ResponseScanner

MESSAGES = [b"Subject: one\r\n\r\nbody\r\n", b"", b"..dot stuffed\r\n..\r\n...\r\n"]
STREAM = b"".join(b"+OK %d octets\r\n" % len(m) + m + b".\r\n" for m in MESSAGES)


class Feeder:
    """Hands ``scan`` each chunk after the unread tail of the last, as the client does."""

    def __init__(self) -> None:
        self.scanner = ResponseScanner()
        self._tail = b""

    def feed(self, data: bytes) -> ResponseScanner:
        buffer = self._tail + data
        self._tail = buffer[self.scanner.scan(buffer, len(buffer)) :]
        return self.scanner


def feed(chunks: list[bytes]) -> ResponseScanner:
    feeder = Feeder()
    for chunk in chunks:
        feeder.feed(chunk)
    return feeder.scanner


def test_counts_responses_fed_whole() -> None:
    """A transcript fed in one piece yields one completed response per message."""
    scanner = feed([STREAM])
    assert scanner.completed == len(MESSAGES)


def test_byte_at_a_time_matches_whole() -> None:
    """Feeding one byte at a time gives the same count and byte total as one piece."""
    whole = feed([STREAM])
    split = feed([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert (split.completed, split.body_bytes) == (whole.completed, whole.body_bytes)


def test_body_bytes_are_the_wire_content() -> None:
    """The byte total is every message's content as sent, stuffing included."""
    assert feed([STREAM]).body_bytes == sum(len(m) for m in MESSAGES)


def test_partial_response_is_not_counted() -> None:
    """A response whose terminator has not arrived yet is not counted."""
    feeder = Feeder()
    feeder.feed(b"+OK\r\nline\r\n.")
    assert feeder.feed(b"\r").completed == 0
    assert feeder.feed(b"\n").completed == 1


def test_error_reply_raises() -> None:
    """An -ERR in place of a RETR reply stops the floor with the server's text."""
    with pytest.raises(FloorError, match="no such message"):
        feed([b"-ERR no such message\r\n"])


def test_scan_reads_only_up_to_end_of_a_reused_buffer() -> None:
    """Bytes left past ``end`` by an earlier, longer read are not counted.

    The client reads into one buffer it reuses, so what lies past the fresh
    bytes is stale data, here a whole stale response.
    """
    stale = b"+OK\r\nold\r\n.\r\n"
    chunks = [STREAM[i : i + 7] for i in range(0, len(STREAM), 7)]
    scanner = ResponseScanner()
    buffer = bytearray(64)
    filled = 0
    for chunk in chunks:
        end = filled + len(chunk)
        buffer[filled:end] = chunk
        buffer[end : end + len(stale)] = stale
        keep = scanner.scan(buffer, end)
        buffer[: end - keep] = bytes(buffer[keep:end])
        filled = end - keep
    whole = feed([STREAM])
    assert (scanner.completed, scanner.body_bytes) == (whole.completed, whole.body_bytes)
