"""The floor client's response scanner."""

from __future__ import annotations

import pytest

from bench.floor import FloorError, ResponseScanner

MESSAGES = [b"Subject: one\r\n\r\nbody\r\n", b"", b"..dot stuffed\r\n..\r\n...\r\n"]
STREAM = b"".join(b"+OK %d octets\r\n" % len(m) + m + b".\r\n" for m in MESSAGES)


def feed(chunks: list[bytes]) -> ResponseScanner:
    scanner = ResponseScanner()
    for chunk in chunks:
        scanner.feed(chunk)
    return scanner


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
    scanner = feed([b"+OK\r\nline\r\n.", b"\r"])
    assert scanner.completed == 0
    scanner.feed(b"\n")
    assert scanner.completed == 1


def test_error_reply_raises() -> None:
    """An -ERR in place of a RETR reply stops the floor with the server's text."""
    with pytest.raises(FloorError, match="no such message"):
        feed([b"-ERR no such message\r\n"])
