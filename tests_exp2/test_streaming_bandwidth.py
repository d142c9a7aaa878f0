"""exp2: Djinn runs Llama-2-70B layers (48 distinct, ~77 GiB of fp16 weights) under a 12 GiB VRAM budget by
streaming them from pinned host memory through a GPU ring buffer, at the pinned host-to-device copy ceiling measured
on the same buffers in the same run.

h100 tests are paper scale (run: ``pytest -m h100 tests_exp2``); the cpu tests run the same helpers on a tiny model
(behaviour only, never speed).
"""

from __future__ import annotations

import logging

import pytest
import torch

from djinn_core.bench import preconditions as pre
from djinn_core.models import architecture_config, build_model, model_sizes
from djinn_core.streaming import oversubscription
from djinn_core.bench.experiments.exp2_streaming import (ARCH, BUDGET_BYTES, CHUNKS_MiB, DECODE_STEPS, DEEP_LAYERS,
                                                         MIN_OVERSUBSCRIPTION, SWEEP_TOKENS, TTFT_TOKENS, MiB,
                                                         artifact_dir, greedy, measure_forwards,
                                                         mismatches, plot_stream_timeline, prefill_fn, prompt,
                                                         slot_ceiling, streamed_model)

log = logging.getLogger(__name__)

MIN_GBPS = 20.0  # every chunk size
SWEEP: dict[int, dict] = {}  # chunk MiB -> measured run, shared with the best-chunk test (same session)


def _sweep_chunk(pack, device, copy_ceilings, chunk_mib: int) -> dict:
    """Stream all host layers for a 512-token prefill at one chunk size: 1 warm-up, then 4 forwards each preceded by
    a pinned ceiling on the same buffers (weight set 0 -> ring slot 0), and a last ceiling after."""
    with streamed_model(pack, device, num_layers=pack.num_sets, chunk_bytes=chunk_mib * MiB,
                        max_tokens=SWEEP_TOKENS, prefill_tokens=SWEEP_TOKENS) as sm:
        ids = prompt(SWEEP_TOKENS, sm.model.config.vocab_size, device=device)
        before = sm.bytes_streamed
        run = measure_forwards(prefill_fn(sm.model, ids), device=device, bytes_per_forward=sm.bytes_per_pass,
                               warmup=1, repeats=4, ceiling=slot_ceiling(sm, copy_ceilings))
        forwards = 1 + run.timing.n
        assert sm.bytes_streamed - before == forwards * sm.num_layers * sm.layout.used_bytes  # nothing copied twice
        result = {"run": run, "stats": sm.stats()}
    SWEEP[chunk_mib] = result
    return result


@pytest.mark.h100
@pytest.mark.slow
@pytest.mark.parametrize("chunk_mib", CHUNKS_MiB, ids=[f"chunk={c}MiB" for c in CHUNKS_MiB])
def test_every_chunk_size_streams_at_least_20_GBps(llama70b_host_pack, cuda_device, copy_ceilings, claim, chunk_mib):
    res = claim.measure(lambda: _sweep_chunk(llama70b_host_pack, cuda_device, copy_ceilings, chunk_mib))
    run = res["run"]
    params = {"chunk_MiB": chunk_mib, "layers": llama70b_host_pack.num_sets, "tokens": SWEEP_TOKENS,
              "budget_GiB": BUDGET_BYTES / 2**30, "slots": res["stats"]["slots"]}
    claim.info(run=run.to_dict(), streaming=res["stats"])
    pre.bytes_moved(claim, nbytes=res["stats"]["bytes_streamed"], what="weight bytes streamed", params=params)
    # one claim: bandwidth against the same-run ceiling, bounded at 20 GB/s (expressed as a fraction of that ceiling)
    claim.bandwidth("streamed_weights_at_least_20GBps", method="djinn.streaming prefill", timing=run.timing,
                    bytes_moved=run.bytes_per_forward, ceiling_GBps=run.ceiling_GBps,
                    bound=MIN_GBPS / run.ceiling_GBps, params={**params, "bound_GBps": MIN_GBPS})


