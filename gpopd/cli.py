"""Command line: ``gpopd poll``, ``gpopd check-config``, ``gpopd demo``.

Exit codes follow sysexits(3): 0 success, 64 usage, 75 a poll failed
(temporary: try again later), 78 configuration error.

Each command imports what only it needs when it runs, and the ``gpopd``
command leaves through ``os._exit`` once everything is closed and flushed:
a ``gpopd poll`` from cron or a timer should not pay for the daemon, the
status renderer or the interpreter's teardown of every object (together
about 0.2 s of a 0.8 s start-up, most of the rest being pydantic).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import structlog

from gpopd import __version__, logs, pop3
from gpopd.config import Account, Settings, config_path, load_config
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

    auth = commands.add_parser(
        "auth",
        parents=[common],
        help="authorize gpopd for an OAuth2 account in a browser; store the refresh token",
        description=(
            "Print an authorization URL, wait for the browser's redirect to a listener on "
            "127.0.0.1 (or a pasted redirect URL or code), exchange the code (PKCE) and store "
            "the refresh token where the account's refresh_token source points."
        ),
    )
    auth.add_argument("account", metavar="ACCOUNT")
    auth.add_argument(
        "--port", type=int, default=0, help="port of the loopback listener (default: any free)"
    )
    auth.add_argument(
        "--paste",
        action="store_true",
        help="also read the redirected URL or the code from stdin (headless servers)",
    )
    auth.add_argument(
        "--print-token",
        action="store_true",
        help="show the refresh token once on the terminal instead of writing it to a file "
        "(for refresh_token sources other than {file: ...})",
    )

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


def entry() -> None:
    """The ``gpopd`` command: ``main()``, then a quick exit.

    When ``main()`` returns, every file, socket and database it opened is
    closed and every delivery durable; only logging may hold buffered lines.
    """
    code = main()
    logs.flush()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
        if args.command == "auth":
            return _cmd_auth(args)
        if args.command == "demo":
            from gpopd.demo import run_demo  # noqa: PLC0415 - see the module docstring

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
    from gpopd import status  # noqa: PLC0415 - see the module docstring

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
    oauth_sources = {
        name: "access_token" if oauth.access_token is not None else "refresh_token"
        for name in names
        if (oauth := settings.accounts[name].oauth) is not None
    }
    accounts = status.attach_oauth(accounts, settings.state_dir, oauth_sources)
    text = (
        status.render_json(daemon, accounts, now)
        if args.json
        else status.render_text(daemon, accounts, now)
    )
    print(text, end="" if text.endswith("\n") else "\n")
    return EX_OK


def _cmd_serverinfo(args: argparse.Namespace) -> int:
    from gpopd.serverinfo import render, server_info  # noqa: PLC0415 - see the module docstring

    settings = _load(args)
    account = _account(settings, args.account)
    tracer = protocol_tracer() if args.trace else None
    try:
        info = asyncio.run(server_info(account, tracer, state_dir=settings.state_dir))
    except (GpopdError, pop3.ProtocolError, OSError) as exc:
        print(f"gpopd: {args.account}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    print(render(info), end="")
    return EX_OK


def _cmd_retry(args: argparse.Namespace) -> int:
    settings = _load(args)
    _account(settings, args.account)
    with Store(settings.state_dir) as store:
        store.clear_skipped(args.account)
    print(f"{args.account}: messages set aside will be tried again at the next poll")
    return EX_OK


def _cmd_auth(args: argparse.Namespace) -> int:
    from gpopd import authflow  # noqa: PLC0415 - keeps httpx out of the other commands

    # Secrets are not read at load: the refresh token may not exist yet.
    settings = load_config(
        config_path(args.config, os.environ), environ=os.environ, resolve_secrets=False
    )
    _logs_for(args)(settings)
    account = _account(settings, args.account)
    paste = args.paste or sys.stdin.isatty()
    try:
        asyncio.run(
            authflow.run_flow(
                account,
                settings.state_dir,
                environ=os.environ,
                out=sys.stdout,
                err=sys.stderr,
                port=args.port,
                read_line=authflow.stdin_reader(sys.stdin) if paste else None,
                print_token=args.print_token,
            )
        )
    except ConfigError:
        raise
    except (GpopdError, OSError) as exc:
        print(f"gpopd: {args.account}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    return EX_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    print(f"configuration OK: {len(settings.accounts)} account(s)")
    return EX_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from gpopd.daemon import Daemon  # noqa: PLC0415 - see the module docstring

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
