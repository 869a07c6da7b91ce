"""`gpopd poll` killed at every named step of the commit order, for every destination.

Each case runs ``gpopd poll`` against a real Dovecot with ``GPOPD_FAILPOINT``
set, checks that the process died at that point (SIGKILL, and the line the
failpoint writes on stderr), then polls again cleanly and counts what the
destination holds: every message exactly once for Maildir and mbox; for
SMTP, LMTP and MDA nothing lost and at most the one message in flight twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpopd import failpoints
from gpopd.config import load_config
from gpopd.fetch import PollResult, poll_once
from gpopd.store import Store
from tests.support.certs import TestPKI
from tests.support.corpus import expected_delivery, small_corpus
from tests.support.dovecot import Dovecot
from tests.support.gpopd_config import AccountSpec, maildir_contents, write_config
from tests.support.smtpd import RunningServer, running_server
from tests.test_destinations_e2e import read_mboxrd

DESTINATIONS = ("maildir", "mbox", "smtp", "lmtp", "mda")
EXACTLY_ONCE = frozenset({"maildir", "mbox"})
OWN_POINTS = {
    "maildir": ("after-spool-fsync", "after-link", "after-dir-fsync"),
    "mbox": ("after-journal-seal", "after-append-fsync", "after-journal-commit"),
    "smtp": ("after-relay-accept",),
    "lmtp": ("after-relay-accept",),
    "mda": ("after-mda-exit",),
}
# The step after which an at-least-once destination holds a message the store
# has not recorded: the one duplicate its window allows.
ACCEPT_POINTS = frozenset({"after-relay-accept", "after-mda-exit"})
COMMON_POINTS = ("after-store-commit", "after-dele", "before-quit")
# Reached once per session; the others once per message or per commit window.
SESSION_POINTS = frozenset({"after-dele", "before-quit"})
# Reached once per message.  Maildir and mbox reach their other points once
# per commit window, and a poll of n >= 2 messages commits at least two
# windows (the first message is committed alone while the next ones arrive).
MESSAGE_POINTS = frozenset(
    {"after-spool-fsync", "after-link", "after-relay-accept", "after-mda-exit"}
)
CI_MESSAGES = 4
# The second hit: one message (or window) is through, the next one is cut.
CI_HIT = 2
SLOW_MESSAGES = 24
SLOW_HITS = (1, 2, 12, 24)
WINDOWS_AT_LEAST = 2
# Python start-up dominates a kill run; a few at once use both cores.
PARALLEL_RUNS = 4
# Deliver the message it reads from stdin into the directory in $1 (tmp/, then new/).
MDA_SCRIPT = """#!/bin/sh
set -e
name=$(date +%s%N).$$
cat > "$1/tmp/$name"
mv "$1/tmp/$name" "$1/new/$name"
"""


def points(destination: str, keep: bool) -> list[str]:
    """The failpoints a poll into ``destination`` reaches (no DELE with keep)."""
    common = [p for p in COMMON_POINTS if not (keep and p == "after-dele")]
    return [*OWN_POINTS[destination], *common]


@dataclass
class Case:
    """One kill: a POP3 user of its own, a destination of its own, a failpoint."""

    destination: str
    keep: bool
    point: str
    hit: int
    index: int

    @property
    def slug(self) -> str:
        return f"{self.destination}-{'keep' if self.keep else 'delete'}-{self.index}"

    @property
    def user(self) -> str:
        return f"src-{self.slug}"

    @property
    def lmtp_user(self) -> str:
        return f"dst-{self.slug}"

    @property
    def recipient(self) -> str:
        return f"{self.slug}@failpoint.test"


def cases_for(destination: str, keep: bool, hits: tuple[int, ...]) -> list[Case]:
    found: list[Case] = []
    for point in points(destination, keep):
        if point in SESSION_POINTS:
            reached: tuple[int, ...] = (1,)
        elif point in MESSAGE_POINTS or destination not in EXACTLY_ONCE:
            reached = hits
        else:
            reached = tuple(hit for hit in hits if hit <= WINDOWS_AT_LEAST)
        for hit in reached:
            found.append(Case(destination, keep, point, hit, len(found)))
    return found


def users_for(cases: list[Case]) -> dict[str, str]:
    users = {case.user: f"pw-{case.index}" for case in cases}
    users |= {case.lmtp_user: "unused" for case in cases if case.destination == "lmtp"}
    return users


def delivery_lines(
    case: Case, base: Path, dovecot: Dovecot, relay: RunningServer | None, mda: Path
) -> list[str]:
    if case.destination == "maildir":
        return ["type: maildir", f"path: {base / 'Maildir'}"]
    if case.destination == "mbox":
        return ["type: mbox", f"path: {base / 'inbox.mbox'}"]
    if case.destination == "smtp":
        assert relay is not None
        return [
            "type: smtp",
            "host: 127.0.0.1",
            f"port: {relay.port}",
            f"recipient: [{case.recipient}]",
        ]
    if case.destination == "lmtp":
        return [
            "type: lmtp",
            "host: 127.0.0.1",
            f"port: {dovecot.lmtp_port}",
            f"recipient: [{case.lmtp_user}]",
        ]
    target = base / "mda-Maildir"
    for sub in ("tmp", "new"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    return ["type: mda", f"command: [{mda}, {target}]"]


def stored(case: Case, base: Path, dovecot: Dovecot, relay: RunningServer | None) -> list[bytes]:
    """What the destination of ``case`` holds, in the form ``expected_delivery`` gives."""
    if case.destination == "maildir":
        return maildir_contents(base / "Maildir")
    if case.destination == "mbox":
        return read_mboxrd(base / "inbox.mbox")
    if case.destination == "smtp":
        assert relay is not None
        return [
            r.content.replace(b"\r\n", b"\n")
            for r in relay.received
            if r.recipients == (case.recipient,)
        ]
    if case.destination == "lmtp":
        # Dovecot prepends its trace headers (Return-Path, Delivered-To, Received).
        return [m.replace(b"\r\n", b"\n") for m in dovecot.messages(case.lmtp_user)]
    return maildir_contents(base / "mda-Maildir")


def count_copies(case: Case, held: list[bytes], expected: list[bytes]) -> tuple[list[int], int]:
    """How many times each expected message is held, and how many held messages are foreign.

    LMTP messages are matched by suffix: Dovecot prepends its trace headers.
    """
    if case.destination == "mbox":
        # mailbox hands each message back with the blank line that separates it.
        held = [m.rstrip(b"\n") for m in held]
        expected = [m.rstrip(b"\n") for m in expected]
    if case.destination == "lmtp":
        copies = [sum(1 for m in held if m.endswith(message)) for message in expected]
    else:
        held_counts = Counter(held)
        copies = [held_counts[message] for message in expected]
    return copies, len(held) - sum(copies)


async def kill_run(config: Path, spec: str, limit: asyncio.Semaphore) -> tuple[int, str]:
    """Run ``gpopd poll`` with ``GPOPD_FAILPOINT=spec``; its exit status and stderr."""
    env = dict(os.environ, GPOPD_FAILPOINT=spec)
    async with limit:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gpopd",
            "poll",
            "--config",
            str(config),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode is not None
    return child.returncode, err.decode("utf-8", "replace")


@dataclass
class Figures:
    """What one case left behind after the clean poll, and what was wrong with it."""

    case: Case
    killed: bool = False
    lost: int = 0
    duplicated: int = 0
    on_server: int = 0
    problems: list[str] = field(default_factory=list)


@contextlib.contextmanager
def dovecot_with(pki: TestPKI, users: dict[str, str]) -> Iterator[Dovecot]:
    """A private Dovecot serving ``users`` (fails, never skips, without Dovecot)."""
    # Not under pytest's basetemp, whose parents Dovecot's processes cannot traverse.
    base = Path(tempfile.mkdtemp(prefix="gpopd-dovecot-"))
    try:
        with Dovecot(base, pki, users=users) as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def run_matrix(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path, cases: list[Case], messages: list[bytes]
) -> list[Figures]:
    """Kill a poll at each case's failpoint, poll again cleanly, count what arrived."""
    mda = tmp_path / "mda.sh"
    mda.write_text(MDA_SCRIPT)
    mda.chmod(0o700)
    expected = [expected_delivery(m) for m in messages]
    with running_server() as relay:
        configs: list[Path] = []
        for case in cases:
            base = tmp_path / case.slug
            dovecot.add_messages(case.user, messages)
            spec = AccountSpec(
                case.user,
                dovecot.pop3s_port,
                case.user,
                f"pw-{case.index}",
                base / "unused",
                ca_file=pki.ca_file,
                keep=case.keep,
                delivery=delivery_lines(case, base, dovecot, relay, mda),
            )
            configs.append(write_config(base, [spec]))
        limit = asyncio.Semaphore(PARALLEL_RUNS)
        runs = await asyncio.gather(
            *(
                kill_run(config, f"{case.point}:{case.hit}", limit)
                for case, config in zip(cases, configs, strict=True)
            )
        )
        clean = await asyncio.gather(
            *(poll_once(load_config(config, environ={})) for config in configs)
        )
        figures = []
        for case, (code, err), [result] in zip(cases, runs, clean, strict=True):
            figures.append(
                judge(
                    case,
                    tmp_path / case.slug,
                    code=code,
                    err=err,
                    result=result,
                    dovecot=dovecot,
                    relay=relay,
                    expected=expected,
                )
            )
    for f in figures:
        c = f.case
        print(
            f"{c.destination:7} keep={c.keep!s:5} {c.point + ':' + str(c.hit):24} "
            f"killed={f.killed} lost={f.lost} duplicated={f.duplicated} on_server={f.on_server}"
        )
    return figures


