"""A scriptable stand-in for a mail delivery agent, driven by its arguments.

Usage: fake_mda.py MODE [ARGS...]; see the functions below for each mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def record(outdir: str, *extra: str) -> int:
    """Store the message, argv, environment and session; fail if another run overlaps."""
    out = Path(outdir)
    busy = out / "busy"
    try:
        fd = os.open(busy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        (out / "overlap").write_text("two deliveries ran at once\n")
        return 1
    os.close(fd)
    try:
        data = sys.stdin.buffer.read()
        time.sleep(0.05)
        uid = os.environ.get("GPOPD_UIDL", "none")
        (out / f"{uid}.msg").write_bytes(data)
        facts = {
            "argv": list(extra),
            "env": dict(os.environ),
            "pid": os.getpid(),
            "sid": os.getsid(0),
            "pgid": os.getpgid(0),
        }
        (out / f"{uid}.json").write_text(json.dumps(facts))
        with open(out / "order", "a") as order:
            order.write(uid + "\n")
    finally:
        busy.unlink()
    return 0


def exit_with(code: str, text: str, read: str = "read", noise: str = "0") -> int:
    """Optionally read the message, print ``noise`` bytes and ``text`` on stderr, exit ``code``."""
    if read == "read":
        sys.stdin.buffer.read()
    sys.stderr.write("n" * int(noise) + text + "\n")
    sys.stderr.flush()
    return int(code)


def kill_self() -> int:
    """Read the message, then die of SIGKILL."""
    sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


def hang(pidfile: str, term: str = "die") -> int:
    """Start a child, report both pids, then never finish (``ignore`` ignores SIGTERM)."""
    if term == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child_code = "import signal, time\n"
    if term == "ignore":
        child_code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    child_code += "time.sleep(300)\n"
    child = subprocess.Popen([sys.executable, "-c", child_code])
    Path(pidfile).write_text(f"{os.getpid()} {child.pid}\n")
    sys.stderr.write("waiting for a lock that never comes\n")
    sys.stderr.flush()
    time.sleep(300)
    return 0


def background(pidfile: str) -> int:
    """Read the message, leave a child holding stdout and stderr open, and exit 0."""
    sys.stdin.buffer.read()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    Path(pidfile).write_text(f"{child.pid}\n")
    return 0


def late(code: str) -> int:
    """Read the message and exit ``code`` at once; a child says its last words 0.3 s later."""
    sys.stdin.buffer.read()
    late_words = "import sys, time; time.sleep(0.3); sys.stderr.write('LATE WORDS')"
    subprocess.Popen([sys.executable, "-c", late_words])
    return int(code)


def flood(size: str, digest_file: str) -> int:
    """Write ``size`` bytes to stdout and stderr before reading stdin, then record its hash."""
    block = b"x" * 65536
    remaining = int(size)
    while remaining > 0:
        piece = block[: min(remaining, len(block))]
        sys.stdout.buffer.write(piece)
        sys.stderr.buffer.write(piece)
        remaining -= len(piece)
    sys.stdout.buffer.write(b"END-OF-STDOUT")
    sys.stderr.buffer.write(b"END-OF-STDERR")
    sys.stdout.flush()
    sys.stderr.flush()
    Path(digest_file).write_text(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())
    return 0


MODES = {
    "record": record,
    "exit": exit_with,
    "signal": kill_self,
    "hang": hang,
    "background": background,
    "late": late,
    "flood": flood,
}

if __name__ == "__main__":
    sys.exit(MODES[sys.argv[1]](*sys.argv[2:]))
