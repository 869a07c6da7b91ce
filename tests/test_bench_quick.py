"""`python bench/run.py --quick`: the benchmark's CI mode still runs and checks correctness."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_delivers_every_message_byte_exact(tmp_path: Path) -> None:
    """The quick bench (small a and f through the delay proxy) exits 0 with every run correct."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--work", str(tmp_path / "w")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("quick-")]
    assert {row[0] for row in rows} == {"quick-a", "quick-f"}
    assert all(row[1] == "gpopd" and row[-1] == "yes" for row in rows), rows