def judge(
    case: Case,
    base: Path,
    *,
    code: int,
    err: str,
    result: PollResult,
    dovecot: Dovecot,
    relay: RunningServer,
    expected: list[bytes],
) -> Figures:
    """The figures of one case after its clean poll, with every broken promise named."""
    figures = Figures(case)
    figures.killed = code == -signal.SIGKILL and f"failpoint {case.point} hit {case.hit}" in err
    if not figures.killed:
        figures.problems.append(f"exit {code}, not killed at the point: {err[-1500:]}")
    if result.outcome != "ok":
        figures.problems.append(f"clean poll {result.outcome}: {result.error}")
    copies, foreign = count_copies(case, stored(case, base, dovecot, relay), expected)
    if foreign:
        figures.problems.append(f"{foreign} messages held that were never sent (torn or mixed)")
    figures.lost = copies.count(0)
    figures.duplicated = sum(n - 1 for n in copies if n > 1)
    allowed = 1 if case.point in ACCEPT_POINTS else 0
    if figures.lost or figures.duplicated != allowed:
        figures.problems.append(
            f"{figures.lost} lost, {figures.duplicated} duplicated (want 0 and {allowed})"
        )
    figures.on_server = dovecot.message_count(case.user)
    if figures.on_server != (len(expected) if case.keep else 0):
        figures.problems.append(f"{figures.on_server} left on the server")
    with Store(base / "state") as store:
        if store.pending(case.user) or len(store.delivered_uids(case.user)) != len(expected):
            figures.problems.append("the store does not record every message once")
    return figures


