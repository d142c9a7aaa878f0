"""CI gate: every committed H100 result carries provenance and its claims hold when recomputed from raw data.

A shortfall measured on the H100 stays committed with its JSON; until the system is fixed it is listed in
KNOWN_SHORTFALLS with the measured figure, and carried here as ``xfail(strict=True)``: the day it passes, the
strict xfail fails and the entry must go.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from djinn_core.bench.report import claim_rows, load_benchmark_json, provenance

pytestmark = pytest.mark.cpu

REPORTS = Path(__file__).resolve().parent.parent / "reports"
COMMITTED = sorted(REPORTS.glob("*/*.json"))
# which GPU each results folder must come from
FOLDER_GPU = {"h100": "H100", "h200x2": "H200"}

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


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_committed_result_carries_provenance(path):
    data = load_benchmark_json(path)
    prov = provenance(data)
    for field in ("gpu", "driver", "torch", "transformers", "commit", "date"):
        assert prov[field], f"{path.name}: provenance lacks {field}"
    expected = FOLDER_GPU.get(path.parent.name)
    assert expected, f"{path}: results folder {path.parent.name!r} names no known machine"
    assert expected in prov["gpu"], f"{path.name}: not an {expected} run ({prov['gpu']})"
    assert (path.parent / f"{path.stem}.md").is_file(), f"{path.name} has no report next to it"


@pytest.mark.parametrize("path,row", _claim_params())
def test_committed_claim_holds_when_recomputed(path, row):
    assert row.stored_passed == row.passed, f"stored verdict {row.stored_passed} != recomputed {row.passed}"
    assert row.passed, f"{row.key}: ratio {row.ratio:.4g} {row.op} {row.bound} fails (measured {row.measured:.4g})"


def test_known_shortfalls_name_committed_claims():
    keys = {p.id for p in _claim_params()}
    stale = set(KNOWN_SHORTFALLS) - keys
    assert not stale, f"KNOWN_SHORTFALLS names claims that are not committed: {stale}"
