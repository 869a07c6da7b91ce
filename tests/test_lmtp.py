"""LMTP delivery against Dovecot's LMTP, aiosmtpd's LMTP and a scripted server."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpopd.config import LmtpDelivery
from gpopd.delivery.base import CommitResult, MessageInfo, message_key
from gpopd.delivery.lmtp import MAX_REPLY_LINE, DotStuffer, LmtpDestination
from gpopd.delivery.relay import EIGHT_BIT_REFUSED, RelayCommitResult, RelayStaged
from gpopd.delivery.spool import CHUNK_SIZE
from gpopd.errors import PermanentDeliveryError, TemporaryDeliveryError
from tests.support.dovecot import Dovecot, free_port
from tests.support.smtpd import RecordingHandler, RunningServer, ScriptedLmtp, running_server

ACCOUNT = "carol@example.com"
A, B = "a@example.net", "b@example.net"
PLAIN = b"From: Sender <sender@example.org>\nSubject: hello\n\nbody line\n"
TRICKY = (
    b"From: sender@example.org\nSubject: dots \xc3\xa9\n\n"
    b".\n..\n.leading dot\n...\nmid.dle\n\n.\n\xe2\x98\x83 8-bit\nlast line\n"
)


def crlf(data: bytes) -> bytes:
    return re.sub(rb"\r\n|\n|\r", b"\r\n", data)


def stuffed(data: bytes) -> bytes:
    """The reference wire form of DATA: CRLF everywhere, leading dots doubled, then "."."""
    wire = re.sub(rb"(?m)^\.", b"..", crlf(data))
    if wire and not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    return wire + b".\r\n"


def config(**fields: Any) -> LmtpDelivery:
    values: dict[str, Any] = {"type": "lmtp", "host": "127.0.0.1", "recipient": [A], "timeout": 5}
    values.update(fields)
    return LmtpDelivery.model_validate(values)


def destination(cfg: LmtpDelivery) -> LmtpDestination:
    return LmtpDestination(cfg, local_hostname="client.test")


def stage(dest: LmtpDestination, uid: str, content: bytes, chunk: int = 5) -> RelayStaged:
    writer = dest.open(MessageInfo(ACCOUNT, uid, message_key(ACCOUNT, uid), len(content)))
    for start in range(0, len(content), chunk):
        writer.write(content[start : start + chunk])
    staged = writer.finish()
    assert isinstance(staged, RelayStaged)
    return staged


async def commit(dest: LmtpDestination, *contents: bytes, first: int = 0) -> list[CommitResult]:
    staged = [stage(dest, str(first + n), content) for n, content in enumerate(contents)]
    return await dest.commit(staged)


@pytest.fixture
def lmtp_server() -> Iterator[RunningServer]:
    with running_server(lmtp=True) as running:
        yield running


# -- dot-stuffing and line ends ------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "wire"),
    [
        ([b".\n"], b"..\r\n.\r\n"),
        ([b"a\n", b".\n"], b"a\r\n..\r\n.\r\n"),
        ([b"a\r", b"\n.b\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"a\r", b"b\n"], b"a\r\nb\r\n.\r\n"),
        ([b"a", b".b\n"], b"a.b\r\n.\r\n"),
        ([b"x\n.", b".\n"], b"x\r\n...\r\n.\r\n"),
        ([b"no newline"], b"no newline\r\n.\r\n"),
        ([b"ends in cr\r"], b"ends in cr\r\n.\r\n"),
        ([b""], b".\r\n"),
    ],
)
def test_dot_stuffer_examples(chunks: list[bytes], wire: bytes) -> None:
    """Line ends and leading dots split across chunks come out as one wire form."""
    stuffer = DotStuffer()
    assert b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish() == wire


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_dot_stuffer_is_independent_of_chunking(data: bytes, cuts: list[int]) -> None:
    """Any split of the content gives the reference wire form, which unstuffs to the content."""
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(p) for p in pieces) + stuffer.finish()
    assert wire == stuffed(data)
    # No bare CR or LF, and the only end-of-data mark is the last one.
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3
    body = wire[:-3]
    unstuffed = b"".join(
        line[1:] if line.startswith(b".") else line for line in body.splitlines(keepends=True)
    )
    expected = crlf(data)
    assert unstuffed == (expected if expected.endswith(b"\r\n") or not data else expected + b"\r\n")


async def test_wire_form_across_spool_chunks() -> None:
    """A CR ending one spool chunk and a dot starting the next are handled on the wire."""
    content = b"Subject: big\n\n" + b"x" * (CHUNK_SIZE - 15) + b"\r" + b"\n.\n.\nend\n"
    assert content[CHUNK_SIZE - 1 : CHUNK_SIZE + 1] == b"\r\n"
    async with ScriptedLmtp() as server:
        dest = destination(config(port=server.port))
        (result,) = await commit(dest, content, first=0)
        await dest.close()
    assert result.ok
    assert server.data == [stuffed(content)]


async def test_wire_form_of_tricky_content() -> None:
    """Dot lines, a line "." alone and 8-bit bytes are stuffed and sent with BODY=8BITMIME."""
    content = TRICKY + b"bare\rcr\ncrlf\r\n"
    async with ScriptedLmtp() as server:
        dest = destination(config(port=server.port))
        (result,) = await commit(dest, content)
        await dest.close()
    assert result.ok
    assert server.data == [stuffed(content)]
    mail = next(c for c in server.commands if c.startswith(b"MAIL"))
    assert mail == b"MAIL FROM:<sender@example.org> BODY=8BITMIME\r\n"


# -- Dovecot -----------------------------------------------------------------


def stored_form(content: bytes) -> bytes:
    """What Dovecot keeps of ``content``: LF line ends."""
    return re.sub(rb"\r\n|\r", b"\n", content)


async def test_dovecot_stores_the_message(dovecot: Dovecot) -> None:
    """Dovecot's LMTP stores the exact content under its own trace headers."""
    dest = destination(config(port=dovecot.lmtp_port, recipient=["alice"]))
    results = await commit(dest, TRICKY, PLAIN)
    await dest.close()
    assert all(result.ok for result in results)
    stored = dovecot.messages("alice")
    assert len(stored) == 2
    assert stored[0].endswith(b"\n" + stored_form(TRICKY))
    assert stored[0].startswith(b"Return-Path: <sender@example.org>\n")
    assert stored[1].endswith(b"\n" + stored_form(PLAIN))