def problems_of(figures: list[Figures]) -> str:
    return "\n".join(f"{f.case}: {p}" for f in figures for p in f.problems)


@pytest.fixture(scope="module")
def ci_matrix(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> list[Figures]:
    """Every destination x keep x failpoint, run once for the module on one Dovecot."""
    cases = []
    for destination in DESTINATIONS:
        for keep in (False, True):
            cases += cases_for(destination, keep, (CI_HIT,))
    messages = small_corpus(CI_MESSAGES, seed=61, size=2048)
    with dovecot_with(pki, users_for(cases)) as dovecot:
        return asyncio.run(
            run_matrix(dovecot, pki, tmp_path_factory.mktemp("failpoints"), cases, messages)
        )


@pytest.mark.dovecot
@pytest.mark.parametrize("keep", [False, True], ids=["delete", "keep"])
@pytest.mark.parametrize("destination", DESTINATIONS)
def test_every_failpoint(ci_matrix: list[Figures], destination: str, keep: bool) -> None:
    """Killed at each failpoint, then polled again: nothing lost, duplicates only in the window."""
    mine = [f for f in ci_matrix if (f.case.destination, f.case.keep) == (destination, keep)]
    assert [f.case.point for f in mine] == points(destination, keep)
    assert not problems_of(mine), problems_of(mine)
    assert all(f.killed for f in mine)
    duplicates = sum(f.duplicated for f in mine)
    assert duplicates == (0 if destination in EXACTLY_ONCE else 1)


@pytest.mark.slow
@pytest.mark.dovecot
@pytest.mark.parametrize("keep", [False, True], ids=["delete", "keep"])
@pytest.mark.parametrize("destination", DESTINATIONS)
async def test_every_failpoint_at_many_hits(
    pki: TestPKI, tmp_path: Path, destination: str, keep: bool
) -> None:
    """The same matrix with more mail, killed at the first, middle and last hits."""
    cases = cases_for(destination, keep, SLOW_HITS)
    messages = small_corpus(SLOW_MESSAGES, seed=62, size=8192)
    with dovecot_with(pki, users_for(cases)) as dovecot:
        figures = await run_matrix(dovecot, pki, tmp_path, cases, messages)
    assert not problems_of(figures), problems_of(figures)
    assert all(f.killed for f in figures)


# -- the switch itself, in a child process ---------------------------------------

CHILD = """
import sys
from gpopd.failpoints import failpoint
for n in range(1, 6):
    print(n, flush=True)
    failpoint("after-link")
    failpoint("before-quit")
"""


def run_child(spec: str | None) -> tuple[int, str, str]:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != failpoints.ENV_VAR}
    if spec is not None:
        env[failpoints.ENV_VAR] = spec
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def test_unset_failpoint_does_nothing() -> None:
    """Without the variable every point is passed and the process ends normally."""
    code, out, err = run_child(None)
    assert (code, out.split(), err) == (0, ["1", "2", "3", "4", "5"], "")


