"""gpopd.durable: complete writes despite short ones, and the directory fsync."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpopd import durable


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=5000), step=st.integers(min_value=1, max_value=700))
def test_write_all_continues_short_writes(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, step: int
) -> None:
    """However few bytes each write(2) takes, every byte lands once, in order."""
    path = tmp_path_factory.mktemp("w") / "f"
    calls: list[int] = []
    real_write = os.write

    def short_write(fd: int, chunk: bytes) -> int:
        calls.append(len(chunk))
        return real_write(fd, bytes(chunk)[:step])

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "write", short_write)
            durable.write_all(fd, data)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert len(calls) == -(-len(data) // step)


def test_pwrite_all_writes_at_the_offset_through_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"." * 20)
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, chunk, at: real_pwrite(fd, bytes(chunk)[:3], at))
    fd = os.open(path, os.O_WRONLY)
    try:
        durable.pwrite_all(fd, b"abcdefghij", 5)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"....." + b"abcdefghij" + b"....."


def test_a_failed_write_is_raised_not_retried_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, chunk: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="No space left"):
            durable.write_all(fd, b"x")
    finally:
        os.close(fd)


def test_fsync_dir_syncs_the_directory_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        st_ = os.fstat(fd)
        synced.append((st_.st_dev, st_.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    durable.fsync_dir(tmp_path)
    here = tmp_path.stat()
    assert synced == [(here.st_dev, here.st_ino)]
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        durable.fsync_dir(tmp_path / "file")
