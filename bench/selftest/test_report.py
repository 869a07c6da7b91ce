"""Summaries and the results table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bench.report import RunResult, summarise, table, write_json


def result(
    scenario: str, tool: str, run: int, wall: float, problems: list[str] | None = None
) -> RunResult:
    return RunResult(
        scenario=scenario,
        tool=tool,
        run=run,
        wall=wall,
        cpu=wall / 2,
        cpu_user=wall / 4,
        cpu_sys=wall / 4,
        max_rss_mb=10.0 * run,
        tree_max_rss_mb=10.0 * run,
        main_max_rss_mb=10.0 * run,
        rss_main_only=False,
        rss_exact=True,
        returncode=0,
        delivered=1,
        expected=1,
        problems=problems or [],
    )


RESULTS = [
    result("a", "gpopd", 1, 2.0),
    result("a", "mpop", 1, 3.0),
    result("a", "gpopd", 2, 4.0),
    result("a", "mpop", 2, 5.0, ["a: 1 duplicate deliveries"]),
    result("a", "gpopd", 3, 9.0),
    result("a", "mpop", 3, 4.0),
    result("e:a", "floor", 1, 1.0),
]


def test_medians_peak_and_ratio() -> None:
    """Wall is the median, RSS the largest run, and the ratio divides by gpopd's median."""
    summaries = {(s.scenario, s.tool): s for s in summarise(RESULTS, {"e:a": "a"})}
    mpop = summaries["a", "mpop"]
    assert mpop.wall == 4.0
    assert mpop.max_rss_mb == 30.0
    assert mpop.ratio == 1.0
    assert summaries["e:a", "floor"].ratio == 0.25


def test_incorrect_runs_are_counted() -> None:
    """A tool with one failed run of three is shown as not correct."""
    summaries = {(s.scenario, s.tool): s for s in summarise(RESULTS, {})}
    assert not summaries["a", "mpop"].correct
    assert summaries["a", "mpop"].correct_runs == 2
    assert "no (2/3)" in table(list(summaries.values()))


def test_machine_cpu_is_a_median_and_a_column() -> None:
    """Machine CPU is the median of the runs that have it; without any it shows as -."""
    runs = [
        dataclasses.replace(result("b", "gpopd", 1, 2.0), machine_cpu=3.5),
        dataclasses.replace(result("b", "gpopd", 2, 2.0), machine_cpu=2.5),
        dataclasses.replace(result("b", "gpopd", 3, 2.0), machine_cpu=9.0),
        result("b", "mpop", 1, 2.0),
    ]
    summaries = {s.tool: s for s in summarise(runs, {})}
    assert summaries["gpopd"].machine_cpu == 3.5
    assert summaries["mpop"].machine_cpu is None
    lines = table(list(summaries.values())).splitlines()
    header = lines[0].split("  ")
    column = [h.strip() for h in header if h.strip()].index("machine CPU s")
    cells = {line.split()[1]: line.split()[column] for line in lines[2:]}
    assert cells == {"gpopd": "3.50", "mpop": "-"}


def test_json_holds_every_run(tmp_path: Path) -> None:
    """The JSON file records each run and each summary."""
    summaries = summarise(RESULTS, {})
    path = write_json(
        tmp_path, settings={}, environment={}, results=RESULTS, summaries=summaries, skipped={}
    )
    document = json.loads(path.read_text())
    assert len(document["runs"]) == len(RESULTS)
    assert len(document["summary"]) == 3