def test_failpoint_kills_at_the_nth_hit() -> None:
    """NAME:3 lets two hits pass and kills the process with SIGKILL at the third."""
    code, out, err = run_child("after-link:3")
    assert code == -signal.SIGKILL
    assert out.split() == ["1", "2", "3"]
    assert "failpoint after-link hit 3" in err


def test_failpoint_default_is_the_first_hit() -> None:
    """A name alone kills at the first hit."""
    code, out, err = run_child("before-quit")
    assert (code, out.split()) == (-signal.SIGKILL, ["1"])
    assert "failpoint before-quit hit 1" in err


@pytest.mark.parametrize("spec", ["after-lnk", "after-link:0", "after-link:x", "after-link:-1"])
def test_bad_spec_is_reported_and_ignored(spec: str) -> None:
    """A misspelt name or a bad count arms nothing and says so on stderr."""
    code, out, err = run_child(spec)
    assert (code, len(out.split())) == (0, 5)
    assert f"{failpoints.ENV_VAR} ignored" in err


def test_parse_and_arm_in_process() -> None:
    """parse() reads NAME[:N]; arm(None) leaves the fast path disarmed."""
    assert failpoints.parse("after-dele") == ("after-dele", 1)
    assert failpoints.parse("after-store-commit:7") == ("after-store-commit", 7)
    with pytest.raises(ValueError, match="unknown failpoint"):
        failpoints.parse("nowhere")
    failpoints.arm("after-dele:5")
    try:
        assert failpoints.armed() == ("after-dele", 5)
        for _ in range(4):
            failpoints.failpoint("after-dele")  # below the count: returns
        failpoints.failpoint("before-quit")  # another name: returns
    finally:
        failpoints.arm(None)
    assert failpoints.armed() is None
