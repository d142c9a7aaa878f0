"""The CI gate's rules on fake reports: the folder names the GPU, a dirty tree is refused unless listed as history,
and a failed precondition recorded in a report fails when recomputed."""

import json
from pathlib import Path

import pytest

from djinn_core.bench.claims import make_record
from djinn_core.bench.gate import provenance_problems, report_key
from djinn_core.bench.report import claim_rows

pytestmark = pytest.mark.cpu


def _data(gpu="NVIDIA H200", count=1, dirty=False, claims=()):
    return {"machine_info": {"djinn": {"gpu_name": gpu, "gpu_count": count, "driver": "580", "torch_version": "2.11",
                                       "packages": {"transformers": "5.17.0"}}},
            "commit_info": {"id": "abc123", "dirty": dirty}, "datetime": "2026-12-01T10:00:00",
            "benchmarks": [{"name": "test_x", "fullname": "tests_exp3/test_x.py::test_x",
                            "extra_info": {"claims": list(claims)}}]}


def _at(tmp_path: Path, folder: str, data: dict) -> Path:
    p = tmp_path / folder / "exp3_x.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize("folder,gpu,count", [("h200", "NVIDIA H200", 1), ("h100", "NVIDIA H100 80GB HBM3", 1),
                                              ("h200x2", "NVIDIA H200", 2)])
def test_a_clean_report_from_its_folders_gpu_is_accepted(tmp_path, folder, gpu, count):
    p = _at(tmp_path, folder, _data(gpu, count))
    assert provenance_problems(p, json.loads(p.read_text())) == []


@pytest.mark.parametrize("folder,gpu,count,why", [
    ("h200", "NVIDIA H100 80GB HBM3", 1, "not an H200 run"),
    ("h200x2", "NVIDIA H200", 1, "2 GPU(s)"),
    ("h200", "NVIDIA H200", 2, "1 GPU(s)"),
    ("a100", "NVIDIA A100", 1, "names no known machine"),
])
def test_a_report_whose_gpu_does_not_match_its_folder_is_refused(tmp_path, folder, gpu, count, why):
    p = _at(tmp_path, folder, _data(gpu, count))
    assert any(why in problem for problem in provenance_problems(p, json.loads(p.read_text())))


@pytest.mark.parametrize("dirty", [True, "unknown", None])
def test_a_report_from_a_dirty_or_unknown_tree_is_refused_unless_listed_as_history(tmp_path, dirty):
    p = _at(tmp_path, "h200", _data(dirty=dirty))
    problems = provenance_problems(p, json.loads(p.read_text()))
    assert len(problems) == 1 and "dirty" in problems[0]
    listed = provenance_problems(p, json.loads(p.read_text()), known_dirty={report_key(p)})
    assert listed == ([] if dirty is True else problems)  # history excuses a known dirty tree, never an unknown one


def test_a_report_missing_provenance_is_refused(tmp_path):
    data = _data()
    del data["machine_info"]["djinn"]["driver"]
    p = _at(tmp_path, "h200", data)
    assert provenance_problems(p, data) == ["provenance lacks driver"]


def test_a_failed_precondition_in_a_committed_report_fails_when_recomputed(tmp_path):
    rec = make_record("evictions", kind="precondition", method="precondition", bound=0, op=">", unit="evictions",
                      measured=0.0)
    rec["passed"] = True  # a tampered verdict: the gate recomputes it
    (row,) = claim_rows(_data(claims=[rec]))
    assert row.passed is False and row.stored_passed is True
