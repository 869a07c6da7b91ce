"""Hostile servers against a real ``gpopd poll`` process: bounded memory, a clean error.

Every case runs ``gpopd poll`` as a child process with two accounts: one on
the hostile server, one on a healthy server.  The child's peak RSS (from
``wait4``) stays under 100 MB, the hostile account ends in an error that its
log line names (exit 75), the healthy account delivers everything, and the
hostile account has nothing recorded as delivered and no DELE sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpopd.errors import EX_OK, EX_TEMPFAIL
from gpopd.pop3 import MAX_LISTING_ENTRIES
from gpopd.store import Store
from tests.support.certs import TestPKI
from tests.support.corpus import expected_delivery, mixed_corpus
from tests.support.fakepop import FakePop3, Stream
from tests.support.gpopd_config import AccountSpec, maildir_contents, write_config
from tests.support.hostile import (
    GIB,
    PollRun,
    Renegotiate,
    renegotiating_script,
    repeated,
    run_poll,
    scan_listing,
    tls12_server_context,
    tls_server_context,
    uid_listing,
)

PEAK_RSS_LIMIT_MB = 100
GOOD_MESSAGES = mixed_corpus(5, seed=61)
HOSTILE_MESSAGES = mixed_corpus(3, seed=62)
# Plenty for a local server; a stall shows up as a failure, not a stuck suite.
TIMEOUT = "10s"


@dataclass
class Case:
    """One hostile server: how it is built and the words its error must contain."""

    words: str
    script: dict[str, Any] = field(default_factory=dict)
    greeting: Callable[[], bytes | Stream] | None = None
    tls: str | None = None  # certificate kind for implicit TLS
    tls12: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    # Not an attack on gpopd: the account must deliver exactly what the server holds.
    delivers: bool = False


def endless_lines() -> Iterator[bytes]:
    return repeated(b"+OK\r\n", b"x" * 1022 + b"\r\n", None)


CASES: dict[str, Case] = {
    "1 GiB greeting line": Case(
        "MAX_STATUS_LINE", greeting=lambda: Stream(repeated(b"+OK ", b"x", GIB, b"\r\n"))
    ),
    "1 GiB STAT reply line": Case(
        "MAX_STATUS_LINE", {"STAT": lambda a, s: Stream(repeated(b"+OK ", b"9", GIB, b"\r\n"))}
    ),
    "1 GiB message line": Case(
        "MAX_CONTENT_LINE",
        {"RETR": lambda a, s: Stream(repeated(b"+OK\r\n", b"y", GIB, b"\r\n.\r\n"))},
    ),
    "endless RETR": Case(
        "exceeds max_message_size", {"RETR": lambda a, s: Stream(endless_lines())}
    ),
    "STAT claims 10^9 messages": Case(
        "1000000000 messages in STAT", {"STAT": lambda a, s: b"+OK 1000000000 1000000000000\r\n"}
    ),
    "1 MB UIDL line": Case(
        "MAX_LISTING_LINE",
        {"UIDL": lambda a, s: b"+OK\r\n1 " + b"u" * 1024 * 1024 + b"\r\n.\r\n"},
    ),
    "UIDL of 10^7 entries": Case(
        "MAX_LISTING_ENTRIES",
        {
            "STAT": lambda a, s: b"+OK 10000000 10000000000\r\n",
            "UIDL": lambda a, s: Stream(uid_listing(10**7)),
        },
    ),
    # The worst a listing can do: as many entries as the engine admits, all
    # consistent, so the whole mailbox is planned before RETR fails.
    "UIDL+LIST of MAX_LISTING_ENTRIES": Case(
        "RETR 1 failed",
        {
            "STAT": lambda a, s: b"+OK %d 1000\r\n" % MAX_LISTING_ENTRIES,
            "UIDL": lambda a, s: Stream(uid_listing(MAX_LISTING_ENTRIES)),
            "LIST": lambda a, s: Stream(scan_listing(MAX_LISTING_ENTRIES)),
            "RETR": lambda a, s: b"-ERR [SYS/TEMP] not now\r\n",
        },
    ),
    "NUL and 0xFF in a UID": Case(
        "UID with characters", {"UIDL": lambda a, s: b"+OK\r\n1 a\x00b\r\n2 c\xffd\r\n.\r\n"}
    ),
    "NUL and 0xFF in the status": Case(
        "malformed status line", {"STAT": lambda a, s: b"+OK\x00\xff 3 300\r\n"}
    ),
    "NUL and 0xFF in message content": Case("", delivers=True),
    "greeting that never ends": Case(
        "MAX_STATUS_LINE", greeting=lambda: Stream(repeated(b"+OK", b"z" * 16, None), 0.01)
    ),
    "certificate for another name": Case("certificate", tls="wrong_name"),
    "TLS 1.2 renegotiation": Case(
        "", renegotiating_script(), tls="good", tls12=True, delivers=True
    ),
}
BINARY_MESSAGE = b"Subject: binary\n\nNUL \x00 and 0xFF \xff and both \x00\xff\x00\n..\n"


def account(server: FakePop3, tmp_path: Path, name: str, case: Case, pki: TestPKI) -> AccountSpec:
    spec = AccountSpec(
        name,
        server.port,
        server.user,
        server.password,
        tmp_path / name,
        tls="none",
        keep=False,
        extra={"timeout": TIMEOUT, "connect_timeout": TIMEOUT, **case.extra},
    )
    if case.tls is not None:
        spec.tls = "implicit"
        spec.ca_file = pki.ca_file
    return spec


def hostile_server(case: Case, pki: TestPKI, messages: list[bytes]) -> FakePop3:
    server = FakePop3(messages, script=dict(case.script))
    if case.greeting is not None:
        server.greeting = case.greeting()
    if case.tls is not None:
        cert, key = pki.pair(case.tls)
        server.ssl_context = (tls12_server_context if case.tls12 else tls_server_context)(cert, key)
    return server


def report(capsys: pytest.CaptureFixture[str], name: str, run: PollRun, outcome: str) -> None:
    with capsys.disabled():
        print(
            f"\nhostile | {name:<34} | peak RSS {run.peak_rss_mb:6.1f} MB"
            f" | {run.seconds:5.1f} s | {outcome}"
        )


@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_server(
    tmp_path: Path, pki: TestPKI, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """The hostile account fails cleanly (or delivers exactly), memory stays bounded, the
    other account delivers."""
    await check_case(tmp_path, pki, capsys, name, CASES[name])


# Whole gigabytes through the client, not stopped early by a line limit:
# the endless message is read until a max_message_size of 1 GiB.
SLOW_CASES: dict[str, Case] = {
    "endless RETR read to 1 GiB": Case(
        "exceeds max_message_size",
        {"RETR": lambda a, s: Stream(endless_lines())},
        extra={"max_message_size": "1GiB", "timeout": "60s"},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
async def test_hostile_server_full_size(
    tmp_path: Path, pki: TestPKI, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """A gigabyte streamed into the client keeps memory bounded and ends in a clean error."""
    await check_case(tmp_path, pki, capsys, name, SLOW_CASES[name])


async def check_case(
    tmp_path: Path, pki: TestPKI, capsys: pytest.CaptureFixture[str], name: str, case: Case
) -> None:
    messages = [BINARY_MESSAGE] if "content" in name else HOSTILE_MESSAGES
    Renegotiate.requested = Renegotiate.completed = 0
    async with (
        FakePop3(GOOD_MESSAGES) as good,
        hostile_server(case, pki, messages) as bad,
    ):
        config = write_config(
            tmp_path,
            [
                account(good, tmp_path, "healthy", Case(""), pki),
                account(bad, tmp_path, "hostile", case, pki),
            ],
        )
        run = await run_poll(config, tmp_path)
    line = run.finished("hostile")
    outcome = f"{line['outcome']}: {line.get('error', '')}"
    if case.tls12:
        outcome += (
            f" renegotiations requested {Renegotiate.requested}, done {Renegotiate.completed}"
        )
    report(capsys, name, run, outcome[:120])

    assert run.peak_rss_mb < PEAK_RSS_LIMIT_MB
    assert run.finished("healthy")["outcome"] == "ok"
    assert maildir_contents(tmp_path / "healthy") == sorted(map(expected_delivery, GOOD_MESSAGES))
    assert good.deleted == set(range(1, len(GOOD_MESSAGES) + 1))
    with Store(tmp_path / "state") as store:
        recorded = store.delivered_uids("hostile")
    if case.delivers:
        assert run.exit_code == EX_OK, run.output[-2000:]
        assert line["outcome"] == "ok"
        assert maildir_contents(tmp_path / "hostile") == sorted(map(expected_delivery, messages))
        assert len(recorded) == len(messages)
        if case.tls12:
            assert Renegotiate.requested >= 3
            assert Renegotiate.completed >= 1
        return
    assert run.exit_code == EX_TEMPFAIL, run.output[-2000:]
    assert line["outcome"] != "ok"
    assert case.words in line["error"]
    assert recorded == set()
    assert maildir_contents(tmp_path / "hostile") == []
    assert not list((tmp_path / "hostile").glob("tmp/*")), "a partial spool file was left"
    assert "DELE" not in bad.commands
    assert bad.deleted == set()
