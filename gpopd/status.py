"""``gpopd status``: what the daemon and each account are doing, from the state DB alone.

Nothing here talks to a server or to the daemon: the daemon records its pid,
a heartbeat, each account's schedule and every poll in the state database,
and this module reads them, typically from another process while the daemon
writes (``Store(state_dir, readonly=True)``).  A daemon record alone proves
nothing after a crash or a ``kill -9``, hence the two checks: the pid must
exist and the heartbeat must be recent.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpopd.accountlock import pid_alive
from gpopd.store import Store
from gpopd.tokencache import token_status

__all__ = [
    "HEARTBEAT_STALE_AFTER",
    "AccountStatus",
    "DaemonState",
    "DaemonStatus",
    "OAuthStatus",
    "PollCounts",
    "attach_oauth",
    "collect",
    "daemon_status",
    "format_bytes",
    "format_span",
    "printable",
    "render_json",
    "render_text",
]

# A daemon whose heartbeat is older than this is reported as not responding.
# Several heartbeat periods, so that one slow store write is no alarm.
HEARTBEAT_STALE_AFTER = 180.0
# The error column of the text table; the JSON output always has it whole.
ERROR_WIDTH = 60
JSON_FORMAT_VERSION = 1
# Warn this long before a refresh token with a known end stops working.
REFRESH_TOKEN_WARN_BEFORE = 2 * 86400.0


class DaemonState(enum.Enum):
    RUNNING = "running"
    NOT_RUNNING = "not running"  # no record: never started, or stopped cleanly
    DEAD = "dead"  # a record whose process is gone: crashed or killed
    NOT_RESPONDING = "not responding"  # the process exists, the heartbeat is stale


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    state: DaemonState
    pid: int | None = None
    started_at: float | None = None
    version: str | None = None
    heartbeat_at: float | None = None

    @property
    def running(self) -> bool:
        return self.state is DaemonState.RUNNING


@dataclass(frozen=True, slots=True)
class PollCounts:
    """Polls since the daemon started; ``truncated``: pruned history, lower bounds."""

    polls: int = 0
    ok: int = 0
    failed: int = 0
    delivered: int = 0
    bytes: int = 0
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class OAuthStatus:
    """An OAuth2 account's token times (from the token cache); never a token."""

    source: str  # "refresh_token" or "access_token" (a source read for every session)
    access_token_expires_at: float | None = None
    last_refresh_at: float | None = None
    refresh_token_obtained_at: float | None = None
    refresh_token_expires_at: float | None = None

    def warning(self, now: float) -> str | None:
        end = self.refresh_token_expires_at
        if end is None:
            return None
        if end <= now:
            return f"refresh token expired {format_span(now - end)} ago: run gpopd auth"
        if end - now < REFRESH_TOKEN_WARN_BEFORE:
            return f"refresh token expires in {format_span(end - now)}: run gpopd auth"
        return None


@dataclass(frozen=True, slots=True)
class AccountStatus:
    name: str
    last_poll_at: float | None = None  # start of the newest finished poll
    last_finished_at: float | None = None
    outcome: str | None = None
    error: str | None = None
    last_delivered: int = 0
    last_bytes: int = 0
    polling_since: float | None = None  # the newest poll has not finished
    next_poll_at: float | None = None
    interval: float | None = None
    consecutive_failures: int = 0
    since_start: PollCounts | None = None
    total_delivered: int = 0
    pending: int = 0
    skipped: int = 0
    oauth: OAuthStatus | None = None


def daemon_status(
    store: Store, now: float, *, stale_after: float = HEARTBEAT_STALE_AFTER
) -> DaemonStatus:
    info = store.daemon_info()
    if info is None:
        return DaemonStatus(DaemonState.NOT_RUNNING)
    pid = int(info["pid"])
    heartbeat = info["heartbeat_at"]
    if not pid_alive(pid):
        state = DaemonState.DEAD
    elif heartbeat is None or now - float(heartbeat) > stale_after:
        state = DaemonState.NOT_RESPONDING
    else:
        state = DaemonState.RUNNING
    return DaemonStatus(state, pid, info["started_at"], info["version"], heartbeat)


def collect(store: Store, now: float, accounts: Sequence[str] | None) -> list[AccountStatus]:
    """The status of each named account, or of every account the store knows, sorted.

    An account named but never polled gets an all-empty status, so that a
    fresh configuration shows every account.
    """
    schedules = store.schedules()
    names = list(accounts) if accounts is not None else sorted({*store.accounts(), *schedules})
    daemon = store.daemon_info()
    return [_account(store, name, now, schedules.get(name), daemon) for name in names]


