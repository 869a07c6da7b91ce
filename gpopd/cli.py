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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import structlog

from gpopd import __version__, logs, pop3, status
from gpopd.config import Account, Settings, config_path, load_config
from gpopd.daemon import Daemon
from gpopd.demo import run_demo
from gpopd.errors import (
    EX_CONFIG,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_USAGE,
    ConfigError,
    GpopdError,
    StoreError,
)
from gpopd.fetch import PollResult, poll_once, protocol_tracer
from gpopd.serverinfo import render as render_server_info
from gpopd.serverinfo import server_info
from gpopd.store import Store

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
        "--log-file",
        metavar="FILE",
        help="also append JSON log lines to FILE (default: log_file from the configuration)",
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

    status = commands.add_parser(
        "status",
        parents=[common],
        help="show each account's last poll, outcome, error and next poll",
        description="Read the state database (also while the daemon runs) and show every account.",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("accounts", nargs="*", metavar="ACCOUNT")

    serverinfo = commands.add_parser(
        "serverinfo",
        parents=[common],
        help="connect and log in; show greeting, TLS, CAPA, message count; change nothing",
        description="Connect and authenticate like a poll, show what the server offers, QUIT.",
    )
    serverinfo.add_argument("account", metavar="ACCOUNT")

    retry = commands.add_parser(
        "retry",
        parents=[common],
        help="retry messages left on the server on purpose (too large, failed permanently)",
        description="Forget which messages of ACCOUNT were set aside, so the next poll tries them.",
    )
    retry.add_argument("account", metavar="ACCOUNT")

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
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "serverinfo":
            return _cmd_serverinfo(args)
        if args.command == "retry":
            return _cmd_retry(args)
        if args.command == "demo":
            return run_demo(Path(args.directory), args.messages, trace=args.trace)
    except ConfigError as exc:
        print_config_error(exc)
        return EX_CONFIG
    except StoreError as exc:
        print(f"gpopd: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return EX_TEMPFAIL
    parser.error(f"unknown command {args.command}")
    return EX_USAGE  # pragma: no cover - parser.error exits


def print_config_error(exc: ConfigError) -> None:
    print("gpopd: invalid configuration:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _load(args: argparse.Namespace) -> Settings:
    settings = load_config(config_path(args.config, os.environ), environ=os.environ)
    _logs_for(args)(settings)
    return settings


def _logs_for(args: argparse.Namespace) -> Callable[[Settings], None]:
    """Reconfigure logging once the configuration (and its log_file) is known."""

    def configure(settings: Settings) -> None:
        log_file = Path(args.log_file) if args.log_file else settings.log_file
        if log_file is not None:
            logs.configure(fmt=args.log_format, level=args.log_level, log_file=log_file)

    return configure


def _account(settings: Settings, name: str) -> Account:
    if name not in settings.accounts:
        raise ConfigError(f"no account named {name!r} in the configuration")
    return settings.accounts[name]


def _cmd_status(args: argparse.Namespace) -> int:
    settings = _load(args)
    names = list(args.accounts or settings.accounts)
    for name in names:
        _account(settings, name)
    now = time.time()
    try:
        with Store(settings.state_dir, readonly=True) as store:
            daemon = status.daemon_status(store, now)
            accounts = status.collect(store, now, names)
    except StoreError:
        # No state database yet: nothing was ever polled.
        daemon = status.DaemonStatus(status.DaemonState.NOT_RUNNING)
        accounts = [status.AccountStatus(name) for name in names]
    text = (
        status.render_json(daemon, accounts)
        if args.json
        else status.render_text(daemon, accounts, now)
    )
    print(text, end="" if text.endswith("\n") else "\n")
    return EX_OK


def _cmd_serverinfo(args: argparse.Namespace) -> int:
    settings = _load(args)
    account = _account(settings, args.account)
    tracer = protocol_tracer() if args.trace else None
    try:
        info = asyncio.run(server_info(account, tracer, state_dir=settings.state_dir))
    except (GpopdError, pop3.ProtocolError, OSError) as exc:
        print(f"gpopd: {args.account}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    print(render_server_info(info), end="")
    return EX_OK


def _cmd_retry(args: argparse.Namespace) -> int:
    settings = _load(args)
    _account(settings, args.account)
    with Store(settings.state_dir) as store:
        store.clear_skipped(args.account)
    print(f"{args.account}: messages set aside will be tried again at the next poll")
    return EX_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    print(f"configuration OK: {len(settings.accounts)} account(s)")
    return EX_OK


def _cmd_run(args: argparse.Namespace) -> int:
    daemon = Daemon(
        config_path(args.config, os.environ),
        os.environ,
        trace=protocol_tracer() if args.trace else None,
        configure_logs=_logs_for(args),
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