@pytest.mark.h100
@pytest.mark.slow
def test_best_chunk_streams_at_95pct_of_pinned_ceiling(llama70b_host_pack, cuda_device, copy_ceilings, claim):
    def collect() -> dict[int, dict]:
        for c in CHUNKS_MiB:  # measured by the per-chunk tests in this session; measure what is missing
            if c not in SWEEP:
                _sweep_chunk(llama70b_host_pack, cuda_device, copy_ceilings, c)
        return {c: SWEEP[c] for c in CHUNKS_MiB}

    sweep = claim.measure(collect)
    ratios = {c: r["run"].GBps / r["run"].ceiling_GBps for c, r in sweep.items()}
    best = max(ratios, key=ratios.get)
    run = sweep[best]["run"]
    claim.info(sweep={f"{c}MiB": r["run"].to_dict() for c, r in sweep.items()},
               ratios={f"{c}MiB": v for c, v in ratios.items()})
    pre.bytes_moved(claim, nbytes=sweep[best]["stats"]["bytes_streamed"], what="weight bytes streamed",
                    params={"best_chunk_MiB": best})
    claim.bandwidth("best_chunk_vs_pinned_ceiling", method="djinn.streaming prefill", timing=run.timing,
                    bytes_moved=run.bytes_per_forward, ceiling_GBps=run.ceiling_GBps, bound=0.95,
                    params={"best_chunk_MiB": best, "layers": llama70b_host_pack.num_sets, "tokens": SWEEP_TOKENS})


def _best_chunk_mib() -> int:
    if len(SWEEP) == len(CHUNKS_MiB):
        return max(SWEEP, key=lambda c: SWEEP[c]["run"].GBps / SWEEP[c]["run"].ceiling_GBps)
    return 64


