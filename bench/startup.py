"""Start-up: what a run pays before its first byte on the wire.

Every scenario of ``run.py`` starts a new process, so each tool's time
includes its start-up: milliseconds for mpop's C, far more for a Python
client.  This measures, as medians over ``--runs`` fresh processes (with the
environment ``run.py`` gives gpopd):

- ``interpreter``: a process that does nothing;
- ``floor_imports``: a process importing what ``bench/floor.py`` imports;
- ``fixed_stack_imports``: a process importing the stack gpopd is built
  on (asyncio, ssl, sqlite3, structlog, ruamel.yaml, pydantic,
  pydantic-settings), none of gpopd's own code;
- ``gpopd_import``: a process importing ``gpopd.cli``;
- ``gpopd_to_connect``: ``gpopd poll`` from its start to its TCP connect to
  a listening socket here (arguments parsed, logging set up, the
  configuration loaded and validated, the state database opened, the
  account locked, the Maildir prepared, the TLS context built).  The
  connection is then closed and that poll fails, as it should.

The import-only processes end with ``os._exit(0)``, as gpopd's commands
do: a normal interpreter exit tears every module down, which would add tens
of milliseconds that no run of gpopd pays.

``python bench/startup.py [--runs N]`` prints one JSON object: for each
item the median, the quartiles and the runs, in seconds.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench.tools import REPO, base_env  # noqa: E402
from tests.support.certs import make_pki  # noqa: E402
from tests.support.gpopd_config import AccountSpec, write_config  # noqa: E402

FLOOR_IMPORTS = "import argparse, json, socket, ssl, sys, concurrent.futures, dataclasses, pathlib"
FIXED_STACK_IMPORTS = (
    "import argparse, asyncio, json, socket, ssl, sqlite3, concurrent.futures,"
    " structlog, ruamel.yaml, pydantic_settings; from pydantic import BaseModel"
)
# gpopd's own time limit for connecting is far longer than any start-up.
ACCEPT_TIMEOUT = 30.0


def _env() -> dict[str, str]:
    return base_env() | {"PYTHONPATH": str(REPO)}


def time_imports(code: str) -> float:
    """Seconds from starting a Python process running ``code`` to its exit."""
    argv = [sys.executable, "-c", f"{code}; import os; os._exit(0)"]
    started = time.perf_counter()
    subprocess.run(argv, env=_env(), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def time_to_connect(directory: Path, ca_file: Path) -> float:
    """Seconds from starting ``gpopd poll`` to its connection reaching us."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(ACCEPT_TIMEOUT)
        port = server.getsockname()[1]
        maildir = directory / "Maildir"
        account = AccountSpec("startup", port, "startup", "secret", maildir, ca_file=ca_file)
        config = write_config(directory, [account])
        argv = [sys.executable, "-m", "gpopd", "poll", "--config", str(config)]
        started = time.perf_counter()
        child = subprocess.Popen(
            [*argv, "--log-format", "json"],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            connection, _ = server.accept()
            elapsed = time.perf_counter() - started
            connection.close()
            child.wait(timeout=ACCEPT_TIMEOUT)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    return elapsed


def summary(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else ordered * 3
    return {
        "median": round(statistics.median(ordered), 4),
        "q1": round(quartiles[0], 4),
        "q3": round(quartiles[-1], 4),
        "runs": [round(sample, 4) for sample in samples],
    }


def measure(runs: int, work: Path) -> dict[str, dict[str, Any]]:
    pki = make_pki(work / "pki")
    items: dict[str, Callable[[int], float]] = {
        "interpreter": lambda _: time_imports("pass"),
        "floor_imports": lambda _: time_imports(FLOOR_IMPORTS),
        "fixed_stack_imports": lambda _: time_imports(FIXED_STACK_IMPORTS),
        "gpopd_import": lambda _: time_imports("import gpopd.cli"),
        "gpopd_to_connect": lambda n: time_to_connect(_run_dir(work, n), pki.ca_file),
    }
    samples: dict[str, list[float]] = {name: [] for name in items}
    # Interleaved, so that a slow minute of the machine touches every item.
    for number in range(runs):
        for name, item in items.items():
            samples[name].append(item(number))
    return {name: summary(values) for name, values in samples.items()}


def _run_dir(work: Path, number: int) -> Path:
    directory = work / f"run-{number}"
    directory.mkdir()
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=25)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="gpopd-startup-") as work:
        result = measure(args.runs, Path(work))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