def _account(
    store: Store,
    name: str,
    now: float,
    schedule: dict[str, Any] | None,
    daemon: dict[str, Any] | None,
) -> AccountStatus:
    history = store.poll_history(name, limit=2)
    polling_since = None
    if history and history[0]["finished_at"] is None:
        polling_since = history[0]["started_at"]
    finished = next((poll for poll in history if poll["finished_at"] is not None), None)
    since_start = None
    if daemon is not None:
        since_start = PollCounts(**store.polls_since(name, float(daemon["started_at"])))
    fields: dict[str, Any] = {}
    if finished is not None:
        fields = {
            "last_poll_at": finished["started_at"],
            "last_finished_at": finished["finished_at"],
            "outcome": finished["outcome"],
            "error": finished["error"],
            "last_delivered": finished["delivered"],
            "last_bytes": finished["bytes"],
        }
    if schedule is not None:
        fields["next_poll_at"] = schedule["next_poll_at"]
        fields["interval"] = schedule["interval"]
        fields["consecutive_failures"] = schedule["consecutive_failures"]
    return AccountStatus(
        name,
        polling_since=polling_since,
        since_start=since_start,
        total_delivered=store.delivered_count(name),
        pending=len(store.pending(name)),
        skipped=len(store.skipped_uids(name, now)),
        **fields,
    )


def attach_oauth(
    accounts: Sequence[AccountStatus], state_dir: Path, sources: Mapping[str, str]
) -> list[AccountStatus]:
    """Add token times to the accounts named in ``sources`` (name -> token source kind)."""
    result = []
    for acc in accounts:
        source = sources.get(acc.name)
        if source is not None:
            times = token_status(state_dir, acc.name)
            oauth = OAuthStatus(
                source,
                access_token_expires_at=times["access_token_expires_at"],
                last_refresh_at=times["last_refresh_at"],
                refresh_token_obtained_at=times["refresh_token_obtained_at"],
                refresh_token_expires_at=times["refresh_token_expires_at"],
            )
            result.append(dataclasses.replace(acc, oauth=oauth))
        else:
            result.append(acc)
    return result


