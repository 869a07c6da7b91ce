"""Deterministic test messages: edge cases, realistic mixes and fixed-size fillers.

Every generator is seeded, needs no network and returns the same bytes for the
same arguments on every run.  Messages use LF line ends, as stored in a Maildir.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import random
from collections.abc import Iterable

BASE_DATE = dt.datetime(2024, 3, 1, 9, 30, tzinfo=dt.UTC)
SMALL_RANGE = (2_000, 50_000)
LARGE_RANGE = (200_000, 1_700_000)
LARGE_SHARE = 0.10  # 90 % at ~26 KB and 10 % at ~950 KB: about 120 KB on average
PLAIN_SHARE = 0.33  # of the small messages, as most real mail is plain text
PLAIN_ONLY_BELOW = 8_000  # too small for a useful attachment
BIG_MESSAGE_BYTES = 10 * 1024 * 1024
BASE64_LINE = 76  # RFC 2045 line length of base64 text
BASE64_LINE_RAW = BASE64_LINE * 3 // 4  # 57 raw bytes fill one line
POOL_LINES = 65_536  # 5 MB of base64 text shared by the attachments of one seed
TEXT_WIDTH = 72
PROSE_LINES = 4_096
MIN_SMALL_SIZE = 1024

_WORD_TEXT = (
    "account agenda answer archive budget calendar change client config daemon "
    "deadline delivery draft estimate feedback folder invoice issue mailbox meeting "
    "message minutes network notice offer order outage planning policy project "
    "proposal quarter quote release reminder report request review schedule server "
    "service status summary support ticket timeline travel update upgrade vendor the "
    "a and of to in for on with at by from about after before into over under please "
    "thanks regards kindly attached below above soon today tomorrow next week"
)
_WORDS = tuple(_WORD_TEXT.split())
_NAMES = (
    "Alice Archer",
    "Bob Baker",
    "Carol Chen",
    "Dan Dubois",
    "Erin Eriksen",
    "Femi Fashola",
    "Grace Gomez",
    "Hiro Hayashi",
)


def _date(index: int) -> str:
    moment = BASE_DATE + dt.timedelta(seconds=97 * index)
    return moment.strftime("%a, %d %b %Y %H:%M:%S +0000")


def _headers(seed: int, index: int, subject: str, extra: Iterable[str]) -> bytes:
    """A realistic header block; From/To/Subject/Date/Message-ID differ per message."""
    rng = random.Random(f"headers:{seed}:{index}")
    sender = rng.choice(_NAMES)
    login = sender.split()[0].lower()
    lines = [
        f"Return-Path: <{login}@example.net>",
        f"Received: from mx{rng.randint(1, 9)}.example.net"
        f" (mx.example.net [192.0.2.{index % 250 + 1}])\n"
        f"\tby mail.example.org with ESMTPS id {rng.getrandbits(64):016x}\n"
        f"\tfor <alice@example.org>; {_date(index)}",
        f"From: {sender} <{login}.{index}@example.net>",
        f"To: Alice <alice+{seed}.{index}@example.org>",
        f"Subject: {subject}",
        f"Date: {_date(index)}",
        f"Message-ID: <{seed}.{index}.{rng.getrandbits(48):012x}@corpus.gpopd.test>",
        "MIME-Version: 1.0",
        *extra,
    ]
    return ("\n".join(lines) + "\n").encode()


@functools.lru_cache(maxsize=1)
def _prose_lines() -> tuple[bytes, ...]:
    """PROSE_LINES lines of word salad wrapped at TEXT_WIDTH, each ending in LF."""
    rng = random.Random("prose")
    lines = []
    for _ in range(PROSE_LINES):
        line = " ".join(rng.choices(_WORDS, k=rng.randint(6, 11))).capitalize() + "."
        while len(line) > TEXT_WIDTH:
            line = line[:-1].rsplit(" ", 1)[0] + "."
        lines.append(line.encode() + b"\n")
    return tuple(lines)


def _text(rng: random.Random, size: int) -> bytes:
    """At least ``size`` bytes of prose, whole lines, from a random place in the pool."""
    lines = _prose_lines()
    position = rng.randrange(PROSE_LINES)
    pieces = []
    total = 0
    while total < size:
        pieces.append(lines[position])
        total += len(lines[position])
        position = (position + 1) % PROSE_LINES
    return b"".join(pieces)


@functools.lru_cache(maxsize=4)
def _base64_pool(seed: int) -> bytes:
    """POOL_LINES full lines of base64 text encoding seeded random bytes."""
    raw = random.Random(f"pool:{seed}").randbytes(POOL_LINES * BASE64_LINE_RAW)
    encoded = base64.b64encode(raw)
    return b"".join(
        encoded[start : start + BASE64_LINE] + b"\n"
        for start in range(0, len(encoded), BASE64_LINE)
    )


def _base64_block(rng: random.Random, seed: int, encoded_size: int) -> bytes:
    """Whole lines of valid base64 text, about ``encoded_size`` bytes.

    Encoding fresh random bytes for each attachment would cost seconds per
    corpus; a seeded pool cut at a random line is as valid and as incompressible.
    """
    pool = _base64_pool(seed)
    stride = BASE64_LINE + 1
    needed = max(0, encoded_size // stride)
    position = rng.randrange(POOL_LINES)
    pieces = []
    while needed:
        take = min(needed, POOL_LINES - position)
        pieces.append(pool[position * stride : (position + take) * stride])
        needed -= take
        position = 0
    return b"".join(pieces)


def _multipart(seed: int, index: int, size: int, subject: str) -> bytes:
    """A text part plus a base64 attachment, about ``size`` bytes in all."""
    rng = random.Random(f"body:{seed}:{index}:{size}")
    boundary = f"=_gpopd_{seed}_{index}_{rng.getrandbits(32):08x}"
    head = _headers(
        seed, index, subject, (f'Content-Type: multipart/mixed; boundary="{boundary}"',)
    )
    part1 = (
        f"\nThis is a multi-part message in MIME format.\n\n--{boundary}\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "Content-Transfer-Encoding: 7bit\n\n"
    ).encode() + _text(rng, min(2_000, max(200, size // 10)))
    name = f"file-{seed}-{index}.bin"
    part2_head = (
        f"\n--{boundary}\n"
        f'Content-Type: application/octet-stream; name="{name}"\n'
        "Content-Transfer-Encoding: base64\n"
        f'Content-Disposition: attachment; filename="{name}"\n\n'
    ).encode()
    tail = f"\n--{boundary}--\n".encode()
    room = size - len(head) - len(part1) - len(part2_head) - len(tail)
    return head + part1 + part2_head + _base64_block(rng, seed, room) + tail


def _plain(seed: int, index: int, size: int, subject: str) -> bytes:
    """A text/plain message of exactly ``size`` bytes (if the headers fit)."""
    rng = random.Random(f"plain:{seed}:{index}:{size}")
    extra = ("Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit")
    head = _headers(seed, index, subject, extra) + b"\n"
    room = size - len(head)
    if room <= 0:
        return head
    body = _text(rng, room)[:room]
    return head + body[:-1] + b"\n"


def attachment_message(size_bytes: int, seed: int) -> bytes:
    """One message of about ``size_bytes`` carrying a base64 attachment."""
    return _multipart(seed, 0, size_bytes, f"attachment of {size_bytes} bytes ({seed})")


def small_corpus(count: int, seed: int, size: int = 4096) -> list[bytes]:
    """``count`` distinct text messages of exactly ``size`` bytes each."""
    if size < MIN_SMALL_SIZE:
        raise ValueError(f"size must be at least {MIN_SMALL_SIZE} bytes to hold the headers")
    return [_plain(seed, index, size, f"small {seed}/{index}") for index in range(count)]


def mixed_corpus(count: int, seed: int, *, big: int = 0) -> list[bytes]:
    """``count`` realistic messages, mostly 2-50 KB, some up to ~2 MB (~120 KB mean).

    ``big`` of them, at seeded positions, are BIG_MESSAGE_BYTES (10 MiB) instead.
    Without ``big``, a shorter corpus is a prefix of a longer one.
    """
    big_positions = set(random.Random(f"big:{seed}").sample(range(count), min(big, count)))
    messages = []
    for index in range(count):
        rng = random.Random(f"mixed:{seed}:{index}")
        if index in big_positions:
            size = BIG_MESSAGE_BYTES
        elif rng.random() < LARGE_SHARE:
            size = rng.randint(*LARGE_RANGE)
        else:
            size = rng.randint(*SMALL_RANGE)
        subject = f"{' '.join(rng.choices(_WORDS, k=4))} ({seed}/{index})"
        if size < PLAIN_ONLY_BELOW or (size < SMALL_RANGE[1] and rng.random() < PLAIN_SHARE):
            messages.append(_plain(seed, index, size, subject))
        else:
            messages.append(_multipart(seed, index, size, subject))
    return messages


def edge_case_named() -> dict[str, bytes]:
    """The messages of :func:`edge_case_messages`, keyed by what each exercises."""

    def message(index: int, name: str, body: bytes) -> bytes:
        extra = ("Content-Type: text/plain; charset=us-ascii",)
        return _headers(0, 900 + index, f"edge case: {name}", extra) + b"\n" + body

    utf8 = (
        "From: Zoë Ünïcödé <zoe@example.org>\n"
        "To: Алиса <alice@example.org>\n"
        "Subject: Grüße — 日本語のテスト ✓\n"
        f"Date: {_date(901)}\n"
        "Message-ID: <utf8.901@corpus.gpopd.test>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
        "Ünïcödé bödy — ✓ 日本語\n"
    ).encode()
    long_line = bytes(random.Random("line_200000").choices(b"abcdefghij", k=200_000))
    return {
        "dot_lines": message(0, "dot_lines", b"Dots:\n.\n..\n...\n.hidden\n. x\nend\n.\n"),
        "utf8": utf8,
        "line_998": message(2, "line_998", b"x" * 998 + b"\nafter the long line\n"),
        "line_200000": message(3, "line_200000", long_line + b"\n"),
        "nul_and_ff": message(4, "nul_and_ff", b"nul: \x00, ff: \xff\n\x00\x00\xff\xfe\x80\n"),
        "no_trailing_newline": message(5, "no_trailing_newline", b"one\nlast line, no LF"),
        "from_lines": message(
            6,
            "from_lines",
            b"From here.\nFrom bob Mon Jan  1 00:00:00 2024\n>From quoted.\n>>From twice.\n",
        ),
        "bare_cr": message(7, "bare_cr", b"left\rright, one line\nnext line\n"),
        "empty_body": message(8, "empty_body", b""),
        "crlf_source": message(9, "crlf_source", b"stored\nwith CRLF\n").replace(b"\n", b"\r\n"),
    }


def edge_case_messages() -> list[bytes]:
    """Messages that break naive POP3 clients (dots, 8-bit, long lines, NUL, ...)."""
    return list(edge_case_named().values())


def expected_delivery(message: bytes) -> bytes:
    """What a correct client stores for a message Dovecot holds as ``message``.

    Checked against Dovecot 2.3.19 by RETR over a raw socket (see
    tests/test_support_dovecot.py): it sends every bare LF as CRLF, leaves a
    bare CR inside a line and NUL/0xFF bytes untouched, and ends a message
    that lacks a final newline with an added CRLF before the terminating ".".
    A client that stores LF line ends therefore keeps every byte, except that
    CRLF becomes LF and a final LF appears where the source had none.
    """
    data = message.replace(b"\r\n", b"\n")
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data
