import json
from pathlib import Path

import pytest

from djinn_core.bench.claims import make_record
from djinn_core.errors import ConfigError
from djinn_core.bench.report import claim_rows, load_benchmark_json, write_report
from djinn_core.bench.timing import TimingStats

pytestmark = pytest.mark.cpu


def _bench_json(tmp_path, claims, info=None):
    data = {
        "machine_info": {"djinn": {"gpu_name": "NVIDIA H100 80GB HBM3", "driver": "580", "torch_version": "2.11",
                                   "packages": {"transformers": "5.17.0"}, "host_memory": {"total": 2**37}}},
        "commit_info": {"id": "abc123", "dirty": False},
        "datetime": "2026-11-27T10:00:00",
        "benchmarks": [{"name": "test_x", "fullname": "tests_exp3/test_x.py::test_x",
                        "extra_info": {"claims": claims, "info": info or {}}}],
    }
    p = tmp_path / "exp.json"
    p.write_text(json.dumps(data))
    return p


def _ratio(layer, djinn, manual):
    return make_record("resume_vs_manual", kind="ratio", method="djinn", bound=1.25, op="<=",
                       params={"layer": layer}, unit="ms", reference_method="manual_offload",
                       timing=TimingStats(djinn).to_dict(), reference_timing=TimingStats(manual).to_dict())


def test_report_recomputes_verdicts_writes_table_provenance_and_plots(tmp_path):
    claims = [_ratio(1, (0.45, 0.46), (0.40, 0.41)), _ratio(40, (0.9, 0.9), (0.4, 0.4))]
    vram = {"timeline": [{"t_s": i * 0.01, "nvml_used": 2**30 * i, "torch_reserved": 2**29 * i,
                          "torch_allocated": 2**28 * i} for i in range(20)],
            "pcie": [{"t_s": i * 0.02, "pcie_tx_KBps": 1e6, "pcie_rx_KBps": 5e7} for i in range(10)],
            "marks": [{"t_s": 0.05, "label": "spawn"}]}
    layers = [{"layer": i, "copy_start_ms": i * 30.0, "copy_end_ms": i * 30.0 + 29, "compute_start_ms": i * 30 + 29,
               "compute_end_ms": i * 30 + 37} for i in range(4)]
    p = _bench_json(tmp_path, claims, info={"vram": vram, "layer_timeline": layers, "budget_bytes": 12 * 2**30})
    md = write_report(p, out_dir=tmp_path / "rep", name="exp3")
    text = md.read_text()
    assert ("| resume_vs_manual | resume vs manual: djinn over manual_offload, in ms (medians of timed repeats) "
            "| layer=1 |") in text
    assert "2 claims, 1 pass, 1 fail" in text and "**FAIL**" in text
    assert "gpu: NVIDIA H100 80GB HBM3" in text and "commit: abc123" in text
    pngs = sorted(x.name for x in (tmp_path / "rep").glob("*.png"))
    assert len(pngs) == 3 and all(f"({n})" in text for n in pngs)


def _cpu_json(tmp_path, claims, info=None):
    """A benchmark JSON as the CPU profile writes it: no GPU facts at all."""
    p = _bench_json(tmp_path, claims, info)
    data = json.loads(p.read_text())
    data["machine_info"]["djinn"] = {"gpu_name": None, "driver": None, "torch_version": "2.13.0+cpu",
                                     "packages": {"transformers": "5.17.0", "accelerate": None}}
    p.write_text(json.dumps(data))
    return p


def test_cpu_report_says_what_each_check_measured_with_its_unit_and_no_blank_provenance(tmp_path):
    lost = make_record("load_no_session_lost", kind="check", method="djinn-rpc-zmq", bound=0, op="==",
                       unit="clients", measured=0.0, what="load clients that lost a session")
    unnamed = make_record("layers_unequal", kind="check", method="djinn", bound=0, op="==", unit="layers",
                          measured=0.0)
    text = write_report(_cpu_json(tmp_path, [lost, unnamed]), out_dir=tmp_path / "rep", name="cpu").read_text()
    assert ("| load_no_session_lost | load clients that lost a session, in clients | none | 0 clients | none | n/a "
            "| == 0 clients | pass |") in text
    assert "| layers_unequal | layers unequal, in layers |" in text  # no `what` given: the claim's name in words
    provenance_block = text.split("## Provenance")[1].split("##")[0]
    assert "- torch: 2.13.0+cpu" in provenance_block
    assert all(not line.rstrip().endswith(":") for line in provenance_block.splitlines() if line.startswith("- "))
    assert "gpu" not in provenance_block and "driver" not in provenance_block


