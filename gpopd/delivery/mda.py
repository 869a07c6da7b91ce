"""Delivery through a mail delivery agent: pipe each message into a command.

Theory of operation: the message is spooled while RETR streams it (a
failure halfway must not hand a half message to the MDA), then at commit
time the configured argv is started without a shell, in a new session so
that a time limit can kill the whole process group, with the message on
its stdin.  stdout and stderr are read while stdin is written (an MDA that
talks a lot before it reads must not deadlock us) and only a bounded head
and tail of each is kept.  The exit status decides, as sysexits(3) and
every MDA since sendmail agree: 0 delivered, 75 (EX_TEMPFAIL) retry at the
next poll, anything else (a signal included) a permanent failure that
keeps the message on the server.

Server-controlled text (UID, sender) reaches the MDA only through the
``GPOPD_*`` environment variables, reduced to a safe character set; argv is
never templated and no shell ever sees it.

At-least-once, not exactly-once: an MDA keeps no trace gpopd could find
again, so ``find_delivered()`` recognises nothing.  The window is between
the MDA's exit 0 (the message is in its mailbox) and the store's commit
that records the UID: a crash or power loss there, a time limit that fires
after the MDA already delivered, or a poll cancelled while the MDA runs,
delivers that message a second time at the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shutil
import signal
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING

from gpopd.delivery.base import CommitResult, Destination, MessageInfo, Staged, Writer
from gpopd.delivery.spool import SpooledMessage, SpoolWriter
from gpopd.errors import (
    EX_TEMPFAIL,
    DeliveryError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from gpopd.failpoints import failpoint

if TYPE_CHECKING:
    from gpopd.config import MdaDelivery

__all__ = [
    "CAPTURE_LIMIT",
    "ENV_VALUE_LIMIT",
    "HEADER_SCAN_LIMIT",
    "MdaDestination",
    "MdaPermanentError",
    "MdaRun",
    "MdaStaged",
    "MdaTemporaryError",
    "envelope_sender",
    "safe_env_value",
]

# Bytes kept of each of stdout and stderr: half from the start (usage
# errors), half from the end (the final complaint).
CAPTURE_LIMIT = 4096
# Longest value of a GPOPD_* variable; an address is at most 254 octets.
ENV_VALUE_LIMIT = 256
# The header section is searched for the sender only this far; the rest of
# the message goes to the spool unexamined.
HEADER_SCAN_LIMIT = 64 * 1024
# Header values longer than this are not a sender worth parsing.
_HEADER_VALUE_LIMIT = 2048
# Written to the MDA in pieces this big so a message never sits whole in memory.
STDIN_CHUNK = 256 * 1024
# After SIGTERM at the time limit, how long the MDA may take to clean up
# (procmail removes its lock files) before the group gets SIGKILL.
KILL_GRACE = 2.0
# Output still in flight when the MDA has exited is awaited this long; a
# descendant that keeps the pipes open is not waited for.
PIPE_GRACE = 1.0

# Variables a typical MDA needs to find its programs, home, locale and clock.
_INHERITED = ("PATH", "HOME", "LANG", "TZ")
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=,-]")
_SEP = re.compile(rb"\n\r?\n")
# Starting the MDA failed for want of a resource, or while its binary is
# being replaced: worth another try.  Any other failure needs a person.
_SPAWN_RETRY_ERRNOS = frozenset(
    {errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ETXTBSY}
)


def safe_env_value(value: str) -> str:
    """``value`` reduced to letters, digits and ``._@+=,-``, bounded in length.

    A leading ``-`` becomes ``_`` too: a script that passes the value on
    as an argument must not have it read as an option.
    """
    cleaned = _UNSAFE.sub("_", value[:ENV_VALUE_LIMIT])
    if cleaned.startswith("-"):
        cleaned = "_" + cleaned[1:]
    return cleaned


def _header_fields(head: bytes) -> Iterator[tuple[str, str]]:
    name: str | None = None
    value: list[str] = []
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if not line:
            break  # the body starts here
        if line[:1] in (" ", "\t") and name is not None:
            value.append(line)
            continue
        if name is not None:
            yield name, " ".join(value)
        name, colon, rest = line.partition(":")
        if colon and name and " " not in name:
            name, value = name.strip().lower(), [rest]
        else:
            name, value = None, []
    if name is not None:
        yield name, " ".join(value)


def envelope_sender(head: bytes) -> str:
    """The sender address of a message from its header section.

    The first ``Return-Path`` wins (``<>``, a bounce, gives ``""``); without
    one, the first ``From``.  Returns ``""`` when neither holds an address.
    The result is not sanitised.
    """
    first: dict[str, str] = {}
    for name, value in _header_fields(head):
        if name in ("return-path", "from") and name not in first:
            first[name] = value
    chosen = first.get("return-path", first.get("from"))
    if chosen is None or len(chosen) > _HEADER_VALUE_LIMIT:
        return ""
    return parseaddr(chosen)[1]


def _printable(text: str) -> str:
    # The excerpt ends up on one log line: escape line ends and controls.
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class _Capture:
    """Keeps the first and last ``CAPTURE_LIMIT // 2`` bytes of a stream."""

    def __init__(self, limit: int = CAPTURE_LIMIT) -> None:
        self._half = limit // 2
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self._half - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data[-self._half :]
            del self._tail[: -self._half]

    def excerpt(self) -> str:
        omitted = self.total - len(self._head) - len(self._tail)
        if not omitted:
            return _printable((self._head + self._tail).decode("utf-8", "replace").strip())
        head = _printable(self._head.decode("utf-8", "replace").lstrip())
        tail = _printable(self._tail.decode("utf-8", "replace").rstrip())
        return f"{head} [... {omitted} bytes omitted ...] {tail}"