@pytest.mark.h100
@pytest.mark.slow
def test_ttft_2048_within_1p1x_weight_transfer_and_peak_vram_within_budget(
        llama70b_host_pack, cuda_device, copy_ceilings, vram_sampler, claim, tmp_path):
    """Prefill of a 2048-token prompt (time to first token), then greedy decode steps with a KV cache on the GPU, all
    under the 12 GiB budget, with the PCIe trace and the per-layer copy/compute timeline of one prefill."""
    pack = llama70b_host_pack
    chunk = _best_chunk_mib()
    sampler = vram_sampler(period_s=0.01, pcie=True)

    def run_all() -> dict:
        with streamed_model(pack, cuda_device, num_layers=pack.num_sets, chunk_bytes=chunk * MiB,
                            max_tokens=TTFT_TOKENS + DECODE_STEPS + 1, prefill_tokens=TTFT_TOKENS,
                            record_timeline=True) as sm, sampler:
            ids = prompt(TTFT_TOKENS, sm.model.config.vocab_size, device=cuda_device)
            sampler.mark("ttft runs")
            ttft = measure_forwards(prefill_fn(sm.model, ids, use_cache=True), device=cuda_device,
                                    bytes_per_forward=sm.bytes_per_pass, warmup=1, repeats=3,
                                    ceiling=slot_ceiling(sm, copy_ceilings))
            torch.cuda.current_stream(cuda_device).synchronize()
            sampler.mark("timeline prefill")
            launched = sampler.marks[-1]["t_s"]
            prefill_fn(sm.model, ids, use_cache=True)()
            timeline = sm.read_timeline()
            sampler.mark("decode")
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t0.record()
            _, _, tokens = greedy(sm.model, ids, steps=DECODE_STEPS)
            t1.record()
            t1.synchronize()
            sampler.mark("done")
            return {"ttft": ttft, "timeline": timeline, "launched_s": launched, "stats": sm.stats(),
                    "decode_ms": t0.elapsed_time(t1), "tokens": tokens}

    res = claim.measure(run_all)
    ttft = res["ttft"]
    sizes = model_sizes(architecture_config(ARCH, num_layers=pack.num_sets))
    transfer_ms = ttft.bytes_per_forward / (ttft.ceiling_GBps * 1e9) * 1e3
    params = {"layers": pack.num_sets, "tokens": TTFT_TOKENS, "chunk_MiB": chunk, "budget_GiB": BUDGET_BYTES / 2**30,
              "slots": res["stats"]["slots"]}
    try:  # the data for the plot is in the benchmark JSON either way (info: timeline, vram.pcie, launched_s)
        path = str(plot_stream_timeline(
            res["timeline"], sampler.pcie, pcie_offset_s=res["launched_s"], ceiling_GBps=ttft.ceiling_GBps,
            path=artifact_dir(tmp_path) / "exp2_stream_timeline.png",
            title=f"Llama-2-70B architecture, {pack.num_sets} layers streamed under a 12 GiB budget: "
                  f"{TTFT_TOKENS}-token prefill, {chunk} MiB chunks, {res['stats']['slots']} ring slots"))
    except ImportError as e:
        path = f"not plotted here ({e})"
        log.warning("timeline plot skipped: %s", e)
    claim.info(ttft=ttft.to_dict(), transfer_ms=transfer_ms, timeline=res["timeline"], vram=sampler.to_dict(),
               streaming=res["stats"], decode={"steps": 1 + DECODE_STEPS, "ms_total_with_prefill": res["decode_ms"],
                                               "tokens": res["tokens"]},
               launched_s=res["launched_s"], model_weight_bytes=sizes.total_weight_bytes, plot=path)
    claim.precondition("weights_oversubscribe_the_budget", value=oversubscription(sizes.total_weight_bytes,
                                                                                BUDGET_BYTES),
                       op=">=", bound=MIN_OVERSUBSCRIPTION, unit="x budget",
                       what="model weight bytes over the streaming VRAM budget", params=params)
    pre.bytes_moved(claim, nbytes=res["stats"]["bytes_streamed"], what="weight bytes streamed", params=params)
    claim.ratio("ttft_vs_weight_transfer_at_ceiling", method="djinn.streaming prefill + argmax", measured=ttft.timing,
                reference=transfer_ms, bound=1.1, op="<=", params=params,
                reference_method="streamed weight bytes / same-run pinned H2D ceiling")
    claim.check("peak_nvml_used_over_budget", method="VramSampler nvml used (whole device)",
                value=sampler.peak_nvml_used() / BUDGET_BYTES, bound=1.0, op="<=", unit="x budget", params=params)
    claim.check("peak_torch_reserved_over_budget", method="VramSampler torch reserved",
                value=sampler.peak_torch_reserved() / BUDGET_BYTES, bound=1.0, op="<=", unit="x budget", params=params)


@pytest.mark.h100
@pytest.mark.slow
def test_80_layers_reusing_host_weight_sets_stream_at_the_ceiling(llama70b_host_pack, cuda_device, copy_ceilings,
                                                                  claim):
    """The full 80-layer depth of Llama-2-70B; layers 48..79 REUSE host weight sets 0..31 (the host pins 48 distinct
    layers): every layer is still copied over PCIe, so bandwidth is what the full model would see."""
    pack = llama70b_host_pack
    if pack.num_sets >= DEEP_LAYERS:
        pytest.skip(f"the host pack holds all {pack.num_sets} layers: the chunk sweep already streams the full depth")
    chunk = _best_chunk_mib()

    def run() -> dict:
        with streamed_model(pack, cuda_device, num_layers=DEEP_LAYERS, chunk_bytes=chunk * MiB,
                            max_tokens=SWEEP_TOKENS, prefill_tokens=SWEEP_TOKENS) as sm:
            ids = prompt(SWEEP_TOKENS, sm.model.config.vocab_size, device=cuda_device)
            r = measure_forwards(prefill_fn(sm.model, ids), device=cuda_device, bytes_per_forward=sm.bytes_per_pass,
                                 warmup=1, repeats=3, ceiling=slot_ceiling(sm, copy_ceilings))
            return {"run": r, "stats": sm.stats()}

    res = claim.measure(run)
    r = res["run"]
    params = {"layers": DEEP_LAYERS, "distinct_host_layers": pack.num_sets, "reused_host_sets": True,
              "tokens": SWEEP_TOKENS, "chunk_MiB": chunk}
    claim.info(run=r.to_dict(), streaming=res["stats"],
               label=f"80 layers; layers {pack.num_sets}..79 reuse host weight sets 0..{79 - pack.num_sets}")
    pre.bytes_moved(claim, nbytes=res["stats"]["bytes_streamed"], what="weight bytes streamed", params=params)
    claim.check("streamed_weights_GBps", method="djinn.streaming prefill (80 layers, reused host sets)",
                value=r.GBps, bound=MIN_GBPS, op=">=", unit="GB/s", params=params)
    claim.bandwidth("streamed_80_layers_vs_pinned_ceiling", method="djinn.streaming prefill (80 layers, reused "
                    "host sets)", timing=r.timing, bytes_moved=r.bytes_per_forward, ceiling_GBps=r.ceiling_GBps,
                    bound=0.90, params=params)


