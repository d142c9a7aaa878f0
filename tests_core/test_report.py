import json
from pathlib import Path

import pytest

from djinn_core.bench.claims import make_record
from djinn_core.errors import ConfigError
from djinn_core.bench.report import (claim_rows, discover_runs, load_benchmark_json, parse_run_file, run_spread,
                                     write_report)
from djinn_core.bench.timing import TimingStats

pytestmark = pytest.mark.cpu


def _bench_json(tmp_path, claims, info=None, name="exp.json"):
    data = {
        "machine_info": {"djinn": {"gpu_name": "NVIDIA H100 80GB HBM3", "driver": "580", "torch_version": "2.11",
                                   "packages": {"transformers": "5.17.0"}, "host_memory": {"total": 2**37}}},
        "commit_info": {"id": "abc123", "dirty": False},
        "datetime": "2026-11-27T10:00:00",
        "benchmarks": [{"name": "test_x", "fullname": "tests_exp3/test_x.py::test_x",
                        "extra_info": {"claims": claims, "info": info or {}}}],
    }
    p = tmp_path / name
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


def test_report_plots_each_swap_beside_the_copies_around_it(tmp_path):
    swaps = [{"direction": d, "nbytes": 1_700_000_000, "ms": 31.0 + k % 3, "start_ms": 600.0 * k,
              **({"bracket_GBps": 54.0} if k % 2 else {})} for k in range(12) for d in ("out", "in")]
    swaps.append({"direction": "out", "nbytes": 800_000_000, "ms": 15.0, "start_ms": 0.0})  # partial: left out
    p = _bench_json(tmp_path, [_ratio(1, (0.4,), (0.4,))], info={"swaps": swaps})
    text = write_report(p, out_dir=tmp_path, name="exp3").read_text()
    assert "(exp3_test_x_swaps.png)" in text and (tmp_path / "exp3_test_x_swaps.png").is_file()


def test_a_report_takes_no_figure_of_a_report_whose_name_extends_its_own(tmp_path):
    p = _bench_json(tmp_path, [_ratio(1, (0.4,), (0.4,))], name="exp3.json")
    _bench_json(tmp_path, [_ratio(1, (0.4,), (0.4,))], name="exp3_card.json")
    for png in ("exp3_timeline.png", "exp3_card_timeline.png"):
        (tmp_path / png).write_bytes(b"")
    text = write_report(p, out_dir=tmp_path).read_text()
    assert "(exp3_timeline.png)" in text and "exp3_card_timeline" not in text


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


def test_streamed_session_benchmarks_get_the_edit_cost_and_batched_decode_plots(tmp_path):
    """exp4's two plots: edit -> logits against L for the three methods beside the bound, and tokens/s against k
    with the copy-bound line, and Djinn beside the peer on the peer's model."""
    p = _bench_json(tmp_path, [_ratio(1, (0.5,), (0.4,))])
    data = json.loads(p.read_text())
    timing = lambda ms: {"median_ms": ms, "n": 3}  # noqa: E731 - as TimingStats.to_dict() names its median
    edits = [{"name": f"edit[L={L}]", "fullname": f"edit[L={L}]", "extra_info": {"claims": [], "info": {
        "costs": {"layer": L, "djinn": timing(30.0 * (48 - L)), "recompute_from_0": timing(1500.0),
                  "nnsight_style_whole_forward": timing(1510.0)}, "bound_ms": 29.0 * (48 - L)}}} for L in (1, 24, 47)]
    runs = {str(k): {"k": k, "tokens_per_s": 5.0 * k, "copy_bound_tokens_per_s": 5.3 * k, "bytes_per_step": 48}
            for k in (1, 8, 32, 64)}
    peer = {str(k): {"peer": "deepspeed", "k": k, "tokens_per_s": 30.0 * k, "bytes_per_step": 6, "layers": 6}
            for k in (1, 8, 32, 64)}
    same = {str(k): {"k": k, "tokens_per_s": 38.0 * k, "copy_bound_tokens_per_s": 40.0 * k, "bytes_per_step": 5}
            for k in (1, 8, 32, 64)}
    batched = {"name": "batched", "fullname": "batched", "extra_info": {"claims": [], "info": {
        "runs": runs, "peer_runs": peer, "same_model_runs": same, "runtime": {"streaming": {"layers": 48}}}}}
    data["benchmarks"] = edits + [batched]
    p.write_text(json.dumps(data))
    text = write_report(p, out_dir=tmp_path / "rep", name="exp4").read_text()
    for plot in ("exp4_edit_cost_vs_layer.png", "exp4_tokens_per_s_vs_k.png"):
        assert f"({plot})" in text and (tmp_path / "rep" / plot).is_file()