@dataclass(frozen=True, slots=True)
class MdaRun:
    """What one run of the MDA did, for the log line of its message."""

    uid: str
    key: str
    returncode: int | None
    timed_out: bool
    seconds: float
    stdout: str
    stderr: str

    def describe(self) -> str:
        """The exit status and the output excerpts, in a person's words."""
        code = self.returncode
        if self.timed_out:
            status = "timed out; its process group was killed"
        elif code is None:
            status = "did not finish"
        elif code < 0:
            try:
                signame = signal.Signals(-code).name
            except ValueError:
                signame = "unknown"
            status = f"killed by signal {-code} ({signame})"
        elif code == EX_TEMPFAIL:
            status = f"exit status {code} (EX_TEMPFAIL)"
        else:
            status = f"exit status {code}"
        parts = [status]
        if self.stderr:
            parts.append(f"stderr: {self.stderr}")
        if self.stdout:
            parts.append(f"stdout: {self.stdout}")
        return "; ".join(parts)


class MdaTemporaryError(TemporaryDeliveryError):
    """The MDA asked to retry later, or did not finish in time."""

    def __init__(self, message: str, run: MdaRun | None = None) -> None:
        super().__init__(message)
        self.run = run


class MdaPermanentError(PermanentDeliveryError):
    """The MDA refused the message, crashed, or cannot be started."""

    def __init__(self, message: str, run: MdaRun | None = None) -> None:
        super().__init__(message)
        self.run = run


@dataclass(eq=False)
class MdaStaged(SpooledMessage):
    """A spooled message with the sender found in its header section."""

    sender: str = ""


class _MdaWriter(Writer):
    def __init__(self, info: MessageInfo, spool: SpoolWriter, owner: MdaDestination) -> None:
        self._info = info
        self._spool = spool
        self._owner = owner
        self._head = bytearray()
        self._head_done = False

    def write(self, data: bytes) -> None:
        self._spool.write(data)
        if not self._head_done:
            # Rescan only the new bytes and the end of a separator they may complete.
            start = max(len(self._head) - 2, 0)
            self._head += data[: HEADER_SCAN_LIMIT - len(self._head)]
            match = _SEP.search(self._head, start)
            if match is not None:
                del self._head[match.start() :]
                self._head_done = True
            elif len(self._head) >= HEADER_SCAN_LIMIT or self._head.startswith(b"\n"):
                self._head_done = True

    def finish(self) -> MdaStaged:
        spooled = self._spool.finish()
        staged = MdaStaged(
            spooled.info, spooled.size, spooled.file, sender=envelope_sender(bytes(self._head))
        )
        self._head = bytearray()
        self._owner._outstanding[id(staged)] = staged
        return staged

    def abort(self) -> None:
        self._spool.abort()
        self._head = bytearray()


