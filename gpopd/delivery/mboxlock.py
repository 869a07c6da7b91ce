"""Locking an mbox the way mail readers and MDAs expect: fcntl, then a dotlock.

The fcntl lock is taken first and the dotlock ``<mbox>.lock`` second (that
order, as Debian policy asks); neither is held while waiting for the other.
The dotlock holds ``<pid>:<host>`` (Dovecot's format): one left by a dead
process of this host is broken at once, any other once older than the
stale age.  fcntl locks belong to the process, so polls of one process
sharing an mbox are kept apart by a per-path thread lock as well.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpopd.accountlock import pid_alive
from gpopd.durable import write_all
from gpopd.errors import TemporaryDeliveryError

__all__ = [
    "LOCK_TIMEOUT",
    "STALE_LOCK_AGE",
    "MboxLocker",
    "create_dotlock",
    "create_dotlock_in_place",
    "describe",
    "process_guard",
]

# Long enough for a MUA to rewrite a large mbox, short enough that a poll
# gives up while the messages are still safe on the server.
LOCK_TIMEOUT = 30.0
# A dotlock this old is stale whoever wrote it (procmail waits 1024 s);
# one left by a dead process of this host is broken at once.
STALE_LOCK_AGE = 600.0

_LOCK_OWNER = re.compile(rb"\s*(\d+)(?::([^\s]*))?\s*")
_guards: dict[str, threading.Lock] = {}
_guards_lock = threading.Lock()


def describe(exc: OSError) -> str:
    """The reason of an ``OSError`` without the errno number."""
    return exc.strerror or str(exc)


def process_guard(path: str) -> threading.Lock:
    """The thread lock that keeps two polls of this process off the mbox at ``path``."""
    # fcntl locks belong to the process, so they cannot do this themselves.
    with _guards_lock:
        return _guards.setdefault(path, threading.Lock())


@dataclass(frozen=True, slots=True)
class MboxLocker:
    """Takes and drops the fcntl lock and the dotlock of one mbox."""

    name: str
    lock_timeout: float
    stale_lock_age: float
    host: str

    def lock(self, fd: int, real: Path, deadline: float) -> int:
        """Hold the fcntl lock on ``fd`` and the dotlock of ``real``; the dotlock's inode."""
        delay = 0.01
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise TemporaryDeliveryError(
                        f"{self.name}: cannot lock {real}: {describe(exc)}"
                    ) from exc
                holder = f"another process holds an fcntl lock on {real}"
            else:
                inode, holder = self._dotlock(Path(f"{real}.lock"))
                if inode is not None:
                    return inode
                fcntl.lockf(fd, fcntl.LOCK_UN)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TemporaryDeliveryError(
                    f"{self.name}: gave up after {self.lock_timeout:g} s: {holder}"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.25)

    def unlock(self, real: Path, inode: int) -> None:
        """Remove the dotlock of ``real`` if it is still the one this process made."""
        lock = Path(f"{real}.lock")
        with contextlib.suppress(OSError):
            if os.lstat(lock).st_ino == inode:
                os.unlink(lock)

    def _dotlock(self, lock: Path) -> tuple[int | None, str]:
        """Create the dotlock (breaking a stale one); its inode, or who holds it."""
        # Dovecot's format: lets a process of this host see that we died.
        content = f"{os.getpid()}:{self.host}".encode()
        for _ in range(3):
            try:
                inode = create_dotlock(lock, content)
            except OSError as exc:
                raise TemporaryDeliveryError(
                    f"{self.name}: cannot create {lock}: {describe(exc)}"
                ) from exc
            if inode is not None:
                return inode, ""
            holder = self._stale(lock)
            if holder is not None:
                return None, holder
        return None, f"{lock} keeps coming back"

    def _stale(self, lock: Path) -> str | None:
        """Remove ``lock`` if it is stale; otherwise say who holds it."""
        try:
            lfd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{lock} exists and cannot be read: {describe(exc)}"
        try:
            stat = os.fstat(lfd)
            owner = _LOCK_OWNER.fullmatch(os.read(lfd, 256))
        except OSError as exc:
            return f"{lock} exists and cannot be read: {describe(exc)}"
        finally:
            os.close(lfd)
        age = time.time() - stat.st_mtime
        pid = int(owner[1]) if owner else 0
        host = owner[2].decode("utf-8", "replace") if owner and owner[2] else None
        dead = pid > 0 and host == self.host and not _alive(pid)
        if not dead and age <= self.stale_lock_age:
            by = f" by pid {pid}" + (f" on {host}" if host else "") if pid else ""
            return f"{lock} is held{by} ({age:.0f} s old)"
        with contextlib.suppress(OSError):
            # Only the lock judged stale: another process may have just
            # broken it and taken a fresh one.
            if os.lstat(lock).st_ino == stat.st_ino:
                os.unlink(lock)
        return None


def create_dotlock(lock: Path, content: bytes) -> int | None:
    """Create ``lock`` holding ``content``; its inode, or None if it exists.

    The file is written unnamed and then linked into place, so a crash
    cannot leave an empty lock that nobody can tell is stale.
    """
    try:
        fd = os.open(lock.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError:
        return create_dotlock_in_place(lock, content)  # no O_TMPFILE here (e.g. NFS)
    try:
        write_all(fd, content)
        dirfd = os.open(lock.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # With a dir fd os.link() is linkat(AT_SYMLINK_FOLLOW), which
            # links the unnamed file itself rather than the /proc symlink.
            os.link(f"/proc/self/fd/{fd}", lock.name, dst_dir_fd=dirfd)
        except FileExistsError:
            return None
        except OSError:
            return create_dotlock_in_place(lock, content)  # no /proc
        finally:
            os.close(dirfd)
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def create_dotlock_in_place(lock: Path, content: bytes) -> int | None:
    """Create ``lock`` by name where unnamed files cannot be linked; as ``create_dotlock``."""
    # A crash between creating and writing leaves an empty lock, broken
    # only once it is older than the stale age.
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return None
    try:
        write_all(fd, content)
        return os.fstat(fd).st_ino
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        raise
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    # The guard is ours, so a dotlock naming this process is a leftover.
    return pid != os.getpid() and pid_alive(pid)
