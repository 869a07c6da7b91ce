"""The SMTP sink: bulk DATA reading, dot-unstuffing, one file per message and recipient."""

from __future__ import annotations

from pathlib import Path

import aiosmtplib
import pytest

from bench.smtpsink import SmtpSink, local_part, unstuff

MESSAGE = (
    b"From: a@example.test\r\nTo: b@example.test\r\nMessage-ID: <m1@example.test>\r\n"
    b"Subject: dots\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nlast line\r\n"
)


def test_unstuff_removes_one_dot_at_each_line_start() -> None:
    """Only a dot that starts a line is removed, one per line."""
    assert unstuff(b"..a\r\nb.c\r\n...\r\n") == b".a\r\nb.c\r\n..\r\n"


def test_local_part_accepts_plain_names_only() -> None:
    """A recipient names a directory below the root, never a path out of it."""
    assert local_part("s-gpopd-1-f@bench.test") == "s-gpopd-1-f"
    assert local_part("<run@bench.test>") == "run"
    assert local_part("../etc@bench.test") is None
    assert local_part("a/b@bench.test") is None


async def send(sink: SmtpSink, recipients: list[str], message: bytes) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
    async with client:
        await client.sendmail("a@example.test", recipients, message)


async def test_message_is_stored_per_recipient_with_lf_line_ends(tmp_path: Path) -> None:
    """A dot-stuffed message comes out unstuffed, LF-terminated, once per recipient."""
    sink = SmtpSink(tmp_path)
    await sink.start()
    try:
        await send(sink, ["one@bench.test", "two@bench.test"], MESSAGE)
        await send(sink, ["one@bench.test"], MESSAGE.replace(b"m1@", b"m2@"))
    finally:
        await sink.close()
    expected = MESSAGE.replace(b"\r\n", b"\n")
    one = sorted((tmp_path / "one" / "new").iterdir())
    (two,) = (tmp_path / "two" / "new").iterdir()
    assert [path.read_bytes() for path in one] == [expected, expected.replace(b"m1@", b"m2@")]
    assert two.read_bytes() == expected
    assert sink.handler.messages == 2


async def test_large_message_arrives_whole(tmp_path: Path) -> None:
    """A message far larger than the stream reader's limit is read in pieces, byte-exact."""
    body = b"".join(b"line %07d .x\r\n" % n for n in range(200_000))
    message = b"Message-ID: <big@example.test>\r\n\r\n" + body
    sink = SmtpSink(tmp_path)
    await sink.start()
    try:
        await send(sink, ["big@bench.test"], message)
    finally:
        await sink.close()
    (path,) = (tmp_path / "big" / "new").iterdir()
    assert path.read_bytes() == message.replace(b"\r\n", b"\n")


async def test_bad_recipient_is_refused(tmp_path: Path) -> None:
    """A recipient that is not a plain name is refused at RCPT."""
    sink = SmtpSink(tmp_path)
    await sink.start()
    try:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await send(sink, ["../x@bench.test"], MESSAGE)
    finally:
        await sink.close()
    assert sink.handler.messages == 0