def test_report_plots_every_timing_a_benchmark_recorded(tmp_path):
    check = make_record("c", kind="check", method="m", bound=0, op="==", unit="clients", measured=0.0)
    info = {"raw_tcp_rtt": TimingStats((0.03, 0.04, 0.05), "host").to_dict(),
            "noop_rpc": TimingStats((0.3, 0.5, 9.0), "host").to_dict(), "not_a_timing": {"x": 1}}
    text = write_report(_cpu_json(tmp_path, [check], info), out_dir=tmp_path / "rep", name="cpu").read_text()
    assert "![cpu_timings](cpu_timings.png)" in text and (tmp_path / "rep" / "cpu_timings.png").is_file()
    no_timings = write_report(_cpu_json(tmp_path, [check]), out_dir=tmp_path / "rep2", name="cpu").read_text()
    assert "## Plots" not in no_timings


def test_report_refuses_a_malformed_claim_record_with_a_typed_error(tmp_path):
    p = _bench_json(tmp_path, [{"claim": "x", "kind": "check", "op": "==", "method": "m"}])  # no bound
    with pytest.raises(ConfigError, match="malformed claim record 'x'"):
        write_report(p)


def test_report_flags_a_stored_verdict_that_disagrees(tmp_path):
    rec = _ratio(1, (1.0,), (0.5,))
    rec["passed"] = True
    rows = claim_rows(json.loads(_bench_json(tmp_path, [rec]).read_text()))
    assert rows[0].passed is False and rows[0].stored_passed is True
    assert "stored verdict disagrees" in write_report(_bench_json(tmp_path, [rec])).read_text()


def test_report_refuses_files_that_are_not_benchmark_json(tmp_path):
    with pytest.raises(ConfigError, match="no such"):
        load_benchmark_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        load_benchmark_json(bad)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="pytest-benchmark"):
        load_benchmark_json(bad)


def test_resume_benchmarks_get_a_crossover_plot_of_every_method(tmp_path):
    p = _bench_json(tmp_path, [_ratio(1, (0.5,), (0.4,))])
    data = json.loads(p.read_text())
    data["benchmarks"] = [{"name": f"t[L={L}]", "fullname": f"t[L={L}]",
                           "extra_info": {"L": L, "claims": [], "info": {"djinn_ms": 0.5, "manual_ms": 0.4,
                                                                         "recompute_ms": 3.0 * L, "eager_ms": 0.01}}}
                          for L in (1, 10, 40)]
    p.write_text(json.dumps(data))
    text = write_report(p, out_dir=tmp_path / "rep", name="exp3").read_text()
    assert "(exp3_crossover.png)" in text and (tmp_path / "rep" / "exp3_crossover.png").is_file()


@pytest.mark.cpu
def test_capabilities_table_takes_every_figure_from_the_runs():
    from djinn_core.bench.report import capabilities_table, load_benchmark_json

    h100 = Path(__file__).resolve().parent.parent / "reports" / "h100"
    resume = load_benchmark_json(h100 / "exp3_resume.json")
    pressure = load_benchmark_json(h100 / "exp3_memory_pressure.json")
    table = capabilities_table(resume, pressure)
    at40 = next(b["extra_info"]["info"] for b in resume["benchmarks"]
                if b["extra_info"].get("L") == 40 and "djinn_ms" in b["extra_info"].get("info", {}))
    assert f"{at40['recompute_ms']:.4g} ms" in table and f"{at40['djinn_ms']:.4g} ms" in table
    eager = pressure["benchmarks"][0]["extra_info"]["info"]["eager"]
    assert f"{eager['sessions_held']} (out of memory at {eager['oom_at_session']}" in table
    assert "64 of 64" in table
    assert "not measured" in capabilities_table(resume, None)  # no pressure run: session counts say so
    assert capabilities_table({"benchmarks": []}) is None
