"""The throughput paths: RETR refills in batches, commit windows overlap where safe."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gpopd import fetch, logs, pop3, transfer, transport
from gpopd import session as session_module
from gpopd.config import load_config
from gpopd.delivery.base import CommitResult, Staged
from gpopd.delivery.memory import MemoryDestination
from gpopd.errors import StoreError
from gpopd.fetch import StoreWorker, poll_account, poll_once
from gpopd.store import Store
from gpopd.transport import Transport, make_tls_context
from tests.support.certs import TestPKI
from tests.support.corpus import small_corpus
from tests.support.fakepop import FakePop3
from tests.support.gpopd_config import AccountSpec, write_config
from tests.test_logs import restore_logging
from tests.test_serverinfo import server_context

__all__ = ["restore_logging"]  # an autouse fixture, used by name

SMALL = small_corpus(300, seed=5, size=1024)


def spec_for(server: FakePop3, tmp_path: Path, **changes: Any) -> AccountSpec:
    spec = AccountSpec(
        "alice",
        server.port,
        server.user,
        server.password,
        tmp_path / "Maildir",
        tls="none",
    )
    return dataclasses.replace(spec, **changes)


def record_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write of every Transport from now on, in order."""
    writes: list[bytes] = []
    real_write = Transport.write

    def recording_write(self: Transport, data: bytes) -> None:
        writes.append(bytes(data))
        real_write(self, data)

    monkeypatch.setattr(Transport, "write", recording_write)
    return writes


async def poll_fake(
    tmp_path: Path, messages: Sequence[bytes], **server_options: Any
) -> tuple[fetch.PollResult, FakePop3]:
    """One poll of a fake server holding ``messages``; its result, and the server."""
    async with FakePop3(messages, **server_options) as server:
        settings = load_config(write_config(tmp_path, [spec_for(server, tmp_path)]), environ={})
        [result] = await poll_once(settings)
    return result, server


async def test_small_messages_are_requested_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 small messages cost a handful of RETR writes, not one write per message."""
    writes = record_writes(monkeypatch)
    result, server = await poll_fake(tmp_path, SMALL)
    assert result.ok, result.error
    assert result.delivered == len(SMALL)
    assert server.commands.count("RETR") == len(SMALL)
    # One write of 100 at the start, then one of about 50 each time half
    # the window has been read.
    retr_writes = sum(data.startswith(b"RETR ") for data in writes)
    assert retr_writes <= 8


async def test_capa_after_login_travels_with_the_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that pipelines before login gets CAPA, STAT, UIDL, LIST in one write.

    Over a 40 ms round trip that is 40 ms less per session than asking CAPA
    first; the order of the replies is the order of the commands, so the
    new capabilities are still known before the listing is used.
    """
    writes = record_writes(monkeypatch)
    result, server = await poll_fake(tmp_path, SMALL[:3])
    assert result.ok, result.error
    assert result.delivered == 3
    assert b"CAPA\r\nSTAT\r\nUIDL\r\nLIST\r\n" in writes
    assert server.commands[:3] == ["CAPA", "USER", "PASS ***"]
    assert server.commands[3:7] == ["CAPA", "STAT", "UIDL", "LIST"]