class _MdaProtocol(asyncio.SubprocessProtocol):
    """Collects the MDA's output as it comes and paces the writes to its stdin."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stdout = _Capture()
        self.stderr = _Capture()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.stdin_closed = False
        self._loop = loop
        self._open_outputs = {1, 2}
        self._outputs_closed: asyncio.Future[None] = loop.create_future()
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        (self.stdout if fd == 1 else self.stderr).feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 0:
            self.stdin_closed = True
            self._wake()
            return
        self._open_outputs.discard(fd)
        if not self._open_outputs and not self._outputs_closed.done():
            self._outputs_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def accepting(self) -> bool:
        """Whether stdin may still be written: open and its reader alive."""
        return not self.stdin_closed and not self.exited.done()

    async def drain(self) -> None:
        while self._paused and self.accepting:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def outputs_closed(self) -> None:
        """Wait for EOF on stdout and stderr, at most ``PIPE_GRACE`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._outputs_closed), PIPE_GRACE)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    # Gone already (ESRCH) is the outcome we want; EPERM means the id now
    # belongs to someone else's group, which is not ours to signal.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class MdaDestination(Destination):
    """Pipe each message into ``command`` (an argv list; no shell)."""

    exactly_once = False

    def __init__(
        self,
        command: Sequence[str],
        *,
        timeout: float = 300.0,
        spool_dir: Path | None = None,
    ) -> None:
        if not command:
            raise ValueError("an MDA command needs at least the program")
        if timeout <= 0:
            raise ValueError("the MDA time limit must be positive")
        self.command = tuple(command)
        self.timeout = timeout
        self.name = f"mda:{self.command[0]}"
        self._spool_dir = spool_dir
        self._base_env = {
            name: value
            for name, value in os.environ.items()
            if name in _INHERITED or name.startswith("LC_")
        }
        self._outstanding: dict[int, MdaStaged] = {}
        self._last_runs: tuple[MdaRun, ...] = ()

    @classmethod
    def from_config(cls, cfg: MdaDelivery, *, spool_dir: Path | None = None) -> MdaDestination:
        """The destination an account's ``delivery: {type: mda}`` section describes."""
        return cls(cfg.command, timeout=cfg.timeout, spool_dir=spool_dir)

    @property
    def last_runs(self) -> tuple[MdaRun, ...]:
        """The runs of the latest ``commit()``, in order (output excerpts included)."""
        return self._last_runs

    async def prepare(self, account: str) -> None:
        # Fetching while the MDA cannot even be started would only fail
        # every message after downloading it.
        problem = self._unrunnable()
        if problem is not None:
            raise MdaPermanentError(f"{self.name}: {problem}")

    def open(self, info: MessageInfo) -> Writer:
        return _MdaWriter(info, SpoolWriter(info, self._spool_dir), self)

    async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
        items: list[MdaStaged] = []
        for item in staged:
            if not isinstance(item, MdaStaged):
                raise TypeError(f"{self.name} cannot commit {type(item).__name__}")
            if item.file is None:
                raise ValueError(f"message {item.info.uid!r} was already committed or released")
            items.append(item)
        results: list[CommitResult] = []
        runs: list[MdaRun] = []
        stalled: MdaRun | None = None
        try:
            # One at a time: MDAs lock the mailbox, and a window's messages
            # keep their order.
            for item in items:
                if stalled is not None:
                    # An MDA that hung on one message will hang on the next:
                    # the rest of the window waits for the next poll.
                    error: DeliveryError = MdaTemporaryError(
                        f"{self.name}: not attempted: UID {safe_env_value(stalled.uid)} timed out"
                    )
                    results.append(CommitResult(item, error))
                    continue
                try:
                    run = await self._run(item)
                except DeliveryError as exc:
                    results.append(CommitResult(item, exc))
                    continue
                runs.append(run)
                verdict = self._verdict(run)
                if verdict is None:
                    failpoint("after-mda-exit")
                results.append(CommitResult(item, verdict))
                if run.timed_out:
                    stalled = run
        finally:
            for item in items:
                self._outstanding.pop(id(item), None)
                item.release()
            self._last_runs = tuple(runs)
        return results

    async def find_delivered(self, account: str, keys: Collection[str]) -> set[str]:
        return set()

    async def close(self) -> None:
        outstanding, self._outstanding = self._outstanding, {}
        for item in outstanding.values():
            item.release()

    def _unrunnable(self) -> str | None:
        program = self.command[0]
        if os.sep in program:
            if os.path.isfile(program) and os.access(program, os.X_OK):
                return None
            return f"{program} is not an executable file"
        if shutil.which(program, path=self._base_env.get("PATH", os.defpath)) is None:
            return f"{program} is not found in PATH"
        return None

    def _environment(self, item: MdaStaged) -> dict[str, str]:
        env = dict(self._base_env)
        env["GPOPD_ACCOUNT"] = safe_env_value(item.info.account)
        env["GPOPD_UIDL"] = safe_env_value(item.info.uid)
        env["GPOPD_SENDER"] = safe_env_value(item.sender)
        return env

    def _verdict(self, run: MdaRun) -> DeliveryError | None:
        if run.returncode == 0 and not run.timed_out:
            return None
        text = f"{self.name}: UID {safe_env_value(run.uid)}: {run.describe()}"
        if run.timed_out or run.returncode == EX_TEMPFAIL:
            return MdaTemporaryError(text, run)
        return MdaPermanentError(text, run)

    async def _run(self, item: MdaStaged) -> MdaRun:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _MdaProtocol(loop),
                *self.command,
                env=self._environment(item),
                start_new_session=True,
            )
        except OSError as exc:
            text = f"{self.name}: cannot start {self.command[0]}: {exc.strerror or exc}"
            if exc.errno in _SPAWN_RETRY_ERRNOS:
                raise MdaTemporaryError(text) from exc
            raise MdaPermanentError(text) from exc
        pgid = transport.get_pid()
        timed_out = False
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    await self._feed(transport, protocol, item)
                    await asyncio.shield(protocol.exited)
            except TimeoutError:
                timed_out = True
                _killpg(pgid, signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(protocol.exited), KILL_GRACE)
                # Descendants that ignored SIGTERM, and the MDA if it did.
                _killpg(pgid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(protocol.exited), KILL_GRACE)
            await protocol.outputs_closed()
        except BaseException:
            # Cancelled: the poll is going away, and so must the MDA.
            _killpg(pgid, signal.SIGKILL)
            raise
        finally:
            transport.close()
        return MdaRun(
            uid=item.info.uid,
            key=item.info.key,
            returncode=transport.get_returncode(),
            timed_out=timed_out,
            seconds=time.monotonic() - started,
            stdout=protocol.stdout.excerpt(),
            stderr=protocol.stderr.excerpt(),
        )

    async def _feed(
        self, transport: asyncio.SubprocessTransport, protocol: _MdaProtocol, item: MdaStaged
    ) -> None:
        stdin = transport.get_pipe_transport(0)
        if not isinstance(stdin, asyncio.WriteTransport):
            raise TypeError("the MDA's stdin is not a pipe")
        chunks = item.chunks(STDIN_CHUNK)
        while protocol.accepting:
            try:
                chunk = await asyncio.to_thread(next, chunks, None)
            except OSError as exc:
                raise MdaTemporaryError(
                    f"{self.name}: cannot read the spooled message: {exc.strerror or exc}"
                ) from exc
            if chunk is None or not protocol.accepting:
                break
            stdin.write(chunk)
            await protocol.drain()
        # An MDA that stopped reading early has its say through the exit status.
        if not stdin.is_closing():
            stdin.close()
