"""Command line: ``gpopd poll``, ``gpopd check-config``, ``gpopd demo``.

Exit codes follow sysexits(3): 0 success, 64 usage, 75 a poll failed
(temporary: try again later), 78 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import structlog

from gpopd import __version__, logs
from gpopd.config import Settings, config_path, load_config
from gpopd.daemon import Daemon
from gpopd.demo import run_demo
from gpopd.errors import EX_CONFIG, EX_OK, EX_SOFTWARE, EX_TEMPFAIL, EX_USAGE, ConfigError
from gpopd.fetch import PollResult, poll_once, protocol_tracer

log = structlog.get_logger("gpopd")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: $GPOPD_CONFIG, else /etc/gpopd/gpopd.yaml)",
    )
    common.add_argument(
        "--log-format",
        choices=["json", "console", "logfmt"],
        help="log format (default: console on a terminal, JSON lines otherwise)",
    )
    common.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    common.add_argument(
        "--trace",
        action="store_true",
        help="log the POP3 dialogue (PASS and AUTH arguments are never shown)",
    )

    parser = argparse.ArgumentParser(
        prog="gpopd",
        description="Poll POP3 mailboxes and deliver every message exactly once.",
        epilog="Exit codes: 0 ok, 64 usage, 75 a poll failed (retry later), 78 bad config.",
    )
    parser.add_argument("--version", action="version", version=f"gpopd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    commands.add_parser(
        "run",
        parents=[common],
        help="run as a service: poll every account on its schedule until stopped",
        description=(
            "Poll every account on its own schedule until SIGTERM. SIGHUP reloads the "
            "configuration, SIGUSR1 polls every account now. Speaks sd_notify under systemd."
        ),
    )

    poll = commands.add_parser(
        "poll",
        parents=[common],
        help="poll every (or each named) account once, concurrently, and exit",
        description="Poll every account (or the ones named) once, all at the same time.",
    )
    poll.add_argument("accounts", nargs="*", metavar="ACCOUNT")

    commands.add_parser(
        "check-config",
        parents=[common],
        help="validate the configuration and its secrets; exit 0 or 78",
        description="Validate the configuration, listing every problem found.",
    )

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="poll a built-in local POP3S server into ./gpopd-demo/Maildir",
        description=(
            "Start a POP3S server on 127.0.0.1 holding sample messages, poll it with the "
            "normal configuration, fetch and delivery code, and show where the mail went."
        ),
    )
    demo.add_argument(
        "--directory",
        default="gpopd-demo",
        help="where the demo puts its config, state and Maildir (default: ./gpopd-demo)",
    )
    demo.add_argument("--messages", type=int, default=40, help="sample messages (default 40)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EX_USAGE
    logs.configure(fmt=args.log_format, level=args.log_level)
    try:
        if args.command == "poll":
            return _cmd_poll(args)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "check-config":
            return _cmd_check_config(args)
        if args.command == "demo":
            return run_demo(Path(args.directory), args.messages, trace=args.trace)
    except ConfigError as exc:
        print_config_error(exc)
        return EX_CONFIG
    except KeyboardInterrupt:
        return EX_TEMPFAIL
    parser.error(f"unknown command {args.command}")
    return EX_USAGE  # pragma: no cover - parser.error exits


def print_config_error(exc: ConfigError) -> None:
    print("gpopd: invalid configuration:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _load(args: argparse.Namespace) -> Settings:
    return load_config(config_path(args.config, os.environ), environ=os.environ)


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    print(f"configuration OK: {len(settings.accounts)} account(s)")
    return EX_OK


def _cmd_run(args: argparse.Namespace) -> int:
    daemon = Daemon(
        config_path(args.config, os.environ),
        os.environ,
        trace=protocol_tracer() if args.trace else None,
    )
    return asyncio.run(daemon.run())


def _cmd_poll(args: argparse.Namespace) -> int:
    settings = _load(args)
    unknown = [name for name in args.accounts if name not in settings.accounts]
    if unknown:
        print(f"gpopd: no such account: {', '.join(unknown)}", file=sys.stderr)
        return EX_USAGE
    tracer = protocol_tracer() if args.trace else None
    progress = ProgressLine(sys.stderr) if sys.stderr.isatty() else None
    results = asyncio.run(
        poll_once(settings, args.accounts or None, trace=tracer, progress=progress)
    )
    if not results:
        return EX_SOFTWARE
    return EX_OK if all(result.ok for result in results) else EX_TEMPFAIL


class ProgressLine:
    """One line on a terminal: per account, messages done/total, bytes and rate."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = time.monotonic()

    def __call__(self, results: Sequence[PollResult], final: bool) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        parts = []
        for r in results:
            rate = r.received / elapsed / 1e6
            parts.append(
                f"{r.account}: {r.delivered}/{r.new} msgs {r.received / 1e6:.1f} MB {rate:.1f} MB/s"
            )
        self.stream.write("\r\x1b[K" + " | ".join(parts)[:500] + ("\n" if final else ""))
        self.stream.flush()