async def test_pipelining_offered_only_after_login_waits_for_capa(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gmail lists PIPELINING only after login: there CAPA goes alone, then the listing.

    The RETRs are pipelined all the same, on the strength of the new CAPA.
    """

    def capa(args: list[str], server: FakePop3) -> bytes:
        caps = ["USER", "UIDL"] + (["PIPELINING"] if "PASS ***" in server.commands else [])
        return b"+OK\r\n" + b"".join(f"{cap}\r\n".encode() for cap in caps) + b".\r\n"

    writes = record_writes(monkeypatch)
    result, _ = await poll_fake(tmp_path, SMALL[:3], script={"CAPA": capa})
    assert result.ok, result.error
    assert result.delivered == 3
    listing = writes.index(b"STAT\r\nUIDL\r\nLIST\r\n")
    assert writes[listing - 1] == b"CAPA\r\n"
    assert b"RETR 1\r\nRETR 2\r\nRETR 3\r\n" in writes


async def test_the_next_large_message_is_asked_for_before_the_last_one_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the byte bound, RETR n+1 goes out while message n still arrives.

    Waiting for the end of a message larger than the bound left the server
    idle for a round trip before each next one.
    """
    monkeypatch.setattr(session_module, "MAX_PIPELINE_BYTES", 64 * 1024)
    big = small_corpus(3, seed=9, size=512 * 1024)
    # The writes, with a b"end N" put in at each message's end.
    writes = record_writes(monkeypatch)
    real_next_event = session_module.Session.next_event

    async def recording_next_event(self: session_module.Session) -> Any:
        event = await real_next_event(self)
        if isinstance(event, pop3.MessageEnd):
            writes.append(b"end %d" % event.command.msg)
        return event

    monkeypatch.setattr(session_module.Session, "next_event", recording_next_event)
    result, _ = await poll_fake(tmp_path, big)
    timeline = [
        line.decode()
        for data in writes
        for line in data.splitlines()
        if line.startswith((b"RETR", b"end"))
    ]
    assert result.ok, result.error
    assert result.delivered == 3
    assert timeline.index("RETR 2") < timeline.index("end 1")
    assert timeline.index("RETR 3") < timeline.index("end 2")
    # Never more than one large message asked for ahead.
    assert timeline.index("end 1") < timeline.index("RETR 3")


async def test_a_round_trip_of_large_messages_is_asked_for_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages of 1 MiB: at least 8 MiB is asked for before the first reply.

    Over a 40 ms round trip (like a connection to Gmail) at full speed here
    (200 MB/s) the server sends 8 MB while a RETR travels to it and the
    first byte of its reply travels back; asking for less lets it run dry
    before every refill. Bench scenario f measures it: a window of 4 MiB
    (4 of these messages) took f 0.07 s longer.
    """
    big = small_corpus(12, seed=11, size=1024 * 1024)
    writes = record_writes(monkeypatch)
    result, _ = await poll_fake(tmp_path, big)
    assert result.ok, result.error
    assert result.delivered == len(big)
    first = next(data for data in writes if data.startswith(b"RETR "))
    assert first.count(b"RETR ") >= 8


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_delivered_lines_are_written_once_per_commit_window(tmp_path: Path) -> None:
    """300 "message delivered" lines reach stdout in a few writes, one per commit window."""
    stream = CountingStream()
    logs.configure(fmt="json", stream=stream)
    result, _ = await poll_fake(tmp_path, SMALL)
    assert result.ok, result.error
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events.count("message delivered") == len(SMALL)
    assert stream.writes <= len(SMALL) // 16


class SlowMemory(MemoryDestination):
    """A memory destination whose commits take a while and record their overlap."""

    def __init__(self, *, exactly_once: bool) -> None:
        super().__init__()
        self.exactly_once = exactly_once
        self.running = 0
        self.most_at_once = 0

    async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(0.02)
            return await super().commit(staged)
        finally:
            self.running -= 1


async def poll_into(tmp_path: Path, destination: SlowMemory) -> fetch.PollResult:
    async with FakePop3(SMALL[:60]) as server:
        settings = load_config(write_config(tmp_path, [spec_for(server, tmp_path)]), environ={})
        db = StoreWorker(Store(settings.state_dir))
        try:
            return await poll_account(
                settings.accounts["alice"], db, settings.state_dir, destination=destination
            )
        finally:
            await db.close()


async def test_exactly_once_windows_overlap_two_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exactly-once destination gets two windows to commit at once, never three."""
    monkeypatch.setattr(transfer, "MAX_COMMIT_WINDOW", 4)
    destination = SlowMemory(exactly_once=True)
    result = await poll_into(tmp_path, destination)
    assert result.ok, result.error
    assert result.delivered == 60
    assert len(destination.messages) == 60
    assert destination.most_at_once == transfer.MAX_COMMITS_IN_FLIGHT == 2


async def test_at_least_once_destinations_commit_one_message_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destination without exactly-once commits never overlaps: one message may be in doubt."""
    monkeypatch.setattr(transfer, "MAX_COMMIT_WINDOW", 4)
    destination = SlowMemory(exactly_once=False)
    result = await poll_into(tmp_path, destination)
    assert result.ok, result.error
    assert result.delivered == 60
    assert destination.most_at_once == 1
    assert destination.commits == 60


def test_tls_context_is_built_once_and_rebuilt_when_the_ca_changes(pki: TestPKI) -> None:
    """Polls share one TLS context per CA file; a changed CA file gets a new one."""
    first = make_tls_context(pki.ca_file)
    assert make_tls_context(pki.ca_file) is first
    assert make_tls_context(None) is make_tls_context(None)
    stat = os.stat(pki.ca_file)
    os.utime(pki.ca_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = make_tls_context(pki.ca_file)
    assert again is not first
    assert again.verify_mode == ssl.CERT_REQUIRED
    assert again.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_tls_records_are_decrypted_into_the_shared_receive_buffer(
    pki: TestPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TLS no read allocates a buffer of its own.

    asyncio reads for a plain Protocol with ``SSLObject.read(256 KiB)``, a
    fresh object for every TLS record (a quarter MiB, then cut to the
    record), and joins the records of a read into one more copy.  That cost
    8 MB of peak RSS and 0.2 s of CPU on 2,000 mixed messages.
    """
    reads = {"into a buffer": 0, "allocating": 0}
    real_read = ssl.SSLObject.read

    def counting_read(
        self: ssl.SSLObject, len: int = 1024, buffer: bytearray | memoryview | None = None
    ) -> bytes | int:
        if not self.server_side:  # the test server is a plain asyncio server
            reads["allocating" if buffer is None else "into a buffer"] += 1
        return real_read(self, len, buffer)

    monkeypatch.setattr(ssl.SSLObject, "read", counting_read)
    async with FakePop3(SMALL, ssl_context=server_context(pki)) as server:
        spec = spec_for(server, tmp_path, tls="implicit", ca_file=pki.ca_file)
        settings = load_config(write_config(tmp_path, [spec]), environ={})
        [result] = await poll_once(settings)
    assert result.ok, result.error
    assert result.delivered == len(SMALL)
    assert reads["into a buffer"] > 0
    assert reads["allocating"] == 0


async def test_connections_share_one_receive_buffer(
    pki: TestPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three accounts polled at once over TLS read into one buffer, not one each.

    A quarter MiB per connection would be 16 MB for the 64 sessions of
    bench/scale.py's round.
    """
    lent: set[int] = set()
    real_get_buffer = transport._Protocol.get_buffer

    def recording_get_buffer(self: transport._Protocol, sizehint: int) -> memoryview:
        buffer = real_get_buffer(self, sizehint)
        lent.add(id(buffer.obj))
        return buffer

    monkeypatch.setattr(transport._Protocol, "get_buffer", recording_get_buffer)
    over_tls = {"tls": "implicit", "ca_file": pki.ca_file}
    async with FakePop3(SMALL[:50], ssl_context=server_context(pki)) as server:
        specs = [
            spec_for(server, tmp_path, name=name, maildir=tmp_path / name, **over_tls)
            for name in ("one", "two", "three")
        ]
        settings = load_config(write_config(tmp_path, specs), environ={})
        results = await poll_once(settings)
    assert [r.delivered for r in results] == [50, 50, 50]
    assert server.commands.count("QUIT") == 3
    assert len(lent) == 1


def test_a_buffer_lent_twice_at_once_fails_the_connection_that_lost_it() -> None:
    """Should a loop ever overlap two lendings, the first borrower fails, unread."""
    first, second = transport._Protocol(), transport._Protocol()
    first.get_buffer(-1)
    buffer = second.get_buffer(-1)
    buffer[:5] = b"+OK\r\n"
    with pytest.raises(RuntimeError, match="two connections"):
        first.buffer_updated(5)
    assert not first.chunks
    second.buffer_updated(5)
    assert list(second.chunks) == [b"+OK\r\n"]


async def test_store_failure_in_an_earlier_window_is_the_error_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store failure seen while a later message is staged is the error the poll reports."""
    monkeypatch.setattr(transfer, "MAX_COMMIT_WINDOW", 4)
    real = Store.mark_delivered
    calls = 0

    def failing(self: Store, *args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise StoreError("gpopd.db: disk I/O error")
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "mark_delivered", failing)
    async with FakePop3(SMALL[:60]) as server:
        settings = load_config(write_config(tmp_path, [spec_for(server, tmp_path)]), environ={})
        [result] = await poll_once(settings)
        assert server.deleted == set()
    assert isinstance(result.error, StoreError), repr(result.error)
    assert result.outcome != "internal-error"
