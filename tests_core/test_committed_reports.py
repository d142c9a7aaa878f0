"""CI gate: every committed result carries provenance naming the GPU of its folder, comes from a clean tree, and its
claims and preconditions hold when recomputed from raw data (djinn_core.bench.gate says what a report must carry).

A shortfall measured on a GPU stays committed with its JSON; until the system is fixed it is listed in
KNOWN_SHORTFALLS with the measured figure, and carried here as ``xfail(strict=True)``: the day it passes, the
strict xfail fails and the entry must go. Reports measured on a dirty tree are refused, except the history listed in
KNOWN_DIRTY_HISTORY.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from djinn_core.bench.gate import provenance_problems, report_key
from djinn_core.bench.report import claim_rows, load_benchmark_json

pytestmark = pytest.mark.cpu

REPORTS = Path(__file__).resolve().parent.parent / "reports"
COMMITTED = sorted(REPORTS.glob("*/*.json"))

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


def _claim_params():
    params = []
    for path in COMMITTED:
        for row in claim_rows(load_benchmark_json(path)):
            key = f"{path.stem}::{row.key}"
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN_SHORTFALLS[key])] if key in KNOWN_SHORTFALLS else []
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


@pytest.mark.parametrize("path,row", _claim_params())
def test_committed_claim_holds_when_recomputed(path, row):
    assert row.stored_passed == row.passed, f"stored verdict {row.stored_passed} != recomputed {row.passed}"
    assert row.passed, f"{row.key}: ratio {row.ratio:.4g} {row.op} {row.bound} fails (measured {row.measured:.4g})"


def test_known_shortfalls_name_committed_claims():
    keys = {p.id for p in _claim_params()}
    stale = set(KNOWN_SHORTFALLS) - keys
    assert not stale, f"KNOWN_SHORTFALLS names claims that are not committed: {stale}"