# -- text -----------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` on one line: server-supplied text may hold control characters."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def format_span(seconds: float) -> str:
    """A duration as a person reads it: ``45s``, ``3m``, ``2h 5m``, ``3d 4h``."""
    total = int(abs(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _ago(at: float | None, now: float) -> str:
    if at is None:
        return "never"
    if now - at < 1:
        return "just now"
    return f"{format_span(now - at)} ago"


def _next(acc: AccountStatus, daemon: DaemonStatus, now: float) -> str:
    if acc.polling_since is not None and daemon.running:
        return "polling now"
    if not daemon.running or acc.next_poll_at is None:
        return "-"
    if acc.next_poll_at <= now:
        return "due"
    return f"in {format_span(acc.next_poll_at - now)}"


def _truncate(text: str, width: int) -> str:
    text = " ".join(printable(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def _daemon_line(daemon: DaemonStatus, now: float) -> str:
    version = f"gpopd {daemon.version}" if daemon.version else "gpopd"
    if daemon.state is DaemonState.NOT_RUNNING:
        return f"{version}: daemon not running"
    line = f"{version}: daemon {daemon.state.value}, pid {daemon.pid}"
    if daemon.started_at is not None:
        line += f", up {format_span(now - daemon.started_at)}"
    if daemon.heartbeat_at is not None:
        line += f", heartbeat {_ago(daemon.heartbeat_at, now)}"
    if daemon.state is DaemonState.DEAD:
        line += " (the process is gone: crashed or killed)"
    return line


def render_text(daemon: DaemonStatus, accounts: Sequence[AccountStatus], now: float) -> str:
    """The daemon line, one row per account, then the counters of each account."""
    lines = [_daemon_line(daemon, now)]
    if not accounts:
        lines.append("no accounts")
        return "\n".join(lines) + "\n"
    rows = []
    for acc in accounts:
        outcome = acc.outcome or "-"
        if acc.consecutive_failures > 1:
            outcome += f" (x{acc.consecutive_failures})"
        delivered = (
            f"{acc.last_delivered} ({format_bytes(acc.last_bytes)})"
            if acc.outcome is not None
            else "-"
        )
        rows.append(
            [
                printable(acc.name),
                _ago(acc.last_finished_at or acc.last_poll_at, now),
                outcome,
                delivered,
                _next(acc, daemon, now),
                _truncate(acc.error or "", ERROR_WIDTH),
            ]
        )
    lines += [
        "",
        *_table(["ACCOUNT", "LAST POLL", "OUTCOME", "DELIVERED", "NEXT POLL", "ERROR"], rows),
    ]
    counters = []
    for acc in accounts:
        since = acc.since_start
        more = "+" if since is not None and since.truncated else ""
        counters.append(
            [
                printable(acc.name),
                f"{since.polls}{more}" if since else "-",
                f"{since.ok}{more}" if since else "-",
                f"{since.failed}{more}" if since else "-",
                f"{since.delivered}{more}" if since else "-",
                format_bytes(since.bytes) if since else "-",
                str(acc.total_delivered),
                str(acc.pending),
                str(acc.skipped),
            ]
        )
    header = [
        "ACCOUNT",
        "POLLS",
        "OK",
        "FAILED",
        "DELIVERED",
        "BYTES",
        "TOTAL",
        "PENDING",
        "SKIPPED",
    ]
    lines += [
        "",
        "since the daemon started; TOTAL: every message ever delivered",
        *_table(header, counters),
    ]
    lines += _oauth_lines(accounts, now)
    return "\n".join(lines) + "\n"


def _until(at: float | None, now: float, word: str) -> str:
    if at is None:
        return "-"
    if at <= now:
        return "expired" if word == "expires" else f"{word} {format_span(now - at)} ago"
    return f"{word} in {format_span(at - now)}"


def _oauth_lines(accounts: Sequence[AccountStatus], now: float) -> list[str]:
    rows = []
    for acc in accounts:
        oauth = acc.oauth
        if oauth is None:
            continue
        if oauth.source != "refresh_token":
            rows.append([printable(acc.name), "from access_token, per session", "-", "-", "-", ""])
            continue
        age = (
            f"{format_span(now - oauth.refresh_token_obtained_at)}"
            if oauth.refresh_token_obtained_at is not None
            else "unknown"
        )
        rows.append(
            [
                printable(acc.name),
                _until(oauth.access_token_expires_at, now, "expires"),
                _ago(oauth.last_refresh_at, now),
                age,
                _until(oauth.refresh_token_expires_at, now, "expires"),
                oauth.warning(now) or "",
            ]
        )
    if not rows:
        return []
    header = ["ACCOUNT", "ACCESS TOKEN", "LAST REFRESH", "REFRESH TOKEN AGE", "ENDS", "WARNING"]
    return ["", "OAuth2 tokens", *_table(header, rows)]


# -- JSON -----------------------------------------------------------------------


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _account_json(acc: AccountStatus, now: float) -> dict[str, Any]:
    since = acc.since_start
    return {
        "name": acc.name,
        "last_poll": {
            "started_at": _iso(acc.last_poll_at),
            "finished_at": _iso(acc.last_finished_at),
            "outcome": acc.outcome,
            "error": acc.error,
            "delivered": acc.last_delivered,
            "bytes": acc.last_bytes,
        }
        if acc.outcome is not None
        else None,
        "polling_since": _iso(acc.polling_since),
        "next_poll_at": _iso(acc.next_poll_at),
        "interval": acc.interval,
        "consecutive_failures": acc.consecutive_failures,
        "since_start": None
        if since is None
        else {
            "polls": since.polls,
            "ok": since.ok,
            "failed": since.failed,
            "delivered": since.delivered,
            "bytes": since.bytes,
            "truncated": since.truncated,
        },
        "total_delivered": acc.total_delivered,
        "pending": acc.pending,
        "skipped": acc.skipped,
        "oauth": _oauth_json(acc.oauth, now),
    }


def _oauth_json(oauth: OAuthStatus | None, now: float) -> dict[str, Any] | None:
    if oauth is None:
        return None
    obtained = oauth.refresh_token_obtained_at
    return {
        "source": oauth.source,
        "access_token_expires_at": _iso(oauth.access_token_expires_at),
        "last_refresh_at": _iso(oauth.last_refresh_at),
        "refresh_token_obtained_at": _iso(obtained),
        "refresh_token_age": None if obtained is None else round(now - obtained),
        "refresh_token_expires_at": _iso(oauth.refresh_token_expires_at),
        "warning": oauth.warning(now),
    }


def render_json(
    daemon: DaemonStatus, accounts: Sequence[AccountStatus], now: float | None = None
) -> str:
    """One JSON document, keys sorted, times in ISO 8601 UTC; ``format`` versions it."""
    now = time.time() if now is None else now
    document = {
        "format": JSON_FORMAT_VERSION,
        "daemon": {
            "state": daemon.state.value,
            "running": daemon.running,
            "pid": daemon.pid,
            "started_at": _iso(daemon.started_at),
            "version": daemon.version,
            "heartbeat_at": _iso(daemon.heartbeat_at),
        },
        "accounts": [_account_json(acc, now) for acc in accounts],
    }
    return json.dumps(document, sort_keys=True, indent=2) + "\n"