async def test_dovecot_over_its_unix_socket(dovecot: Dovecot) -> None:
    """Delivery works over Dovecot's LMTP Unix socket."""
    path = dovecot.base_dir / "run" / "lmtp"
    dest = destination(config(host=None, socket=str(path), recipient=["alice"]))
    (result,) = await commit(dest, PLAIN)
    await dest.close()
    assert result.ok, result.error
    assert dest.name == f"lmtp:{path}"
    (stored,) = dovecot.messages("alice")
    assert stored.endswith(b"\n" + PLAIN)


async def test_dovecot_unknown_user_is_refused_the_other_delivered(dovecot: Dovecot) -> None:
    """One unknown user (550) and one known: delivered to alice, the refusal in the warning."""
    dest = destination(config(port=dovecot.lmtp_port, recipient=["nosuchuser", "alice"]))
    (result,) = await commit(dest, PLAIN)
    await dest.close()
    assert result.ok
    assert isinstance(result, RelayCommitResult)
    assert result.warning is not None
    assert "<nosuchuser>: 550" in result.warning
    assert len(dovecot.messages("alice")) == 1


async def test_dovecot_only_unknown_users_is_permanent(dovecot: Dovecot) -> None:
    """When Dovecot knows none of the recipients the failure is permanent."""
    dest = destination(config(port=dovecot.lmtp_port, recipient=["nosuchuser"]))
    (result,) = await commit(dest, PLAIN)
    await dest.close()
    assert isinstance(result.error, PermanentDeliveryError)
    assert "550" in str(result.error)
    assert dovecot.message_count("alice") == 0


# -- per-recipient replies (aiosmtpd LMTP) -------------------------------------


async def test_deferred_recipient_after_data_is_temporary_then_delivered() -> None:
    """250 for one and 451 for the other makes the message temporary; the next commit delivers."""
    handler = RecordingHandler(lmtp_replies={B: ["451 4.2.0 mailbox locked"]})
    with running_server(handler, lmtp=True) as server:
        dest = destination(config(port=server.port, recipient=[A, B]))
        (first,) = await commit(dest, PLAIN)
        (second,) = await commit(dest, PLAIN)
        await dest.close()
    assert isinstance(first.error, TemporaryDeliveryError)
    text = str(first.error)
    assert f"<{A}>: 250" in text
    assert f"<{B}>: 451 4.2.0 mailbox locked" in text
    assert "again" in text
    assert second.ok
    # At least once: A got the first attempt too.
    assert [r.recipients for r in server.received] == [(A,), (A,), (B,)]


