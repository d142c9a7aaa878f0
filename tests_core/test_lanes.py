"""One pytest-xdist worker per GPU (fixtures/lanes.py): each worker sees its own GPU and writes its own benchmark
JSON naming the worker and the GPU it measured. Checked on the CPU by the worker's CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.lanes import lane_json, lane_of, lane_output

pytestmark = pytest.mark.cpu
ROOT = Path(__file__).resolve().parents[1]


def test_lane_names():
    assert lane_of(None) is None and lane_of("gw0") == 0 and lane_of("gw13") == 13
    with pytest.raises(pytest.UsageError):
        lane_of("worker-1")
    assert lane_json(Path("/r/out.json"), "gw1") == Path("/r/out.gw1.json")


def test_a_lane_writes_its_own_json_whichever_way_pytest_benchmark_holds_the_option(tmp_path):
    out = tmp_path / "out.json"
    assert lane_output(out, "gw1") == tmp_path / "out.gw1.json"  # 5.2 on: a Path
    assert lane_output(str(out), "gw1") == tmp_path / "out.gw1.json"
    opened = open(out, "wb")  # earlier: argparse.FileType('wb'), opened at parsing
    lane = lane_output(opened, "gw0")
    try:
        assert opened.closed and not out.exists() and lane.name == str(tmp_path / "out.gw0.json") and lane.mode == "wb"
        lane.write(b"{}")
    finally:
        lane.close()
    assert (tmp_path / "out.gw0.json").read_bytes() == b"{}"


@pytest.mark.slow
def test_each_xdist_worker_measures_its_own_gpu_and_writes_its_own_json(tmp_path):
    out = tmp_path / "lanes.json"
    cmd = [sys.executable, "-m", "pytest", "-m", "cpu", "-n", "2", "--dist", "each", "--djinn-gpu-per-worker",
           "tests_core/lane_cases.py", "--benchmark-json", str(out), "-p", "no:cacheprovider", "-q"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not out.exists()  # the controller measured nothing
    for k in (0, 1):
        data = json.loads((tmp_path / f"lanes.gw{k}.json").read_text())
        assert data["machine_info"]["djinn"]["xdist_worker"] == f"gw{k}"
        assert data["machine_info"]["djinn"]["cuda_visible_devices"] == str(k)
        names = sorted(b["name"] for b in data["benchmarks"])
        assert names == ["test_a_lane_measures[1]", "test_a_lane_measures[2]"]
        for b in data["benchmarks"]:
            assert b["extra_info"]["info"]["cuda_visible_devices"] == str(k)  # what the test itself saw
            assert b["stats"]["rounds"] == 1  # benchmarks ran, not disabled
