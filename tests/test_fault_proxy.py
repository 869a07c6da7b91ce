"""Polls through a fault-injecting proxy lose, truncate and duplicate nothing.

Each poll goes through :class:`FaultProxy` with one fault drawn from a seeded
RNG (the seed is printed; set ``GPOPD_FAULT_SEED`` to repeat a run), and
fresh mail arrives on Dovecot between polls.  A last fault-free poll must
then leave every message in the Maildir exactly once and byte-exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpopd.config import load_config
from gpopd.daemon import report_for
from gpopd.errors import ReadTimeout, TlsError, TransportError
from gpopd.fetch import poll_once
from gpopd.scheduler import Outcome
from gpopd.store import Store
from tests.support.certs import TestPKI
from tests.support.corpus import expected_delivery, mixed_corpus
from tests.support.dovecot import TEST_USERS, Dovecot
from tests.support.faultproxy import (
    Connection,
    Fault,
    FaultProxy,
    fault_seed,
    random_fault,
)
from tests.support.gpopd_config import AccountSpec, maildir_contents, write_config

CI_POLLS = 25  # per variant: 50 proxied polls in CI
SLOW_POLLS = 500  # per variant
TIMEOUT = 2.0
CONNECT_TIMEOUT = 2.0
STALL_SLACK = 1.0
MESSAGES_AT_START = 6
MESSAGES_PER_POLL = 3
# Small enough to keep a poll short, large enough that many faults land
# inside a RETR (a poll moves about 100-300 KB).
MAX_MESSAGE_BYTES = 200 * 1024
POLL_LIMIT = 60.0


def corpus(count: int, seed: int) -> list[bytes]:
    """``count`` distinct realistic messages of at most MAX_MESSAGE_BYTES."""
    found: list[bytes] = []
    batch = 0
    while len(found) < count:
        found += [m for m in mixed_corpus(count, seed + batch) if len(m) <= MAX_MESSAGE_BYTES]
        batch += 1_000_003
    return found[:count]


def server_messages(dovecot: Dovecot, user: str) -> set[bytes]:
    """What Dovecot holds for ``user``, as a client would store it."""
    for _ in range(50):
        # Dovecot may move a file from new/ to cur/ while it is being read.
        with contextlib.suppress(FileNotFoundError):
            return {expected_delivery(m) for m in dovecot.messages(user)}
        time.sleep(0.02)
    raise AssertionError("Dovecot's Maildir kept changing")


@dataclass
class Tally:
    seed: int
    keep: bool
    polls: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    fired: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    stalls: list[float] = field(default_factory=list)  # seconds from stall to give-up
    stalled_polls: int = 0
    interrupted: int = 0  # polls that stopped with planned messages undelivered

    def summary(self, lost: int, partial: int, duplicated: int) -> str:
        fired = ", ".join(f"{k} {self.fired[k]}/{n}" for k, n in sorted(self.faults.items()))
        overrun = max((s - max(TIMEOUT, CONNECT_TIMEOUT) for s in self.stalls), default=0.0)
        return (
            f"fault run keep={self.keep} seed={self.seed}: polls {self.polls}; "
            f"faults fired/drawn: {fired}; outcomes {dict(self.outcomes)}; "
            f"interrupted transfers {self.interrupted}; lost {lost}; partial {partial}; "
            f"duplicated {duplicated}; stalled polls {self.stalled_polls}, "
            f"max stall overrun {overrun:+.2f}s (limit +{STALL_SLACK:.0f}s)"
        )


def account(dovecot: Dovecot, pki: TestPKI, tmp_path: Path, port: int, keep: bool) -> AccountSpec:
    return AccountSpec(
        "alice",
        port,
        "alice",
        TEST_USERS["alice"],
        tmp_path / "Maildir",
        ca_file=pki.ca_file,
        keep=keep,
        extra={"timeout": f"{TIMEOUT:g}s", "connect_timeout": f"{CONNECT_TIMEOUT:g}s"},
    )


async def fault_run(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path, *, keep: bool, polls: int
) -> None:
    seed = fault_seed()
    print(f"fault proxy seed: {seed} (set GPOPD_FAULT_SEED to repeat)")
    rng = random.Random(seed)
    mail = corpus(MESSAGES_AT_START + polls * MESSAGES_PER_POLL, seed)
    dovecot.add_messages("alice", mail[:MESSAGES_AT_START])
    added = MESSAGES_AT_START
    tally = Tally(seed, keep)
    maildir = tmp_path / "Maildir"

    async with FaultProxy(dovecot.pop3s_port) as proxy:
        config = write_config(tmp_path, [account(dovecot, pki, tmp_path, proxy.port, keep)])
        settings = load_config(config, environ={})
        for _ in range(polls):
            fault = proxy.fault = random_fault(rng)
            before = server_messages(dovecot, "alice") if not keep else set()
            opened = len(proxy.connections)
            async with asyncio.timeout(POLL_LIMIT):
                [result] = await poll_once(settings)
                finished = time.monotonic()
                await proxy.idle()
            # A poll may hold more than one session (a server that offers a
            # full batch is asked again); each gets the same fault.
            sessions = proxy.connections[opened:]
            assert sessions, "the poll never connected"
            record_poll(tally, fault, sessions, result.outcome, finished)
            if result.delivered < result.new:
                tally.interrupted += 1
            if not keep:
                removed = before - server_messages(dovecot, "alice")
                delivered = set(maildir_contents(maildir))
                assert removed <= delivered, f"{fault}: deleted before delivery"
                if result.delivered < result.new and len(sessions) == 1:
                    # An interrupted transfer must end without QUIT: the
                    # server then applies no DELE at all.
                    assert not removed, f"{fault}: QUIT after an interrupted RETR"
            dovecot.add_messages("alice", mail[added : added + MESSAGES_PER_POLL])
            added += MESSAGES_PER_POLL

    # The last poll goes straight to Dovecot, with generous timeouts.
    spec = account(dovecot, pki, tmp_path, dovecot.pop3s_port, keep)
    spec.extra = {}
    [final] = await poll_once(load_config(write_config(tmp_path, [spec]), environ={}))
    assert final.outcome == "ok", final.error

    expected = Counter(expected_delivery(m) for m in mail[:added])
    found = Counter(maildir_contents(maildir))
    partial = sum(n for message, n in found.items() if message not in expected)
    lost = sum((expected - found).values())
    duplicated = sum((found - expected).values()) - partial
    print(tally.summary(lost, partial, duplicated))
    assert (lost, partial, duplicated) == (0, 0, 0)
    assert all(s <= max(TIMEOUT, CONNECT_TIMEOUT) + STALL_SLACK for s in tally.stalls), tally.stalls
    # The run must have hurt: otherwise it proves nothing.
    assert sum(tally.fired.values()) >= polls // 3, tally.fired
    assert tally.outcomes["ok"] < polls, tally.outcomes
    with Store(tmp_path / "state") as store:
        assert store.pending("alice") == {}
        assert len(store.delivered_uids("alice")) == added
    assert not any((maildir / "tmp").iterdir()), "orphaned files in tmp/"
    assert dovecot.message_count("alice") == (added if keep else 0)


def record_poll(
    tally: Tally, fault: Fault, sessions: list[Connection], outcome: str, finished: float
) -> None:
    tally.polls += 1
    tally.faults[fault.kind] += 1
    tally.outcomes[outcome] += 1
    if fault.kind != "none" and any(c.fired is not None for c in sessions):
        tally.fired[fault.kind] += 1
    for connection in sessions:
        if connection.stall_seconds is not None:
            tally.stalls.append(connection.stall_seconds)
            tally.stalled_polls += connection is sessions[-1]
    last = sessions[-1]
    if last.stall_seconds is not None and last.fired is not None:
        # Until the whole poll was over (connection dropped, commits and
        # the poll's record written), not only until the socket closed.
        tally.stalls.append(finished - last.fired)


@pytest.mark.parametrize("keep", [False, True], ids=["delete", "keep"])
async def test_random_faults_lose_and_duplicate_nothing(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path, keep: bool
) -> None:
    """25 polls with random network faults, then a clean poll: every message once, intact."""
    await fault_run(dovecot, pki, tmp_path, keep=keep, polls=CI_POLLS)


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True], ids=["delete", "keep"])
async def test_random_faults_long_run(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path, keep: bool
) -> None:
    """500 faulty polls per mode: the same guarantees over a long run."""
    await fault_run(dovecot, pki, tmp_path, keep=keep, polls=SLOW_POLLS)


# -- the proxy itself, against a plain TCP server --------------------------------

BLOB = bytes(range(256)) * 8  # what the server sends to each client


class BlobServer:
    """Sends BLOB to each client and keeps whatever the client sends."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> BlobServer:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BLOB)
        data = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                data += chunk
        self.received.append(data)
        writer.close()