# ------------------------------------------------------------------------------------------- CPU plumbing versions
TINY_KiB = (16, 64, 128, 512)


@pytest.mark.cpu
@pytest.mark.parametrize("chunk_kib", TINY_KiB)
def test_chunk_sweep_plumbing_cpu(tiny_pack, chunk_kib):
    """The sweep's path at tiny scale: a 5-layer model over 2 slots (5 % 2 != 0), every chunk size, the same logits
    as the resident model, and the byte accounting the bandwidth figure divides by."""
    cpu = torch.device("cpu")
    ring = 2 * tiny_pack.layout.stride
    with streamed_model(tiny_pack, cpu, num_layers=5, chunk_bytes=chunk_kib * 1024, max_tokens=64, prefill_tokens=64,
                        budget_bytes=1 << 30, max_slots=2, arch="llama-tiny", dtype=torch.float32) as sm:
        assert sm.ring_bytes == ring and sm.slots == 2
        ids = prompt(32, sm.model.config.vocab_size)
        run = measure_forwards(prefill_fn(sm.model, ids), device=cpu, bytes_per_forward=sm.bytes_per_pass,
                               warmup=1, repeats=2)
        assert run.timing.n == 2 and run.ceilings == []
        assert sm.bytes_streamed == 3 * 5 * sm.layout.used_bytes
        want = greedy(build_model("llama-tiny", num_layers=5, dtype=torch.float32, seed=0), ids, steps=3)
        got = greedy(sm.model, ids, steps=3)
    assert mismatches(got, want) == {"prefill_logits": 0, "decode_logits": 0, "tokens": 0}


@pytest.mark.cpu
def test_reused_host_sets_plumbing_cpu(tiny_pack):
    """Deeper than the pack: 8 layers from 5 host sets, layer i <- set i % 5."""
    with streamed_model(tiny_pack, torch.device("cpu"), num_layers=8, chunk_bytes=64 * 1024, max_tokens=64,
                        prefill_tokens=64, budget_bytes=1 << 30, max_slots=3, arch="llama-tiny",
                        dtype=torch.float32) as sm:
        assert sm.layer_sets == (0, 1, 2, 3, 4, 0, 1, 2)
        prefill_fn(sm.model, prompt(16, 512))()
        assert sm.bytes_streamed == 8 * sm.layout.used_bytes


@pytest.mark.cpu
def test_timeline_plot_plumbing_cpu(tiny_pack, tmp_path):
    with streamed_model(tiny_pack, torch.device("cpu"), num_layers=5, chunk_bytes=64 * 1024, max_tokens=64,
                        prefill_tokens=64, budget_bytes=1 << 30, max_slots=2, arch="llama-tiny",
                        dtype=torch.float32, record_timeline=True) as sm:
        prefill_fn(sm.model, prompt(16, 512))()
        rows = sm.read_timeline()
    assert [r["layer"] for r in rows] == list(range(5))
    pcie = [{"t_s": 0.001 * i, "pcie_rx_KBps": 5e7, "pcie_tx_KBps": 1e5} for i in range(20)]
    path = plot_stream_timeline(rows, pcie, pcie_offset_s=0.0, ceiling_GBps=55.0, path=tmp_path / "t.png",
                                title="plumbing")
    assert path.stat().st_size > 10_000
