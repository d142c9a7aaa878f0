"""djinn merge: one report's JSON from its parts (pytest -k selections at one commit)."""

from __future__ import annotations

import json

import pytest

from djinn_core.bench.merge import merge_parts
from djinn_core.bench.report import claim_rows, load_benchmark_json, write_report
from djinn_core.cli import main
from djinn_core.errors import ConfigError

pytestmark = pytest.mark.cpu


def _part(tmp_path, name, tests, *, commit="abc", gpu="NVIDIA H200", date="2026-11-30T10:00:00", uuid="GPU-1"):
    claim = {"claim": "c", "kind": "check", "method": "m", "params": {}, "unit": "x", "op": "<=", "bound": 1.0,
             "measured": 0.5, "passed": True}
    data = {"machine_info": {"node": f"host-{uuid}", "djinn": {"gpu_name": gpu, "driver": "580", "gpu_uuid": uuid,
                                                               "torch_version": "2.11", "vram_budget": {"bytes": 8}}},
            "commit_info": {"id": commit, "dirty": False}, "datetime": date,
            "benchmarks": [{"name": t, "fullname": f"tests_exp3/f.py::{t}", "extra_info": {"claims": [claim]}}
                           for t in tests]}
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_parts_join_into_one_report_that_names_them(tmp_path):
    a = _part(tmp_path, "a.json", ["t1", "t2"], date="2026-11-30T11:00:00")
    b = _part(tmp_path, "b.json", ["t3"], date="2026-11-30T10:00:00", uuid="GPU-2")
    out = tmp_path / "m.json"
    assert main(["merge", str(a), str(b), "-o", str(out)]) == 0
    data = load_benchmark_json(out)
    assert [b["name"] for b in data["benchmarks"]] == ["t1", "t2", "t3"]
    assert len(claim_rows(data)) == 3 and data["commit_info"]["id"] == "abc"
    parts = data["machine_info"]["djinn"]["parts"]
    assert [p["file"] for p in parts] == ["a.json", "b.json"] and parts[1]["gpu_uuid"] == "GPU-2"
    assert parts[0]["tests"] == ["tests_exp3/f.py::t1", "tests_exp3/f.py::t2"]
    assert data["datetime"] == "2026-11-30T10:00:00"  # the earliest part
    md = write_report(out, out_dir=tmp_path).read_text()
    assert "- parts: 2, joined by `djinn merge`" in md
    assert "`b.json`: 2026-11-30T10:00:00, GPU-2, 1 test (t3)" in md and "`a.json`" in md


def test_a_report_of_one_run_lists_no_parts(tmp_path):
    md = write_report(_part(tmp_path, "a.json", ["t1"]), out_dir=tmp_path).read_text()
    assert "parts:" not in md


@pytest.mark.parametrize("field, other, match", [
    ("commit", {"commit": "def"}, "commit"),
    ("gpu", {"gpu": "NVIDIA H100 80GB HBM3"}, "GPU"),
])
def test_parts_of_different_measurements_are_refused(tmp_path, field, other, match):
    a = _part(tmp_path, "a.json", ["t1"])
    b = _part(tmp_path, "b.json", ["t2"], **other)
    with pytest.raises(ConfigError, match=match):
        merge_parts([a, b])


def test_a_test_in_two_parts_or_a_single_part_is_refused(tmp_path):
    a = _part(tmp_path, "a.json", ["t1"])
    b = _part(tmp_path, "b.json", ["t1"])
    with pytest.raises(ConfigError, match="measured in both"):
        merge_parts([a, b])
    with pytest.raises(ConfigError, match="at least two"):
        merge_parts([a])
