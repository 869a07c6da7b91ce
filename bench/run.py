"""Benchmark gpopd against mpop, fetchmail and getmail6 on a local Dovecot.

    python bench/run.py [--quick] [--runs N] [--scenario a,b,...] [--tools gpopd,mpop,...]

Starts a private Dovecot on 127.0.0.1 (POP3S with a test CA), fills one
mailbox per account from a seeded corpus, then runs every tool against the
same mailboxes, each time into a fresh Maildir with fresh client state, mail
kept on the server.  Runs are interleaved (run 1 of every tool, then run 2...)
so that slow drift of the machine spreads over all tools.  Prints a table of
medians and writes every measurement to bench/results/ as JSON.

``--quick`` runs tiny versions of a and f with gpopd only and checks
correctness; the exit status is non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import trustme  # noqa: E402

from bench import scenarios as scen  # noqa: E402
from bench.measure import run_measured  # noqa: E402
from bench.report import RunResult, summarise, table, write_json  # noqa: E402
from bench.tools import CLIENTS, TOOLS, Job, Mailbox, Server, SmtpSink, Tool  # noqa: E402
from bench.verify import Check, Expected, check_count, check_maildir  # noqa: E402
from tests.support.certs import TestPKI  # noqa: E402
from tests.support.certs import make_pki as make_test_pki  # noqa: E402
from tests.support.corpus import expected_delivery  # noqa: E402
from tests.support.dovecot import Dovecot  # noqa: E402

DEFAULT_WORK = REPO / "bench" / "work"
RESULTS = REPO / "bench" / "results"
DEFAULT_RUNS = 3
# Marks a directory the bench made, so that --work never wipes anything else.
WORK_MARKER = ".gpopd-bench-work"
PROXY_START_TIMEOUT = 10.0


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_pki(directory: Path) -> TestPKI:
    """The test PKI, with a server certificate that also has ``CN=localhost``.

    fetchmail compares the server name only with certificates that carry a
    subject CN; the shared test certificates have subjectAltNames alone.
    """
    pki = make_test_pki(directory)
    ca = trustme.CA(organization_name="gpopd bench CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    ca_file = directory / "bench-ca.pem"
    cert = directory / "bench-server.crt"
    key = directory / "bench-server.key"
    ca_file.write_bytes(ca.cert_pem.bytes())
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.touch(mode=0o600)
    key.write_bytes(leaf.private_key_pem.bytes())
    return dataclasses.replace(pki, ca_file=ca_file, server_cert=cert, server_key=key)


@contextlib.contextmanager
def _ready_process(script: str, args: list[str], log_path: Path, what: str) -> Iterator[int]:
    """Run ``bench/SCRIPT`` until the block ends; yield the port of its ``READY PORT`` line."""
    with log_path.open("wb") as errors:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / script), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"{what} did not start: {log_path.read_text()}")
        yield int(line.split()[1])
    finally:
        process.terminate()
        try:
            process.wait(timeout=PROXY_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def delay_proxy(target_port: int, delay_ms: float, log_path: Path) -> Iterator[int]:
    """Run bench/delayproxy.py in front of ``target_port``; yield its port."""
    args = ["--target-port", str(target_port), "--delay-ms", str(delay_ms)]
    with _ready_process("delayproxy.py", args, log_path, "delay proxy") as port:
        yield port


@contextlib.contextmanager
def smtp_sink(root: Path, log_path: Path) -> Iterator[SmtpSink]:
    """Run bench/smtpsink.py filing mail under ``root``; yield where it listens."""
    with _ready_process("smtpsink.py", ["--root", str(root)], log_path, "SMTP sink") as port:
        yield SmtpSink(port, root)


class Bench:
    """The Dovecot, the mailboxes and the runs of one benchmark invocation."""

    def __init__(self, work: Path, *, keep: bool = False) -> None:
        self.work = work
        self.keep = keep
        self.expected: dict[str, Expected] = {}
        self.mailboxes: dict[str, Mailbox] = {}
        self.results: list[RunResult] = []
        self.server: Server | None = None
        self.proxy_server: Server | None = None
        self.smtp: SmtpSink | None = None
        # Delivered mail is deleted only after the last run.  On ext4 a file
        # created soon after many files were deleted can make the inode
        # allocator skip every recently freed inode (a scan under the
        # directory lock: 6-9 s of system time for 4,000 files here), which
        # would charge one tool for the clean-up of the run before it.
        self.discard: list[Path] = []

    def fill(self, dovecot: Dovecot, specs: list[scen.MailboxSpec]) -> None:
        secrets = self.work / "secrets"
        secrets.mkdir(mode=0o700, exist_ok=True)
        for spec in specs:
            if spec.user in self.expected:
                continue
            started = time.perf_counter()
            messages = spec.make()
            dovecot.add_messages(spec.user, messages)
            self.expected[spec.user] = Expected.of(messages, expected_delivery)
            size = sum(len(m) for m in messages)
            del messages
            password_file = secrets / spec.user
            password_file.touch(mode=0o600)
            password_file.write_text(spec.password + "\n")
            self.mailboxes[spec.user] = Mailbox(spec.user, spec.user, spec.password, password_file)
            log(
                f"filled {spec.user}: {self.expected[spec.user].count} messages, "
                f"{size / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s"
            )

    def job(self, scenario: scen.Scenario, run_dir: Path) -> Job:
        server = self.proxy_server if scenario.via_proxy else self.server
        assert server is not None
        boxes = tuple(self.mailboxes[spec.user] for spec in scenario.mailboxes)
        return Job(run_dir, server, boxes, self.smtp if scenario.delivery == "smtp" else None)

    def warm_up(self, scenario: scen.Scenario) -> None:
        """Read every message once so Dovecot's indexes and the page cache are built."""
        job = self.job(dataclasses.replace(scenario, via_proxy=False), self.work / "warmup")
        shutil.rmtree(job.run_dir, ignore_errors=True)
        job.run_dir.mkdir(parents=True)
        command = TOOLS["floor"].prepare(job)
        subprocess.run(command.argv, env=command.env, check=True, stdout=subprocess.DEVNULL)

    def run_one(self, scenario: scen.Scenario, tool: Tool, number: int) -> RunResult:
        run_dir = self.work / "runs" / scenario.name / tool.name / str(number)
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        job = self.job(scenario, run_dir)
        command = tool.prepare(job)
        log_path = self.work / "logs" / f"{scenario.name}-{tool.name}-{number}.log"
        log_path.parent.mkdir(exist_ok=True)
        # Write back the previous run's files now, not during this one.
        os.sync()
        m = run_measured(
            command.argv,
            cwd=command.cwd,
            env=command.env,
            uid=command.uid,
            gid=command.gid,
            log=log_path,
        )
        check = self.verify(scenario, tool, job, log_path)
        if m.timed_out:
            check.problem("timed out")
        elif m.returncode != 0:
            check.problem(f"exit status {m.returncode}")
        if not self.keep:
            self.discard.append(run_dir / "mail")
            if job.smtp is not None:
                self.discard.extend(job.delivered(box) for box in job.mailboxes)
        return RunResult(
            scenario=scenario.name,
            tool=tool.name,
            run=number,
            wall=m.wall,
            cpu=m.cpu,
            cpu_user=m.cpu_user,
            cpu_sys=m.cpu_sys,
            max_rss_mb=m.main_rss_mb if tool.main_process_rss else m.max_rss_mb,
            tree_max_rss_mb=m.max_rss_mb,
            main_max_rss_mb=m.main_rss_mb,
            rss_main_only=tool.main_process_rss,
            rss_exact=m.rss_exact,
            returncode=m.returncode,
            delivered=check.delivered,
            expected=check.expected,
            problems=check.problems,
            log=str(log_path),
            machine_cpu=m.machine_cpu,
        )

    def verify(self, scenario: scen.Scenario, tool: Tool, job: Job, log_path: Path) -> Check:
        expected = sum(self.expected[box.user].count for box in job.mailboxes)
        if tool.name == "floor":
            reported = -1
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    reported = int(json.loads(line)["messages"])
            return check_count(reported, expected, scenario.name)
        check = Check()
        for box in job.mailboxes:
            check.merge(
                check_maildir(
                    job.delivered(box), self.expected[box.user], byte_exact=tool.byte_exact
                )
            )
        return check


