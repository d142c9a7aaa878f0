"""CI gate: every committed H100 result carries provenance and its claims hold when recomputed from raw data.

A shortfall measured on the H100 stays committed with its JSON; until the system is fixed it is listed in
KNOWN_SHORTFALLS with the measured figure, and carried here as ``xfail(strict=True)``: the day it passes, the
strict xfail fails and the entry must go.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from djinn_core.report import claim_rows, load_benchmark_json, provenance

pytestmark = pytest.mark.cpu

REPORTS = Path(__file__).resolve().parent.parent / "reports"
COMMITTED = sorted(REPORTS.glob("*/*.json"))
# which GPU each results folder must come from
FOLDER_GPU = {"h100": "H100", "h200x2": "H200"}

# "<json stem>::<test node>::<claim>[params]" -> reason quoting the measured figure
_RESUME = "exp3_resume::tests_exp3/test_resume_latency.py::test_resume_latency_against_baselines"
_MANUAL = "resume_vs_manual_pinned_offload[model=llama2-13b,L={L},prompt_tokens=2048]"
KNOWN_SHORTFALLS: dict[str, str] = {
    # H100, 2026-11-27, commit c532aef: Djinn's restore-until-layer-L-can-compute against one manual 20 MiB pinned
    # copy (bound <= 1.25x). The restore issues the continuation's slab allocations (and any compaction copies) on
    # the compute stream before the hidden state's copy; see the closing note.
    f"{_RESUME}[L=1]::{_MANUAL.format(L=1)}": "measured 0.769 ms vs manual 0.429 ms: 1.79x > 1.25x",
    f"{_RESUME}[L=10]::{_MANUAL.format(L=10)}": "measured 1.571 ms vs manual 0.401 ms: 3.92x > 1.25x",
    f"{_RESUME}[L=20]::{_MANUAL.format(L=20)}": "measured 1.328 ms vs manual 0.402 ms: 3.31x > 1.25x",
    f"{_RESUME}[L=30]::{_MANUAL.format(L=30)}": "measured 1.891 ms vs manual 0.408 ms: 4.64x > 1.25x",
    f"{_RESUME}[L=40]::{_MANUAL.format(L=40)}": "measured 1.011 ms vs manual 0.398 ms: 2.54x > 1.25x",
    f"{_RESUME}[L=30]::resume_to_next_token_vs_max_copy_compute[model=llama2-13b,L=30,prompt_tokens=2048]":
        "measured 75.8 ms vs max(copy 24.3 ms, compute 53.0 ms): 1.43x > 1.1x",
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