async def read_all(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, str]:
    """Bytes read until EOF, an error or ``limit`` seconds of silence, and which it was."""
    data = b""
    try:
        while True:
            async with asyncio.timeout(limit):
                chunk = await reader.read(65536)
            if not chunk:
                return data, "eof"
            data += chunk
    except TimeoutError:
        return data, "silence"
    except ConnectionResetError:
        return data, "reset"


async def through_proxy(fault: Fault, send: bytes = b"") -> tuple[bytes, str, Connection, bytes]:
    async with BlobServer() as server, FaultProxy(server.port) as proxy:
        proxy.fault = fault
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(send)
        data, ending = await read_all(reader, 0.5)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        async with asyncio.timeout(5):
            await proxy.idle()
        for _ in range(100):
            if server.received:
                break
            await asyncio.sleep(0.01)
        return data, ending, proxy.connections[0], b"".join(server.received)


async def test_proxy_cut_forwards_exactly_n_bytes_then_closes() -> None:
    """A cut after 700 bytes delivers exactly those 700 bytes, then an orderly EOF."""
    data, ending, record, _ = await through_proxy(Fault("cut", "down", offset=700))
    assert (data, ending, record.ended_by) == (BLOB[:700], "eof", "cut")


async def test_proxy_reset_sends_rst() -> None:
    """A reset after 100 bytes makes the client's next read fail with ECONNRESET."""
    data, ending, record, _ = await through_proxy(Fault("reset", "down", offset=100))
    assert ending == "reset"
    assert len(data) <= 100
    assert record.fired is not None


