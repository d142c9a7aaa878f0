"""The CI gate's rules on fake reports: the folder names the GPU, a dirty tree is refused unless listed as history,
a failed precondition recorded in a report fails when recomputed, and a further run of a report names it and shares
its clean commit and GPU."""

import json
from pathlib import Path

import pytest

from djinn_core.bench.claims import make_record
from djinn_core.bench.gate import main_report_path, provenance_problems, report_key, run_problems
from djinn_core.bench.report import claim_rows

pytestmark = pytest.mark.cpu


def _data(gpu="NVIDIA H200", count=1, dirty=False, claims=(), commit="abc123"):
    return {"machine_info": {"djinn": {"gpu_name": gpu, "gpu_count": count, "driver": "580", "torch_version": "2.11",
                                       "packages": {"transformers": "5.17.0"}}},
            "commit_info": {"id": commit, "dirty": dirty}, "datetime": "2026-12-01T10:00:00",
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


def _run_at(tmp_path: Path, folder: str = "h200", name: str = "exp3_x.run2.json") -> Path:
    return tmp_path / folder / "runs" / name


def test_a_run_file_names_the_report_it_is_a_run_of(tmp_path):
    run = _run_at(tmp_path, name="exp3_x.run12.json")
    assert main_report_path(run) == tmp_path / "h200" / "exp3_x.json"
    assert main_report_path(tmp_path / "h200" / "exp3_x.run2.json") is None  # not inside runs/
    assert main_report_path(_run_at(tmp_path, name="exp3_x_2.json")) is None


@pytest.mark.parametrize("folder,gpu,count", [("h200", "NVIDIA H200", 1), ("h200x2", "NVIDIA H200", 2)])
def test_a_clean_run_at_its_reports_commit_and_gpu_is_accepted(tmp_path, folder, gpu, count):
    assert run_problems(_run_at(tmp_path, folder), _data(gpu, count), _data(gpu, count)) == []


@pytest.mark.parametrize("run,main,why", [
    (_data(commit="def456"), _data(), "measured at commit def456, its report h200/exp3_x.json at abc123"),
    (_data(dirty=True), _data(dirty=True), "dirty=True"),  # one dirty commit is no clean commit; no history excuses
    (_data(dirty=None), _data(), "dirty=None"),
    (_data(), _data(dirty=True), "its report h200/exp3_x.json was measured on a tree whose state is dirty=True"),
    (_data("NVIDIA H100 80GB HBM3"), _data(), "not an H200 run"),
    (_data(count=2), _data(count=2), "h200 holds runs on 1 GPU(s)"),
    (_data(), None, "names report h200/exp3_x.json, which is not committed"),
])
def test_a_run_of_another_commit_tree_or_machine_or_of_no_committed_report_is_refused(tmp_path, run, main, why):
    problems = run_problems(_run_at(tmp_path), run, main)
    assert any(why in problem for problem in problems), problems


def test_a_run_file_is_named_stem_run_n_from_2_inside_runs(tmp_path):
    assert run_problems(_run_at(tmp_path, name="exp3_x_2.json"), _data(), _data()) == [
        "exp3_x_2.json is not named <stem>.run<N>.json inside a runs/ folder"]
    assert run_problems(tmp_path / "h200" / "exp3_x.run2.json", _data(), _data()) == [
        "exp3_x.run2.json is not named <stem>.run<N>.json inside a runs/ folder"]
    (problem,) = run_problems(_run_at(tmp_path, name="exp3_x.run1.json"), _data(), _data())
    assert "run files count from 2" in problem
