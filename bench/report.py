"""Results: one record per run, a summary per (scenario, tool), the table, JSON."""

from __future__ import annotations

import datetime as dt
import json
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    """One run of one tool in one scenario."""

    scenario: str
    tool: str
    run: int
    wall: float
    cpu: float
    cpu_user: float
    cpu_sys: float
    #: The peak shown: ``tree_max_rss_mb``, or ``main_max_rss_mb`` for a
    #: tool whose children are an MDA (``rss_main_only``).
    max_rss_mb: float
    #: ru_maxrss from wait4: the tool's process and its reaped children.
    tree_max_rss_mb: float
    #: Sampled VmHWM of the tool's own process.
    main_max_rss_mb: float
    rss_main_only: bool
    #: False when GNU time was missing and the peak includes the harness's.
    rss_exact: bool
    returncode: int
    delivered: int
    expected: int
    problems: list[str] = field(default_factory=list)
    log: str = ""
    #: Busy CPU of the whole machine during the run (the tool, the server and
    #: the rest); None where /proc/stat cannot be read.
    machine_cpu: float | None = None

    @property
    def correct(self) -> bool:
        return not self.problems


@dataclass
class Summary:
    """The medians of a tool's runs in a scenario."""

    scenario: str
    tool: str
    runs: int
    wall: float
    cpu: float
    #: The largest peak of all runs: the number a memory target is about.
    max_rss_mb: float
    correct_runs: int
    rss_main_only: bool = False
    ratio: float | None = None
    problems: list[str] = field(default_factory=list)
    machine_cpu: float | None = None

    @property
    def correct(self) -> bool:
        return self.correct_runs == self.runs


def _median_machine_cpu(runs: list[RunResult]) -> float | None:
    values = [run.machine_cpu for run in runs if run.machine_cpu is not None]
    return statistics.median(values) if values else None


def summarise(results: list[RunResult], baselines: dict[str, str]) -> list[Summary]:
    """One summary per (scenario, tool), in first-run order, with ratios to gpopd.

    ``baselines`` maps a scenario to the one whose gpopd time is its
    denominator (a scenario not in it is its own baseline).
    """
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.scenario, result.tool), []).append(result)
    summaries = [
        Summary(
            scenario=scenario,
            tool=tool,
            runs=len(runs),
            wall=statistics.median(run.wall for run in runs),
            cpu=statistics.median(run.cpu for run in runs),
            max_rss_mb=max(run.max_rss_mb for run in runs),
            correct_runs=sum(run.correct for run in runs),
            rss_main_only=any(run.rss_main_only for run in runs),
            problems=sorted({text for run in runs for text in run.problems}),
            machine_cpu=_median_machine_cpu(runs),
        )
        for (scenario, tool), runs in groups.items()
    ]
    gpopd = {s.scenario: s.wall for s in summaries if s.tool == "gpopd" and s.correct}
    for summary in summaries:
        reference = gpopd.get(baselines.get(summary.scenario, summary.scenario))
        if reference:
            summary.ratio = summary.wall / reference
    return summaries


def table(summaries: list[Summary]) -> str:
    """The summaries as an aligned text table."""
    header = (
        "scenario",
        "tool",
        "wall s",
        "CPU s",
        "machine CPU s",
        "peak RSS MB",
        "wall / gpopd",
        "correct",
    )
    rows = [header]
    for s in summaries:
        correct = "yes" if s.correct else f"no ({s.correct_runs}/{s.runs})"
        rows.append(
            (
                s.scenario,
                s.tool,
                f"{s.wall:.2f}",
                f"{s.cpu:.2f}",
                "-" if s.machine_cpu is None else f"{s.machine_cpu:.2f}",
                f"{s.max_rss_mb:.1f}" + ("*" if s.rss_main_only else " "),
                "-" if s.ratio is None else f"{s.ratio:.2f}",
                correct,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for number, row in enumerate(rows):
        cells = [
            cell.ljust(width) if i < 2 or i == len(row) - 1 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    if any(s.rss_main_only for s in summaries):
        lines.append("* the tool's own process only, without its MDA processes")
    return "\n".join(lines)


def write_json(
    directory: Path,
    *,
    settings: dict[str, Any],
    environment: dict[str, Any],
    results: list[RunResult],
    summaries: list[Summary],
    skipped: dict[str, str],
) -> Path:
    """Write everything about this bench run to a new file; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"bench-{stamp}.json"
    document = {
        "created": stamp,
        "settings": settings,
        "environment": {"python": platform.python_version(), **environment},
        "skipped_tools": skipped,
        "summary": [asdict(s) | {"correct": s.correct} for s in summaries],
        "runs": [asdict(r) | {"correct": r.correct} for r in results],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
