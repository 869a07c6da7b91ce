"""The file-system floor script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import fileops


@pytest.mark.parametrize("sync", [False, True])
def test_every_file_ends_in_new_with_its_size(tmp_path: Path, sync: bool) -> None:
    files = fileops.run(tmp_path / "md", count=300, size=100, threads=4, window=128, sync=sync)
    assert files == 300
    new = sorted((tmp_path / "md" / "new").iterdir())
    assert {path.stat().st_size for path in new} == {100}
    assert list((tmp_path / "md" / "tmp").iterdir()) == []


def test_main_reports_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fileops.main([str(tmp_path / "md"), "--count", "10", "--fsync"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"] == 10
    assert report["fsync"] is True
    assert report["wall"] >= 0


def test_an_existing_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "md" / "tmp").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        fileops.run(tmp_path / "md", count=1, size=1, threads=1, window=1, sync=False)
