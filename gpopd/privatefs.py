"""Files and directories for the owner only, whatever the umask.

Mail, state, tokens and logs are private: files 0600, directories 0700.
``open`` and ``mkdir`` filter the requested mode through the umask, which
may take away the owner's own bits (umask 0277), so every creation checks
the mode it got and corrects it.  This is the one place that does so.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

__all__ = ["make_private_dir", "open_private"]


def open_private(path: str | Path, flags: int) -> int:
    """``os.open(path, flags)`` with mode 0600 for a file it creates; the descriptor.

    An existing file opened without ``O_EXCL`` is also set to 0600.  When the
    mode cannot be set, the descriptor is closed and, if ``O_EXCL`` says the
    file is ours, the file is removed.
    """
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o777 != 0o600:
            os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        if flags & os.O_EXCL:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return fd


def make_private_dir(path: Path) -> None:
    """Create directory ``path`` 0700 if missing; an existing one is left as it is.

    Raises ``NotADirectoryError`` when ``path`` exists and is something else.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
        return
    os.chmod(path, 0o700)
