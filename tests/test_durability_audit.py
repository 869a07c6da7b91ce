"""The commit order, read from the system calls of a real `gpopd poll` (strace)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.corpus import mixed_corpus
from tests.support.fakepop import FakePop3
from tests.support.gpopd_config import AccountSpec, write_config

MESSAGES = mixed_corpus(6, seed=71)


def first_index(lines: list[str], pattern: str, start: int = 0) -> int:
    regex = re.compile(pattern)
    for n in range(start, len(lines)):
        if regex.search(lines[n]):
            return n
    raise AssertionError(f"no system call matches {pattern!r} after line {start}")


async def test_fsync_link_dirsync_commit_then_dele(tmp_path: Path) -> None:
    """For every message: file fsync, link into new/, fsync of new/, store commit, then DELE."""
    strace = shutil.which("strace")
    assert strace, "strace is not installed: apt-get install strace"
    async with FakePop3(MESSAGES) as server:
        spec = AccountSpec(
            "alice",
            server.port,
            server.user,
            server.password,
            tmp_path / "Maildir",
            tls="none",
            keep=False,
        )
        config = write_config(tmp_path, [spec])
        trace = tmp_path / "strace.log"
        done = await asyncio.to_thread(
            subprocess.run,
            [strace, "-f", "-qq", "-yy", "-s", "32", "-o", str(trace),
             "-e", "trace=fsync,fdatasync,link,linkat,rename,renameat,write,sendto",
             sys.executable, "-m", "gpopd", "poll", "--config", str(config)],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    assert server.deleted == set(range(1, len(MESSAGES) + 1))
    lines = trace.read_text().splitlines()
    names = sorted(p.name for p in (tmp_path / "Maildir" / "new").iterdir())
    assert len(names) == len(MESSAGES)
    for name in names:
        quoted = re.escape(name)
        synced = first_index(lines, rf"f(data)?sync\(\d+<[^>]*/tmp/{quoted}>")
        linked = first_index(lines, rf"link(at)?\(.*tmp/{quoted}.*new/{quoted}", synced)
        dir_synced = first_index(lines, r"fsync\(\d+<[^>]*/Maildir/new>\)", linked)
        committed = first_index(lines, r"f(data)?sync\(\d+<[^>]*gpopd\.db-wal>", dir_synced)
        first_index(lines, r'(write|sendto)\(\d+<TCP:\[.*?\]>, "DELE ', committed)
    # And no DELE at all before the first store commit of a delivery.
    first_dele = first_index(lines, r'(write|sendto)\(\d+<TCP:\[.*?\]>, "DELE ')
    first_link = first_index(lines, r"link(at)?\(.*/Maildir/tmp/")
    assert first_link < first_dele