def _run_json(folder, name, claims, *, date="2026-11-27T10:00:00", commit="abc123", dirty=False, gpu_count=None):
    """One run of the report ``exp``: the JSON :func:`_bench_json` writes, as ``folder/name``, with its own date and
    commit (and GPU count when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    p = _bench_json(folder, claims, name=name)
    data = json.loads(p.read_text())
    data["datetime"], data["commit_info"] = date, {"id": commit, "dirty": dirty}
    if gpu_count is not None:
        data["machine_info"]["djinn"]["gpu_count"] = gpu_count
    p.write_text(json.dumps(data))
    return p


def _speedup(value):
    """A ``>=`` claim whose ratio is ``value`` exactly: a speedup over a reference of 1 ms, held to 2x."""
    return make_record("speedup_over_recompute", kind="ratio", method="djinn", bound=2.0, op=">=", unit="ms",
                       params={"layer": 40}, measured=value, reference=1.0, reference_method="recompute")


def _lost(value):
    return make_record("load_no_session_lost", kind="check", method="djinn-rpc", bound=0, op="==", unit="clients",
                       measured=value)


def _three_runs(tmp_path):
    """A report ``h200/exp.json`` and two runs of it in ``h200/runs/``: a ``<=`` claim passing in all three (ratios
    1.0, 1.2, 1.1), a ``>=`` claim failing in run 2 (2.5, 1.8, 3.0), a check that run 3 did not record."""
    folder = tmp_path / "h200"
    main = _run_json(folder, "exp.json", [_ratio(1, (1.0,), (1.0,)), _speedup(2.5), _lost(0.0)],
                     date="2026-12-01T10:00:00")
    run2 = _run_json(folder / "runs", "exp.run2.json", [_ratio(1, (1.2,), (1.0,)), _speedup(1.8), _lost(0.0)],
                     date="2026-12-01T11:00:00")
    run3 = _run_json(folder / "runs", "exp.run3.json", [_ratio(1, (1.1,), (1.0,)), _speedup(3.0)],
                     date="2026-12-01T12:00:00")
    return main, run2, run3


def test_run_spread_gives_each_claims_min_median_max_worst_run_and_counts(tmp_path):
    main, run2, run3 = _three_runs(tmp_path)
    spread = run_spread(main, [run2, run3])
    assert spread.commit == "abc123"
    assert [(r.file, r.date, r.commit) for r in spread.runs] == [
        ("exp.json", "2026-12-01T10:00:00", "abc123"), ("exp.run2.json", "2026-12-01T11:00:00", "abc123"),
        ("exp.run3.json", "2026-12-01T12:00:00", "abc123")]
    by_claim = {r.claim: r for r in spread.rows}
    assert [r.key for r in spread.rows] == [r.key for r in claim_rows(load_benchmark_json(main))]

    le = by_claim["resume_vs_manual"]
    assert (le.runs_recorded, le.runs_passed, le.passed_every_run, le.missing) == (3, 3, True, [])
    assert (le.min, le.median, le.max) == pytest.approx((1.0, 1.1, 1.2))
    assert (le.op, le.bounds) == ("<=", [1.25])
    assert le.worst[0] == "exp.run2.json" and le.worst[1].ratio == pytest.approx(1.2)  # <=: the largest ratio

    ge = by_claim["speedup_over_recompute"]
    assert (ge.runs_recorded, ge.runs_passed, ge.passed_every_run) == (3, 2, False)
    assert (ge.min, ge.median, ge.max) == pytest.approx((1.8, 2.5, 3.0))
    assert ge.worst[0] == "exp.run2.json" and ge.worst[1].passed is False  # >=: the smallest ratio, failing

    check = by_claim["load_no_session_lost"]
    assert (check.runs_recorded, check.runs_passed, check.missing) == (2, 2, ["exp.run3.json"])
    assert not check.passed_every_run  # not recorded in run 3: not passed in every run
    assert (check.min, check.median, check.max) == (0.0, 0.0, 0.0)  # a check's value is its ratio
    assert [r.claim for r in spread.passed_every_run] == ["resume_vs_manual"]


def test_run_spread_pairs_the_nth_record_of_a_repeated_key_and_picks_the_worst_by_op(tmp_path):
    folder = tmp_path / "h200"
    main = _run_json(folder, "exp.json", [_lost(0.0), _lost(0.0), _speedup(2.2)])
    run2 = _run_json(folder / "runs", "exp.run2.json", [_lost(0.0), _lost(2.0), _speedup(2.1)])
    run3 = _run_json(folder / "runs", "exp.run3.json", [_lost(0.0), _lost(1.0), _speedup(2.9)])
    first, second, speedup = run_spread(main, [run2, run3]).rows
    assert (first.occurrence, second.occurrence) == (1, 2) and first.key == second.key
    assert first.runs_passed == 3 and second.runs_passed == 1
    assert second.worst[0] == "exp.run2.json"  # ==: the value farthest from the bound
    assert speedup.worst[0] == "exp.run2.json" and speedup.worst[1].passed  # >=: the smallest, passing


def test_report_records_the_spread_over_its_runs_in_a_section(tmp_path):
    main, run2, run3 = _three_runs(tmp_path)
    text = write_report(main, out_dir=tmp_path / "rep", name="exp", runs=[run2, run3]).read_text()
    section = text.split("## Spread over 3 runs\n")[1].split("\n## ")[0]
    assert text.index("## Claims") < text.index("## Spread over 3 runs") < text.index("## Provenance")
    assert ("3 runs of this report at commit abc123 (clean tree), dated 2026-12-01T10:00:00, 2026-12-01T11:00:00 and "
            "2026-12-01T12:00:00: 1 of 3 claims passed in every run; 1 failed in at least one run; 1 not recorded in "
            "every run.") in section
    assert "- run 2: `exp.run2.json`, date 2026-12-01T11:00:00, commit abc123" in section
    assert "| claim | parameters | runs passed / recorded | min | median | max | bound | worst run |" in section
    assert "| resume_vs_manual | layer=1 | 3 / 3 | 1 | 1.1 | 1.2 | ratio <= 1.25 | `exp.run2.json` (1.2) |" in section
    assert ("| speedup_over_recompute | layer=40 | 2 / 3 | 1.8 | 2.5 | 3 | ratio >= 2 | `exp.run2.json` "
            "(1.8, **FAIL**) |") in section
    assert ("| load_no_session_lost | none | 2 / 2 (not recorded in `exp.run3.json`) | 0 clients | 0 clients "
            "| 0 clients | == 0 clients | `exp.json` (0 clients) |") in section
    assert "3 claims, 3 pass, 0 fail" in text  # the claims table is still the report's own run


def test_the_spread_lists_the_claims_nearest_their_bounds_and_flags_a_swing_as_large_as_the_headroom(tmp_path):
    main, run2, run3 = _three_runs(tmp_path)
    spread = run_spread(main, [run2, run3])
    by_claim = {r.claim: r for r in spread.rows}
    le, ge = by_claim["resume_vs_manual"], by_claim["speedup_over_recompute"]
    assert le.headroom == pytest.approx(0.04) and le.swing == pytest.approx(0.16)  # (1.25 - 1.2) / 1.25; 0.2 / 1.25
    assert ge.headroom == pytest.approx(-0.1) and ge.swing == pytest.approx(0.6)  # run 2's 1.8 is past 2x
    assert by_claim["load_no_session_lost"].headroom is None  # ==: no relative headroom
    text = write_report(main, out_dir=tmp_path / "rep", name="exp", runs=[run2, run3]).read_text()
    table = text.split("Nearest their bounds over the 3 runs")[1].split("\n## ")[0]
    assert table.index("speedup_over_recompute") < table.index("resume_vs_manual")  # nearest first
    assert "| speedup_over_recompute | layer=40 | `exp.run2.json` (1.8) | >= 2 | -10.0% | 60.0% | failed |" in table
    assert ("| resume_vs_manual | layer=1 | `exp.run2.json` (1.2) | <= 1.25 | +4.0% | 16.0% | **the swing is as large "
            "as the headroom: it may fail on the next run** |") in table
    assert "load_no_session_lost" not in table


def test_runs_that_agree_are_noted_as_the_same_in_every_run(tmp_path):
    folder = tmp_path / "h200"
    main = _run_json(folder, "exp.json", [_speedup(2.5)])
    run2 = _run_json(folder / "runs", "exp.run2.json", [_speedup(2.5)])
    (row,) = run_spread(main, [run2]).rows
    assert row.swing == 0 and row.headroom == pytest.approx(0.25)
    text = write_report(main, out_dir=tmp_path / "rep", name="exp", runs=[run2]).read_text()
    assert "| +25.0% | 0.0% | the same in every run |" in text


def test_a_claim_recorded_in_only_some_runs_is_not_called_the_same_in_every_run(tmp_path):
    """A claim whose parameters name a choice the run made (exp2's best chunk) is recorded only in the runs that made
    it: its swing covers those runs alone, and the table says so."""
    folder = tmp_path / "h200"
    main = _run_json(folder, "exp.json", [_speedup(2.5)])
    run2 = _run_json(folder / "runs", "exp.run2.json", [])
    (row,) = run_spread(main, [run2]).rows
    assert row.swing == 0 and row.missing == ["exp.run2.json"]
    text = write_report(main, out_dir=tmp_path / "rep", name="exp", runs=[run2]).read_text()
    table = text.split("Nearest their bounds over the 2 runs")[1].split("\n## ")[0]
    assert "| +25.0% | 0.0% | recorded in 1 of 2 runs |" in table and "the same in every run" not in table


@pytest.mark.parametrize("change,why", [
    (dict(commit="def456"), "commit def456.*share one commit"),
    (dict(dirty=True), "dirty=True"),
    (dict(dirty=None), "dirty=None"),
    (dict(gpu_count=2), "gpu_count=2"),
])
def test_run_spread_refuses_runs_of_another_commit_a_dirty_tree_or_another_machine(tmp_path, change, why):
    main, run2, _ = _three_runs(tmp_path)
    other = _run_json(tmp_path / "h200" / "runs", "exp.run4.json", [_speedup(2.5)], **change)
    with pytest.raises(ConfigError, match=why):
        run_spread(main, [run2, other])
    with pytest.raises(ConfigError, match=why):
        write_report(main, out_dir=tmp_path / "rep", runs=[other])


def test_run_spread_refuses_a_dirty_report_a_file_that_is_no_benchmark_json_and_a_run_named_twice(tmp_path):
    main, run2, _ = _three_runs(tmp_path)
    dirty_main = _run_json(tmp_path / "other", "exp.json", [_speedup(2.5)], dirty=True)
    with pytest.raises(ConfigError, match="dirty=True"):
        run_spread(dirty_main, [])
    bad = tmp_path / "h200" / "runs" / "exp.run5.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="pytest-benchmark"):
        run_spread(main, [run2, bad])
    with pytest.raises(ConfigError, match="no such"):
        run_spread(main, [tmp_path / "missing.json"])
    with pytest.raises(ConfigError, match="named twice"):
        run_spread(main, [run2, main])


def test_report_picks_up_the_runs_beside_it_by_run_number_and_only_its_own(tmp_path):
    main, run2, run3 = _three_runs(tmp_path)
    runs = tmp_path / "h200" / "runs"
    run10 = _run_json(runs, "exp.run10.json", [_speedup(2.6)])
    for stray in ("other.run2.json", "exp.run2.json.bak", "exp_run6.json", "exp.runX.json", "exp2.run2.json"):
        (runs / stray).write_text("{not json")  # read, these would be refused: they must not be picked up
    assert discover_runs(main) == [run2, run3, run10]
    assert parse_run_file(run10) == ("exp", 10) and parse_run_file(runs / "exp_run6.json") is None
    assert "## Spread over 4 runs" in write_report(main).read_text()
    assert "Spread over" not in write_report(main, runs=[]).read_text()  # an empty list: none
    assert discover_runs(tmp_path / "h200" / "no_runs.json") == []


def test_djinn_report_takes_its_runs_from_the_command_line(tmp_path, capsys):
    from djinn_core.cli import main as djinn

    main, run2, run3 = _three_runs(tmp_path)
    out = tmp_path / "rep"
    assert djinn(["report", str(main), "--out-dir", str(out), "--runs", str(run3)]) == 0
    assert "## Spread over 2 runs" in Path(capsys.readouterr().out.strip()).read_text()
    assert djinn(["report", str(main), "--out-dir", str(out)]) == 0  # by default: the runs beside it
    assert "## Spread over 3 runs" in (out / "exp.md").read_text()
    assert djinn(["report", str(main), "--out-dir", str(out), "--runs"]) == 0  # --runs alone: none
    assert "Spread over" not in (out / "exp.md").read_text()
    dirty = _run_json(tmp_path / "h200" / "runs", "exp.run4.json", [_speedup(2.5)], dirty=True)
    assert djinn(["report", str(main), "--out-dir", str(out), "--runs", str(dirty)]) == 2  # said, not raised


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


def _makereport(when, outcome, excinfo=None, fixturenames=("claim",)):
    """Drive the claim plugin's makereport hook with a fake item and report; returns the benchmark's extra_info."""
    from types import SimpleNamespace

    from fixtures import claims as plugin

    bench = SimpleNamespace(extra_info={})
    item = SimpleNamespace(funcargs={"benchmark": bench}, fixturenames=list(fixturenames))
    rep = SimpleNamespace(when=when, outcome=outcome, failed=outcome == "failed")
    gen = plugin.pytest_runtest_makereport(item, SimpleNamespace(excinfo=excinfo))
    next(gen)
    with pytest.raises(StopIteration):
        gen.send(SimpleNamespace(get_result=lambda: rep))
    return bench.extra_info


def test_claim_plugin_records_the_tests_outcome_in_its_benchmark():
    from types import SimpleNamespace

    err = SimpleNamespace(typename="ConfigError", value=ValueError("djinn serve did not start"))
    assert _makereport("call", "failed", err)["test_outcome"] == {
        "outcome": "failed", "error": "ConfigError: djinn serve did not start"}
    assert _makereport("call", "passed")["test_outcome"] == {"outcome": "passed"}
    assert _makereport("setup", "failed", err) == {}  # only the test's own call
    assert _makereport("call", "failed", err, fixturenames=("benchmark",)) == {}  # only claim tests


def test_a_test_that_failed_outside_its_claims_reads_as_failed(tmp_path):
    """Every claim it recorded passed, but the test stopped on an error: a failed test_completed row, in the table
    and the counts; a test that failed on a claim gets none (its claim fails already)."""
    p = _bench_json(tmp_path, [_ratio(1, (0.45,), (0.40,))])
    data = json.loads(p.read_text())
    data["benchmarks"][0]["extra_info"]["test_outcome"] = {"outcome": "failed", "error": "ConfigError: no server"}
    p.write_text(json.dumps(data))
    rows = claim_rows(load_benchmark_json(p))
    assert [(r.claim, r.passed) for r in rows] == [("resume_vs_manual", True), ("test_completed", False)]
    assert "ConfigError: no server" in rows[1].method
    text = write_report(p, out_dir=tmp_path / "rep").read_text()
    assert "1 fail" in text and "test_completed" in text
    data["benchmarks"][0]["extra_info"]["claims"] = [_ratio(1, (0.9,), (0.40,))]  # a failed claim
    p.write_text(json.dumps(data))
    assert [(r.claim, r.passed) for r in claim_rows(load_benchmark_json(p))] == [("resume_vs_manual", False)]
