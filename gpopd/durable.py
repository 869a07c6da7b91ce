"""The system-call steps every durable file of gpopd is written with.

A write(2) may be short (a full disk, a signal), so ``write_all`` and
``pwrite_all`` continue until every byte is written or one call fails; a new
or renamed directory entry survives a crash only once its directory is
fsync'd, which ``fsync_dir`` does.  Maildir, mbox and its journal, the mbox
dotlock, the token cache and the log file share these rather than each
keeping its own loop.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "pwrite_all", "write_all"]


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` at the file position (short writes continued)."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                done += os.write(fd, rest)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (short writes continued)."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                done += os.pwrite(fd, rest, offset + done)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