async def test_refused_recipient_after_data_is_a_warning() -> None:
    """A 550 for one recipient after the data still counts as delivered to the other."""
    handler = RecordingHandler(lmtp_replies={B: ["550 5.2.2 over quota"]})
    with running_server(handler, lmtp=True) as server:
        dest = destination(config(port=server.port, recipient=[A, B]))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert result.ok
    assert isinstance(result, RelayCommitResult)
    assert result.warning is not None
    assert f"<{B}>: 550 5.2.2 over quota" in result.warning
    assert [r.recipients for r in server.received] == [(A,)]


async def test_every_recipient_refused_after_data_is_permanent() -> None:
    """5xx for every recipient after the data is a permanent failure."""
    handler = RecordingHandler(lmtp_replies={A: ["554 5.6.0 no"], B: ["552 5.2.2 full"]})
    with running_server(handler, lmtp=True) as server:
        dest = destination(config(port=server.port, recipient=[A, B]))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert isinstance(result.error, PermanentDeliveryError)
    assert "554 5.6.0 no" in str(result.error)
    assert "552 5.2.2 full" in str(result.error)


async def test_deferred_recipient_at_rcpt_sends_nothing() -> None:
    """A 4xx at RCPT holds the message back for every recipient: no DATA at all."""
    handler = RecordingHandler(refuse={B: "450 4.2.1 try later"})
    with running_server(handler, lmtp=True) as server:
        dest = destination(config(port=server.port, recipient=[A, B]))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert isinstance(result.error, TemporaryDeliveryError)
    assert "450 4.2.1 try later" in str(result.error)
    assert server.received == []


@pytest.mark.parametrize("pipelining", [False, True])
async def test_one_connection_for_the_whole_poll(pipelining: bool) -> None:
    """Several commits share one LMTP connection, lock-step or pipelined, closed by QUIT."""
    handler = RecordingHandler(pipelining=pipelining)
    with running_server(handler, lmtp=True) as server:
        dest = destination(config(port=server.port, recipient=[A, B]))
        results = await commit(dest, PLAIN, TRICKY)
        results += await commit(dest, PLAIN, first=2)
        await dest.close()
        await asyncio.sleep(0.05)
    assert all(result.ok for result in results)
    assert len(server.received) == 6
    assert server.handler.sessions == 1
    assert server.handler.quits == 1
    assert server.received[2].content == crlf(TRICKY)


async def test_reconnects_once_after_the_server_dropped_the_connection(
    lmtp_server: RunningServer,
) -> None:
    """A connection closed by the server between messages is replaced by a new one."""
    dest = destination(config(port=lmtp_server.port))
    (first,) = await commit(dest, PLAIN)
    lmtp_server.drop_connection()
    await asyncio.sleep(0.1)
    (second,) = await commit(dest, PLAIN, first=1)
    await dest.close()
    assert first.ok
    assert second.ok
    assert [r.session for r in lmtp_server.received] == [0, 1]


async def test_eight_bit_without_8bitmime_is_permanent() -> None:
    """A server without 8BITMIME gets no 8-bit message."""
    with running_server(RecordingHandler(offer_8bitmime=False), lmtp=True) as server:
        dest = destination(config(port=server.port))
        eight, seven = await commit(dest, TRICKY, PLAIN)
        await dest.close()
    assert isinstance(eight.error, PermanentDeliveryError)
    assert EIGHT_BIT_REFUSED in str(eight.error)
    assert seven.ok
    assert len(server.received) == 1


async def test_unix_socket(tmp_path: Path) -> None:
    """LMTP over a Unix socket delivers like TCP."""
    path = tmp_path / "lmtp.sock"
    with running_server(lmtp=True, unix_socket=path) as server:
        dest = destination(config(host=None, socket=str(path)))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert result.ok
    assert [r.content for r in server.received] == [crlf(PLAIN)]


# -- broken servers ------------------------------------------------------------


async def test_server_down_fails_the_whole_window_temporarily() -> None:
    """Connection refused makes every message of the window temporary."""
    dest = destination(config(port=free_port()))
    results = await commit(dest, PLAIN, PLAIN)
    await dest.close()
    assert len(results) == 2
    assert all(isinstance(r.error, TemporaryDeliveryError) for r in results)
    assert all("unreachable" in str(r.error) for r in results)


async def test_missing_unix_socket_is_temporary(tmp_path: Path) -> None:
    """A Unix socket that does not exist (server stopped) is a temporary failure."""
    dest = destination(config(host=None, socket=str(tmp_path / "absent.sock")))
    (result,) = await commit(dest, PLAIN)
    assert isinstance(result.error, TemporaryDeliveryError)