async def test_proxy_flip_changes_one_byte_in_each_direction() -> None:
    """A flip XORs exactly the byte at the offset, downstream or upstream."""
    data, ending, _, _ = await through_proxy(Fault("flip", "down", offset=300, mask=0x41))
    expected = bytearray(BLOB)
    expected[300] ^= 0x41
    assert (data, ending) == (bytes(expected), "silence")
    sent = b"client bytes " * 10
    _, _, record, received = await through_proxy(Fault("flip", "up", offset=5, mask=1), sent)
    assert received == sent[:5] + bytes([sent[5] ^ 1]) + sent[6:]
    assert record.fired is not None


async def test_proxy_stall_keeps_the_socket_open_and_measures_the_wait() -> None:
    """A stall forwards nothing after the offset, never closes, and times the client's wait."""
    data, ending, record, received = await through_proxy(
        Fault("stall", "down", offset=1000), b"swallowed"
    )
    assert (data, ending) == (BLOB[:1000], "silence")
    assert received in (b"", b"swallowed")  # sent before or after the stall began
    assert record.stall_seconds is not None
    assert 0.45 <= record.stall_seconds <= 1.5


async def test_proxy_throttle_trickles_then_recovers() -> None:
    """A throttle of 100 B/s for 0.5 s passes about 50 bytes slowly, then the rest at once."""
    started = time.monotonic()
    data, ending, record, _ = await through_proxy(Fault("throttle", "down", rate=100, duration=0.5))
    assert (data, ending) == (BLOB, "silence")
    assert record.fired is not None
    assert time.monotonic() - started >= 0.5