def tool_versions() -> dict[str, str]:
    commands = {
        "mpop": ["mpop", "--version"],
        "fetchmail": ["fetchmail", "--version"],
        "getmail6": ["getmail", "--version"],
        "dovecot": ["dovecot", "--version"],
    }
    versions = {}
    for name, argv in commands.items():
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = [
            line
            for line in (done.stdout + done.stderr).splitlines()
            if line.strip() and "WARNING" not in line
        ]
        if lines:
            versions[name] = lines[0].strip()
    return versions


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark gpopd against mpop, fetchmail and getmail6 on a local Dovecot.",
        epilog="Scenarios: "
        + "; ".join(
            f"{s.name}: {s.description}" for group in scen.SCENARIOS.values() for s in group
        ),
    )
    parser.add_argument("--quick", action="store_true", help="tiny a and f, gpopd only, 1 run")
    parser.add_argument(
        "--runs", type=int, default=None, help=f"runs per tool (default {DEFAULT_RUNS})"
    )
    parser.add_argument("--scenario", default=",".join(scen.SCENARIOS), help="comma-separated")
    parser.add_argument("--tools", default=",".join(CLIENTS), help="comma-separated")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="proxy delay each way")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch directory")
    parser.add_argument("--keep", action="store_true", help="keep the delivered Maildirs")
    args = parser.parse_args(argv)
    args.tools = [name for name in args.tools.split(",") if name]
    unknown = [name for name in args.tools if name not in TOOLS]
    if unknown:
        parser.error(f"unknown tool {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    if args.quick:
        args.selected = list(scen.QUICK)
        args.runs = args.runs or 1
    else:
        try:
            args.selected = scen.select([n for n in args.scenario.split(",") if n])
        except ValueError as exc:
            parser.error(str(exc))
        args.runs = args.runs or DEFAULT_RUNS
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def tools_for(scenario: scen.Scenario, args: argparse.Namespace) -> list[str]:
    return list(scenario.tools) if scenario.tools is not None else list(args.tools)


def fresh_work_dir(work: Path) -> None:
    """Give this invocation an empty ``work``, refusing a directory the bench did not make.

    The previous invocation's files are renamed aside, not deleted, and
    deleted by the caller after the measurements: see ``Bench.discard``.
    """
    if work.exists():
        if any(work.iterdir()) and not (work / WORK_MARKER).is_file():
            raise SystemExit(f"bench: {work} is not empty and not a bench work directory")
        work.rename(work.with_name(f"{work.name}.old-{os.getpid()}"))
    work.mkdir(parents=True)
    (work / WORK_MARKER).touch()


def run(args: argparse.Namespace) -> int:
    work: Path = args.work.absolute()
    fresh_work_dir(work)
    bench = Bench(work, keep=args.keep)
    # Also those of an invocation that was killed before it could delete them.
    old = work.parent.glob(f"{work.name}.old-*")
    bench.discard.extend(path for path in old if (path / WORK_MARKER).is_file())
    names = {name for s in args.selected for name in tools_for(s, args)}
    skipped = {name: why for name in sorted(names) if (why := TOOLS[name].missing())}
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")
    specs = {spec.user: spec for s in args.selected for spec in s.mailboxes}
    users = {user: spec.password for user, spec in specs.items()}
    started = time.perf_counter()
    load_start = os.getloadavg()
    pki = make_pki(work / "pki")
    with contextlib.ExitStack() as stack:
        dovecot = stack.enter_context(Dovecot(work / "dovecot", pki, users=users, lmtp=False))
        ca_file = pki.ca_file
        bench.server = Server(dovecot.pop3s_port, ca_file)
        if any(s.via_proxy for s in args.selected):
            port = stack.enter_context(
                delay_proxy(dovecot.pop3s_port, args.delay_ms, work / "delayproxy.log")
            )
            bench.proxy_server = Server(port, ca_file)
        if any(s.delivery == "smtp" for s in args.selected):
            bench.smtp = stack.enter_context(smtp_sink(work / "sink", work / "smtpsink.log"))
        bench.fill(dovecot, list(specs.values()))
        for scenario in args.selected:
            if scenario.delivery not in ("maildir", "smtp"):
                log(f"{scenario.name}: delivery {scenario.delivery} is not supported")
                continue
            tools = [TOOLS[n] for n in tools_for(scenario, args) if n not in skipped]
            log(f"== {scenario.name}: {scenario.description}")
            bench.warm_up(scenario)
            for number in range(1, args.runs + 1):
                for tool in tools:
                    result = bench.run_one(scenario, tool, number)
                    bench.results.append(result)
                    verdict = "ok" if result.correct else "; ".join(result.problems)
                    machine = ""
                    if result.machine_cpu is not None:
                        machine = f" ({result.machine_cpu:.2f} s machine)"
                    log(
                        f"   {tool.name:<9} run {number}: {result.wall:7.2f} s wall "
                        f"{result.cpu:6.2f} s CPU{machine} {result.max_rss_mb:6.1f} MB  {verdict}"
                    )
    elapsed = time.perf_counter() - started
    for path in bench.discard:
        shutil.rmtree(path, ignore_errors=True)
    baselines = {s.name: s.baseline for s in args.selected if s.baseline}
    summaries = summarise(bench.results, baselines)
    print(table(summaries))
    print(f"\n{len(bench.results)} runs in {elapsed:.0f} s (including setup)")
    path = write_json(
        RESULTS,
        settings={
            "quick": args.quick,
            "runs": args.runs,
            "scenarios": [s.name for s in args.selected],
            "tools": args.tools,
            "delay_ms": args.delay_ms,
            "elapsed_s": elapsed,
        },
        environment={
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "tools": tool_versions(),
        },
        results=bench.results,
        summaries=summaries,
        skipped=skipped,
    )
    print(f"results: {path}")
    failed = [s for s in summaries if not s.correct]
    if args.quick and ("gpopd" in skipped or not summaries):
        return 1
    return 1 if failed else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM and SIGINT (ignored in a background job) both unwind the stack,
    # so Dovecot, the proxy and a running tool are always stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
