"""Named crash points on the commit order, armed by ``GPOPD_FAILPOINT=NAME[:N]``.

The crash tests prove that gpopd loses and duplicates nothing whichever step
of the commit order a crash interrupts.  A random SIGKILL rarely lands
between two particular system calls; a failpoint does every time: at the
N-th time the named point is reached (default the first), the process kills
itself with SIGKILL.  Nothing is flushed, no ``finally`` block runs, no
buffered log line is written: the same as a power cut for everything but
the page cache, which the kernel keeps.

The variable is read once, at import.  Unset, ``failpoint()`` is one
comparison with ``None``.  A malformed value or an unknown name is reported
on stderr and arms nothing, so a typo cannot make a test pass for the wrong
reason (the process simply does not die).

The points, in commit order (see ``gpopd.fetch``):

Maildir
    ``after-spool-fsync`` (a message's ``tmp/`` file is durable),
    ``after-link`` (a message is linked into ``new/``),
    ``after-dir-fsync`` (``new/`` is durable for the window).
mbox
    ``after-journal-seal`` (the journal block naming the window is durable),
    ``after-append-fsync`` (the records are durable in the mbox),
    ``after-journal-commit`` (the block's ``C`` line is durable).
SMTP and LMTP
    ``after-relay-accept`` (the server accepted the message after the data).
MDA
    ``after-mda-exit`` (the MDA exited 0).
Every destination
    ``after-store-commit`` (the window is recorded as delivered),
    ``after-dele`` (DELE sent for the session's messages),
    ``before-quit`` (just before QUIT).
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["ENV_VAR", "NAMES", "arm", "armed", "failpoint", "parse"]

ENV_VAR = "GPOPD_FAILPOINT"
NAMES = frozenset(
    {
        "after-spool-fsync",
        "after-link",
        "after-dir-fsync",
        "after-journal-seal",
        "after-append-fsync",
        "after-journal-commit",
        "after-relay-accept",
        "after-mda-exit",
        "after-store-commit",
        "after-dele",
        "before-quit",
    }
)

# (name, hit count at which to die); None when disarmed, which is the fast path.
_armed: tuple[str, int] | None = None
_hits = 0
# Destinations reach their points from worker threads as well.
_lock = threading.Lock()


def parse(spec: str) -> tuple[str, int]:
    """``NAME`` or ``NAME:N`` as (name, N); ``ValueError`` for anything else."""
    name, colon, count = spec.strip().partition(":")
    if name not in NAMES:
        raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(sorted(NAMES))}")
    if not colon:
        return name, 1
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"failpoint {name}: the hit count must be a positive integer")
    return name, int(count)


def arm(spec: str | None) -> None:
    """Arm the failpoint ``spec`` (``NAME[:N]``) with its count reset; ``None`` disarms."""
    global _armed, _hits  # noqa: PLW0603 - the one switch of this module
    with _lock:
        _armed = None if spec is None else parse(spec)
        _hits = 0


def armed() -> tuple[str, int] | None:
    """The armed failpoint and its hit count, or ``None``."""
    return _armed


def failpoint(name: str) -> None:
    """Kill the process with SIGKILL if ``name`` is armed and this is its N-th hit."""
    if _armed is None:
        return
    _hit(name)


def _hit(name: str) -> None:
    global _hits  # noqa: PLW0603 - counted across threads under the lock
    armed_now = _armed
    if armed_now is None or armed_now[0] != name:
        return
    with _lock:
        _hits += 1
        if _hits < armed_now[1]:
            return
    # Unbuffered, so it survives the kill: tells a test where the process died.
    os.write(2, f"gpopd: failpoint {name} hit {_hits}: killing the process\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(128 + signal.SIGKILL)  # not reached: the kill takes effect on return


def _arm_from_environment() -> None:
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    try:
        arm(spec)
    except ValueError as exc:
        os.write(2, f"gpopd: {ENV_VAR} ignored: {exc}\n".encode())


_arm_from_environment()
