"""The start-up measurements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import startup


def test_one_run_of_each_item_is_measured(tmp_path: Path) -> None:
    """Every item gets a time; gpopd reaches its connect, later than a bare interpreter exits."""
    result = startup.measure(1, tmp_path)
    assert set(result) == {
        "interpreter",
        "floor_imports",
        "fixed_stack_imports",
        "gpopd_import",
        "gpopd_to_connect",
    }
    for item in result.values():
        [run] = item["runs"]
        assert isinstance(run, float)
        assert 0 < run < startup.ACCEPT_TIMEOUT
        assert item["median"] == run
    assert result["gpopd_to_connect"]["median"] > result["interpreter"]["median"]
    # The poll got as far as preparing its Maildir before connecting.
    assert (tmp_path / "run-0" / "Maildir" / "new").is_dir()


def test_a_failing_import_is_an_error() -> None:
    with pytest.raises(Exception, match="returned non-zero exit status"):
        startup.time_imports("import gpopd_no_such_module")


def test_main_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert startup.main(["--runs", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["gpopd_to_connect"]["median"] > 0
