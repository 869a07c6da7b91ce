"""gpopd.privatefs: owner-only files and directories whatever the umask."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpopd.privatefs import make_private_dir, open_private


@pytest.fixture(params=[0o022, 0o277, 0o000])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_file_is_0600_and_writable_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """A file created through open_private is 0600 under umasks 022, 277 and 000."""
    path = tmp_path / "f"
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
    assert mode(path) == 0o600
    assert path.read_bytes() == b"x"


def test_existing_file_opened_without_excl_is_made_private(tmp_path: Path) -> None:
    """Opening an existing 0644 file without O_EXCL leaves it 0600."""
    path = tmp_path / "f"
    path.write_bytes(b"")
    path.chmod(0o644)
    os.close(open_private(path, os.O_RDWR | os.O_CREAT))
    assert mode(path) == 0o600


def test_excl_file_whose_mode_cannot_be_set_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With O_EXCL the file is ours: when fchmod fails it is removed and the error raised."""
    old = os.umask(0o277)
    monkeypatch.setattr(os, "fchmod", _fail)
    try:
        with pytest.raises(OSError, match="Operation not permitted"):
            open_private(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    finally:
        os.umask(old)
    assert list(tmp_path.iterdir()) == []


def test_directory_is_0700_and_an_existing_file_is_refused(tmp_path: Path, umask: int) -> None:
    """make_private_dir creates 0700, leaves an existing directory alone, refuses a file."""
    make_private_dir(tmp_path / "d")
    assert mode(tmp_path / "d") == 0o700
    (tmp_path / "d").chmod(0o750)
    make_private_dir(tmp_path / "d")
    assert mode(tmp_path / "d") == 0o750
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        make_private_dir(tmp_path / "file")


def _fail(fd: int, mode: int) -> None:
    raise OSError(errno.EPERM, os.strerror(errno.EPERM))