def test_random_faults_are_reproducible_from_the_seed() -> None:
    """The same seed draws the same faults, and every kind appears in a long draw."""
    first = [random_fault(random.Random(7)) for _ in range(3)]
    assert first == [random_fault(random.Random(7)) for _ in range(3)]
    rng = random.Random(fault_seed({"GPOPD_FAULT_SEED": "12345"}))
    assert rng.random() == random.Random(12345).random()
    kinds = {random_fault(rng).kind for _ in range(500)}
    assert kinds == {"none", "delay", "throttle", "cut", "reset", "stall", "flip"}


# -- single faults against Dovecot ---------------------------------------------------


async def test_damaged_tls_handshake_is_retried_not_parked(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """A byte flipped in the TLS handshake is a network error the daemon retries soon."""
    dovecot.add_messages("alice", corpus(2, seed=5))
    async with FaultProxy(dovecot.pop3s_port) as proxy:
        spec = account(dovecot, pki, tmp_path, proxy.port, keep=False)
        settings = load_config(write_config(tmp_path, [spec]), environ={})
        for fault in (
            Fault("flip", "up", offset=100, mask=8),
            Fault("flip", "down", offset=50, mask=1),
        ):
            proxy.fault = fault
            [result] = await poll_once(settings)
            assert isinstance(result.error, TransportError), result.error
            assert not isinstance(result.error, TlsError), result.error
            assert report_for(result).outcome is Outcome.BUSY
    assert dovecot.message_count("alice") == 2


async def test_stall_inside_a_retr_ends_by_the_timeout_and_deletes_nothing(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """A server that goes silent mid-RETR: timeout in time, no QUIT, then exactly once."""
    mail = corpus(8, seed=6)
    dovecot.add_messages("alice", mail)
    total = sum(len(m) for m in mail)
    async with FaultProxy(dovecot.pop3s_port) as proxy:
        proxy.fault = Fault("stall", "down", offset=total // 2)
        spec = account(dovecot, pki, tmp_path, proxy.port, keep=False)
        [result] = await poll_once(load_config(write_config(tmp_path, [spec]), environ={}))
        await proxy.idle()
    assert isinstance(result.error, ReadTimeout), result.error
    assert 0 < result.delivered < len(mail)
    stalled = proxy.connections[0].stall_seconds
    assert stalled is not None
    assert stalled <= TIMEOUT + STALL_SLACK
    assert dovecot.message_count("alice") == len(mail)  # no QUIT, so no DELE applied
    spec.port = dovecot.pop3s_port
    [final] = await poll_once(load_config(write_config(tmp_path, [spec]), environ={}))
    assert (final.outcome, final.delivered, final.deleted) == (
        "ok",
        len(mail) - result.delivered,
        len(mail),
    )
    assert maildir_contents(tmp_path / "Maildir") == sorted(map(expected_delivery, mail))
    assert dovecot.message_count("alice") == 0


async def test_stalled_stls_handshake_times_out_as_a_network_error(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path
) -> None:
    """A ClientHello lost after STLS ends by connect_timeout and is retried, not parked."""
    async with FaultProxy(dovecot.pop3_port) as proxy:
        # CAPA and STLS go through (12 bytes); the TLS ClientHello does not.
        proxy.fault = Fault("stall", "up", offset=len(b"CAPA\r\nSTLS\r\n"))
        spec = account(dovecot, pki, tmp_path, proxy.port, keep=True)
        spec.tls = "starttls"
        started = time.monotonic()
        [result] = await poll_once(load_config(write_config(tmp_path, [spec]), environ={}))
        elapsed = time.monotonic() - started
        await proxy.idle()
    assert isinstance(result.error, TransportError), result.error
    assert not isinstance(result.error, TlsError), result.error
    assert report_for(result).outcome is Outcome.BUSY
    assert proxy.connections[0].fired is not None
    assert elapsed <= CONNECT_TIMEOUT + STALL_SLACK
