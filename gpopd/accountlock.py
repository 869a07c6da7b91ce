"""One gpopd process at a time per account: an flock on a file in the state directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Self

from gpopd import privatefs
from gpopd.errors import StoreError

__all__ = ["AccountLock", "make_state_dir", "pid_alive"]


def make_state_dir(path: Path) -> None:
    """Create the state directory ``path`` for the owner only, its parents as usual."""
    path.parent.mkdir(parents=True, exist_ok=True)
    privatefs.make_private_dir(path)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user (the daemon's DynamicUser)
    return True


class AccountLock:
    """An exclusive, non-blocking lock on one account across gpopd processes.

    ``flock`` belongs to the open file description, so the kernel releases
    it when the holder dies; the lock file itself is never removed, since
    removing it would let two processes lock two different files.
    """

    def __init__(self, state_dir: Path, account: str) -> None:
        self.account = account
        # Account names come from the configuration; quoting keeps "/" and
        # other surprises out of the path.
        filename = urllib.parse.quote(account, safe="@+-_.") + ".lock"
        self.path = Path(state_dir) / "locks" / filename
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        if self._fd >= 0:
            raise RuntimeError(f"the lock of account {self.account} is already held here")
        try:
            make_state_dir(self.path.parent.parent)
            privatefs.make_private_dir(self.path.parent)
            fd = privatefs.open_private(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_pid(fd)
            os.close(fd)
            raise StoreError(
                f"account {self.account} is being polled by another gpopd process (pid {holder})"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {exc}") from exc
        # The pid only makes the "busy" message nicer; the lock holds without it.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @staticmethod
    def _read_pid(fd: int) -> str:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return "unknown"
        return text if text.isdigit() else "unknown"