async def test_refusing_greeting_is_permanent() -> None:
    """A 554 greeting fails the window permanently with the server's words."""
    async with ScriptedLmtp(greeting=b"554 5.3.2 not accepting mail\r\n") as server:
        dest = destination(config(port=server.port))
        results = await commit(dest, PLAIN, PLAIN)
        await dest.close()
    for result in results:
        assert isinstance(result.error, PermanentDeliveryError)
        assert "554 5.3.2 not accepting mail" in str(result.error)


async def test_multi_line_replies_are_read_whole() -> None:
    """Multi-line greeting, LHLO and RCPT replies are each one reply."""
    async with ScriptedLmtp(
        greeting=b"220-first line\r\n220-second line\r\n220 ready\r\n",
        replies={b"RCPT": b"250-accepted\r\n250 2.1.5 really\r\n"},
    ) as server:
        dest = destination(config(port=server.port, recipient=[A, B]))
        results = await commit(dest, PLAIN, PLAIN)
        await dest.close()
    # The scripted server answers one line after the data: the second
    # recipient's reply is missing, so the outcome stays undecided.
    assert all(isinstance(r.error, TemporaryDeliveryError) for r in results)
    assert "no reply" in str(results[0].error)


async def test_overlong_reply_line_is_refused() -> None:
    """A reply line longer than the limit ends the session without reading it all."""
    line = b"250 " + b"x" * (MAX_REPLY_LINE * 4) + b"\r\n"
    async with ScriptedLmtp(replies={b"MAIL": line}) as server:
        dest = destination(config(port=server.port))
        results = await commit(dest, PLAIN, PLAIN)
        await dest.close()
    for result in results:
        assert isinstance(result.error, TemporaryDeliveryError)
        assert "longer than" in str(result.error)
    assert server.data == []


async def test_garbage_reply_is_a_protocol_error() -> None:
    """A reply without a code is a temporary failure, not a crash."""
    async with ScriptedLmtp(replies={b"MAIL": b"hello there\r\n"}) as server:
        dest = destination(config(port=server.port))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert isinstance(result.error, TemporaryDeliveryError)
    assert "not a reply line" in str(result.error)


async def test_silence_after_the_data_is_temporary_and_says_duplicate() -> None:
    """No reply after the final dot: temporary, and the error warns of a possible duplicate."""
    async with ScriptedLmtp(after_data=None) as server:
        dest = destination(config(port=server.port, timeout=0.3))
        results = await asyncio.wait_for(commit(dest, PLAIN, PLAIN), 10)
        await dest.close()
    first, second = results
    assert isinstance(first.error, TemporaryDeliveryError)
    assert "again" in str(first.error)
    assert isinstance(second.error, TemporaryDeliveryError)
    assert len(server.data) == 1  # the second message did not wait another timeout


async def test_lmtp_is_at_least_once() -> None:
    """LMTP cannot recognise earlier deliveries, and says so."""
    dest = destination(config(port=24))
    assert dest.exactly_once is False
    assert await dest.find_delivered(ACCOUNT, [message_key(ACCOUNT, "1")]) == set()


async def test_reconnects_once_when_the_server_closes_at_mail() -> None:
    """A reused connection answered by 421 at MAIL is replaced once, and the message delivered."""
    async with ScriptedLmtp(
        mail_replies=[b"250 ok\r\n", b"421 4.4.2 idle timeout\r\n", b"250 ok\r\n"]
    ) as server:
        dest = destination(config(port=server.port))
        (first,) = await commit(dest, PLAIN)
        (second,) = await commit(dest, PLAIN, first=1)
        await dest.close()
    assert first.ok
    assert second.ok
    assert server.connections == 2
    assert len(server.data) == 2


async def test_no_second_try_on_a_fresh_connection() -> None:
    """A 421 on a connection opened for this very message is not retried."""
    async with ScriptedLmtp(mail_replies=[b"421 4.3.2 shutting down\r\n"] * 3) as server:
        dest = destination(config(port=server.port))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert isinstance(result.error, TemporaryDeliveryError)
    assert "421 4.3.2 shutting down" in str(result.error)
    assert server.connections == 1
    assert server.data == []


async def test_non_ascii_recipient_without_smtputf8_is_permanent() -> None:
    """A non-ASCII recipient cannot be sent to a server without SMTPUTF8."""
    async with ScriptedLmtp() as server:
        dest = destination(config(port=server.port, recipient=["jos\u00e9@example.net"]))
        (result,) = await commit(dest, PLAIN)
        await dest.close()
    assert isinstance(result.error, PermanentDeliveryError)
    assert "SMTPUTF8" in str(result.error)
    assert not any(c.startswith(b"MAIL") for c in server.commands)
