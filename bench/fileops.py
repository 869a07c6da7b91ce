"""The file-system floor of a Maildir delivery: files only, no mail, no network.

Creates ``--count`` files of ``--size`` bytes in ``DIR/tmp``, ``--threads``
at a time, in windows of ``--window``, links each window into ``DIR/new``,
unlinks the ``tmp/`` names and fsyncs ``new/`` once a window: the file work
gpopd's Maildir commit does, without parsing, logging or the state store.
``--fsync`` also fsyncs every file before it is linked, as gpopd does.

``python bench/fileops.py DIR [--fsync]`` prints one JSON object: files,
wall and CPU seconds.  DIR must not exist yet.  Compare runs in one
invocation of the shell: on ext4 the time depends on how recently nearby
inodes were freed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _write(path: str, data: bytes, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_lane(paths: list[str], data: bytes, sync: bool) -> None:
    for path in paths:
        _write(path, data, sync)


def run(root: Path, *, count: int, size: int, threads: int, window: int, sync: bool) -> int:
    """Deliver ``count`` files under ``root``; return how many are in ``new/``."""
    tmp, new = root / "tmp", root / "new"
    for directory in (tmp, new):
        directory.mkdir(parents=True)
    data = b"x" * size
    with ThreadPoolExecutor(threads) as pool:
        for first in range(0, count, window):
            names = [f"{n}.bench" for n in range(first, min(count, first + window))]
            paths = [str(tmp / name) for name in names]
            # As gpopd's commit: each thread takes every lanes-th file.
            lanes = min(threads, len(paths))
            parts = [paths[n::lanes] for n in range(lanes)]
            list(pool.map(_write_lane, parts, [data] * lanes, [sync] * lanes))
            for name, path in zip(names, paths, strict=True):
                os.link(path, new / name)
                os.unlink(path)
            fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return len(os.listdir(new))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--fsync", action="store_true", help="fsync every file")
    args = parser.parse_args(argv)
    started, cpu = time.perf_counter(), os.times()
    files = run(
        args.dir,
        count=args.count,
        size=args.size,
        threads=args.threads,
        window=args.window,
        sync=args.fsync,
    )
    ended = os.times()
    report = {
        "files": files,
        "fsync": args.fsync,
        "threads": args.threads,
        "wall": round(time.perf_counter() - started, 3),
        "user": round(ended.user - cpu.user, 3),
        "sys": round(ended.system - cpu.system, 3),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
