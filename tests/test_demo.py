"""`gpopd demo`, the README's first command: it must work from a fresh directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_demo(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpopd", "demo"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_delivers_its_40_messages_and_then_none_twice(tmp_path: Path) -> None:
    """A first demo delivers all 40 sample messages; a second one skips them all."""
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "gpopd demo: 40 message(s) delivered" in first.stderr
    new = tmp_path / "gpopd-demo" / "Maildir" / "new"
    assert len(list(new.iterdir())) == 40
    second = run_demo(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "gpopd demo: 0 message(s) delivered" in second.stderr
    assert len(list(new.iterdir())) == 40
