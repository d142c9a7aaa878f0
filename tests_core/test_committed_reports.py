"""CI gate: every committed result carries provenance naming the GPU of its folder, comes from a clean tree, and its
claims and preconditions hold when recomputed from raw data (djinn_core.bench.gate says what a report must carry).

A shortfall measured on a GPU stays committed with its JSON; until the system is fixed it is listed in
KNOWN_SHORTFALLS with the measured figure, and carried here as ``xfail(strict=True)``: the day it passes, the
strict xfail fails and the entry must go. Reports measured on a dirty tree are refused, except the history listed in
KNOWN_DIRTY_HISTORY.

A claim must pass in several runs at one clean commit: further runs of a report are committed as
``reports/<gpu>/runs/<stem>.run<N>.json`` (N from 2; not reports themselves, so not in COMMITTED). Each must name a
committed report, share its clean commit and GPU (djinn_core.bench.gate.run_problems), and hold every claim it
recorded when recomputed, except those listed in KNOWN_RUN_SHORTFALLS (carried as ``xfail(strict=True)`` like
KNOWN_SHORTFALLS); and the report's Markdown must record the spread over its runs (``djinn report`` does).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from djinn_core.bench.gate import main_report_path, provenance_problems, report_key, run_problems
from djinn_core.bench.report import RUNS_DIR, claim_rows, discover_runs, load_benchmark_json, run_spread

pytestmark = pytest.mark.cpu

REPORTS = Path(__file__).resolve().parent.parent / "reports"
COMMITTED = sorted(REPORTS.glob("*/*.json"))


def committed_runs(reports: Path) -> list[Path]:
    """Every JSON in a ``<gpu>/runs/`` folder under ``reports``: each must be a run of a committed report."""
    return sorted(reports.glob(f"*/{RUNS_DIR}/*.json"))


COMMITTED_RUNS = committed_runs(REPORTS)
# the reports that have runs, each once
REPORTS_WITH_RUNS = sorted({m for m in map(main_report_path, COMMITTED_RUNS) if m is not None and m.is_file()})

# Reports measured on a dirty tree (the code that ran was not exactly the commit they name), kept as history: issue 20
# found these three; their re-measurement at a clean commit on the H200 lands under reports/h200/. No other dirty
# report is accepted, and an entry goes when its file does.
KNOWN_DIRTY_HISTORY = frozenset({
    "h100/ceilings.json",  # commit ab35a2b, dirty
    "h100/exp2_streaming.json",  # commit ab35a2b, dirty
    "h200x2/exp2_full70b.json",  # commit 90cb81a, dirty
})

# "<json stem>::<test node>::<claim>[params]" -> reason quoting the measured figure
KNOWN_SHORTFALLS: dict[str, str] = {
    # H100, 2026-11-27, commit e778bf9: the slowest of the 100 whole-session swap-outs at N=64 took 34.86 ms, 0.893 of
    # the pinned D2H ceiling measured in the same run (54.7 GB/s), sharing the link with no swap-in; the median is
    # 0.994x. Intermittent single-swap dips: the run before (79c6988) passed every N (slowest 0.953-0.985x); 73b88d3
    # failed N=50's slowest swap-in (0.86x). Swaps now record their host issue time, to tell a host stall inside the
    # swap's window from the link.
    "exp3_memory_pressure::tests_exp3/test_memory_pressure.py::test_paused_sessions_oversubscribe_vram_and_all_"
    "complete[N=64]::swap_out_bandwidth_worst_over_ceiling[sessions=64,model=llama2-13b,prompt_tokens=2048,layer=20,"
    "swaps=100]": "measured slowest swap-out 0.893x of the pinned D2H ceiling < 0.9x",
}

# "<run file name>::<ClaimRow.key>" -> reason quoting the measured figure; as KNOWN_SHORTFALLS, for the runs
KNOWN_RUN_SHORTFALLS: dict[str, str] = {}


def _claim_params(paths=None, shortfalls=None, name=lambda path: path.stem):
    """One param per claim recorded in ``paths`` (default: the committed reports), id ``<name(path)>::<claim key>``,
    a strict xfail where ``shortfalls`` (default: KNOWN_SHORTFALLS) lists it."""
    paths = COMMITTED if paths is None else paths
    shortfalls = KNOWN_SHORTFALLS if shortfalls is None else shortfalls
    params = []
    for path in paths:
        for row in claim_rows(load_benchmark_json(path)):
            key = f"{name(path)}::{row.key}"
            marks = [pytest.mark.xfail(strict=True, reason=shortfalls[key])] if key in shortfalls else []
            params.append(pytest.param(path, row, id=key, marks=marks))
    return params


def test_required_h100_results_are_committed():
    assert (REPORTS / "h100" / "ceilings.json") in COMMITTED


@pytest.mark.parametrize("path", COMMITTED, ids=[report_key(p) for p in COMMITTED])
def test_committed_result_carries_provenance_of_its_folders_gpu_and_a_clean_tree(path):
    problems = provenance_problems(path, load_benchmark_json(path), known_dirty=KNOWN_DIRTY_HISTORY)
    assert not problems, f"{report_key(path)}: {problems}"
    assert (path.parent / f"{path.stem}.md").is_file(), f"{path.name} has no report next to it"


def test_known_dirty_history_names_committed_dirty_reports():
    committed = {report_key(p): p for p in COMMITTED}
    stale = {k for k in KNOWN_DIRTY_HISTORY
             if k not in committed or load_benchmark_json(committed[k])["commit_info"].get("dirty") is not True}
    assert not stale, f"KNOWN_DIRTY_HISTORY names reports that are gone or clean: {stale}"


def _holds(row) -> None:
    assert row.stored_passed == row.passed, f"stored verdict {row.stored_passed} != recomputed {row.passed}"
    assert row.passed, f"{row.key}: ratio {row.ratio:.4g} {row.op} {row.bound} fails (measured {row.measured:.4g})"


@pytest.mark.parametrize("path,row", _claim_params())
def test_committed_claim_holds_when_recomputed(path, row):
    _holds(row)


@pytest.mark.parametrize("listed,params", [("KNOWN_SHORTFALLS", "_claim_params"),
                                           ("KNOWN_RUN_SHORTFALLS", "_run_claim_params")])
def test_known_shortfalls_name_committed_claims(listed, params):
    keys = {p.id for p in globals()[params]()}
    stale = set(globals()[listed]) - keys
    assert not stale, f"{listed} names claims that are not committed: {stale}"


def _main_data(run_path: Path) -> dict | None:
    """The JSON of the report ``run_path`` is a run of; ``None`` when that report is not committed."""
    main = main_report_path(run_path)
    return load_benchmark_json(main) if main is not None and main.is_file() else None


def _run_claim_params():
    return _claim_params(COMMITTED_RUNS, KNOWN_RUN_SHORTFALLS, name=lambda path: path.name)


@pytest.mark.parametrize("path", COMMITTED_RUNS, ids=[f"{report_key(p.parent)}/{p.name}" for p in COMMITTED_RUNS])
def test_committed_run_names_its_report_and_shares_its_clean_commit_and_gpu(path):
    problems = run_problems(path, load_benchmark_json(path), _main_data(path))
    assert not problems, f"{report_key(path.parent)}/{path.name}: {problems}"


@pytest.mark.parametrize("path,row", _run_claim_params())
def test_committed_run_claim_holds_when_recomputed(path, row):
    _holds(row)




@pytest.mark.parametrize("main", REPORTS_WITH_RUNS, ids=[report_key(p) for p in REPORTS_WITH_RUNS])
def test_a_report_with_runs_records_their_spread(main):
    spread = run_spread(main, discover_runs(main))  # a ConfigError says why they are not runs of one clean commit
    md = main.parent / f"{main.stem}.md"
    assert f"## Spread over {len(spread.runs)} runs" in md.read_text(), \
        f"{md.name} does not record the spread over its {len(spread.runs)} runs: rebuild it with `djinn report`"


def test_run_discovery_finds_every_run_file_and_the_report_it_names(tmp_path):
    """The discovery the tests above parametrize over, on a fake reports/ tree (the committed one may have no runs)."""
    for rel in ("h200/exp3_rpc.json", "h200/runs/exp3_rpc.run2.json", "h200/runs/exp3_rpc.run10.json",
                "h200x2/runs/scaleout.run2.json", "h200/probes/p.json", "h200/runs/sub/deep.run2.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    runs = committed_runs(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in runs] == [
        "h200/runs/exp3_rpc.run10.json", "h200/runs/exp3_rpc.run2.json", "h200x2/runs/scaleout.run2.json"]
    assert [main_report_path(p) for p in runs] == [tmp_path / "h200" / "exp3_rpc.json"] * 2 + [
        tmp_path / "h200x2" / "scaleout.json"]
    assert discover_runs(tmp_path / "h200" / "exp3_rpc.json") == [runs[1], runs[0]]  # by run number
    assert _main_data(runs[2]) is None  # h200x2/scaleout.json is not there: run_problems says so
