"""Scale-out (issue 22): with two GPUs of one host, each pulling half of every Llama-2-70B layer (80 layers, 128.5 GiB
of fp16 weights, each GPU pinning only its half) over its own host link and all-gathering the other half over NVLink,
Djinn streams weights at 1.9x what one link carries and serves a 2048-token prompt and each decode step 1.85x faster
than one GPU streaming alone in the same run, under 24 GiB of VRAM per GPU (with four GPUs, issue 23: 3.6x and 3.4x,
and first what the host feeds four links at once: below 0.95 x 4 links, the bandwidth claim is against that ceiling);
each GPU serves its own session, and the
logits are bitwise those of one GPU.

One run of ``djinn_core.bench.experiments.scaleout`` (one process per GPU) feeds every claim below; each claim is
per GPU and names the GPU it measured. ``DJINN_SCALEOUT_LAYERS`` shortens the model for a rehearsal (both sides
stream the same shortened depth; the preconditions check it from the engines' counters). A pass's fixed cost (the
first layer's all-gather that compute waits for, the last layer's compute and the head) is about 7 ms against 15.7 ms
per layer: 5% of an 8-layer pass, 0.6% of an 80-layer one, so the bandwidth bar is for the full depth
(``docs/notes/distributed.md``).
"""

from __future__ import annotations

import pytest
import torch

from djinn_core.bench.experiments.exp2_streaming import artifact_dir
from djinn_core.bench.experiments.scaleout import (ScaleoutConfig, bandwidth_bytes_counted, host_link_ceiling,
                                                  pipeline_figures, run, same_work)
from djinn_core.bench.timing import TimingStats

CFG = ScaleoutConfig.from_env()
# GPUs -> (effective weight bandwidth over one link's same-run ceiling, TTFT and decode step one GPU over partitioned):
# issue 22 (two GPUs) and issue 23 (four). Another count has no claim until an issue sets one.
BOUNDS = {2: (1.9, 1.85), 4: (3.6, 3.4)}
MIN_BANDWIDTH_X, MIN_SPEEDUP = BOUNDS.get(CFG.world_size, (None, None))
HOST_CAPS_BELOW = 0.95  # all links at once below this fraction of N x one link: the host, not the links, is the cap

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def scaleout(tmp_path_factory) -> dict:
    """Every rank's measurements (one spawn of ``CFG.world_size`` processes for the whole module)."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < CFG.world_size:
        pytest.skip(f"needs {CFG.world_size} CUDA GPUs in one host; this machine has {have}")
    if CFG.world_size not in BOUNDS:
        pytest.fail(f"no scale-out claim is defined for {CFG.world_size} GPUs (defined: {sorted(BOUNDS)})")
    return run(CFG, artifact_dir(tmp_path_factory.mktemp("scaleout")) / "scaleout_ranks")


def _params(rank: dict, **extra) -> dict:
    gpu = rank["gpu"]
    return {"rank": rank["rank"], "gpu": gpu.get("index"), "gpu_uuid": gpu.get("uuid"), "layers": CFG.layers,
            "world": CFG.world_size, **extra}


def _ceiling_GBps(run: dict) -> float:
    return run["ceiling_GBps"]  # median of the one-link ceilings interleaved with the run's passes


def _pipeline(part: dict) -> dict:
    """Steady per-layer rate and fixed per-pass cost of the last bandwidth pass (its timeline), with its ceiling."""
    bw = part["bandwidth"]
    fig = pipeline_figures(part["bandwidth_timeline"], layer_bytes=part["stats"]["layer_param_bytes"],
                           pass_ms=bw["timing"]["samples_ms"][-1])  # the timeline is the last timed pass's
    ceiling = _ceiling_GBps(bw)
    return {**fig, "ceiling_GBps": ceiling,
            "steady_over_ceiling": fig["steady_GBps"] / ceiling if fig["steady_GBps"] else None}


def test_partitioned_stream_moves_weights_at_1p9x_one_links_ceiling(scaleout, claim):
    ranks = claim.measure(lambda: scaleout["ranks"])
    host = host_link_ceiling(ranks, caps_below=HOST_CAPS_BELOW)
    claim.info(host_ceiling=host)
    claim.precondition("host_ceiling_all_links_at_once_measured", value=host["all_links_at_once_GBps"], op=">",
                       bound=0, unit="GB/s", params={"world": CFG.world_size},
                       what="pinned host-to-device copies on every GPU at once, summed")
    claim.info(config=scaleout["config"], gpus=[r["gpu"] for r in ranks], pinned=[r["pinned"] for r in ranks],
               ceilings_one_link_GBps={r["rank"]: r["partitioned"]["bandwidth"]["ceilings_GBps"] for r in ranks},
               ceiling_all_links_at_once={r["rank"]: r["partitioned"]["ceiling_all_links_at_once"] for r in ranks},
               allgather_ms_per_layer={r["rank"]: r["partitioned"]["allgather_per_layer"] for r in ranks},
               allgather_bytes=ranks[0]["partitioned"]["allgather_bytes"],
               streaming={r["rank"]: r["partitioned"]["stats"] for r in ranks},
               layer_timeline=ranks[0]["partitioned"]["timeline"],
               bandwidth_layer_timeline=ranks[0]["partitioned"]["bandwidth_timeline"],
               pipeline={r["rank"]: _pipeline(r["partitioned"]) for r in ranks},
               work={r["rank"]: r["partitioned"]["work"]["bandwidth"] for r in ranks})
    for r in ranks:
        bw = r["partitioned"]["bandwidth"]
        bandwidth_bytes_counted(claim, r["partitioned"]["work"]["bandwidth"], bytes_per_forward=bw["bytes_per_forward"],
                                layers=CFG.layers, params=_params(r, tokens=CFG.bandwidth_tokens))
        if host["capped"]:  # the host feeds fewer than N links: the claim is against what it does feed
            claim.bandwidth("partitioned_weights_vs_host_share_per_link",
                            method="djinn.distributed partitioned prefill",
                            timing=TimingStats.from_dict(bw["timing"]), bytes_moved=bw["bytes_per_forward"],
                            ceiling_GBps=host["per_link_GBps"], bound=MIN_BANDWIDTH_X,
                            params=_params(r, tokens=CFG.bandwidth_tokens, chunk_MiB=CFG.chunk_bytes >> 20),
                            what="weight bytes of all layers per pass over the host's all-links-at-once ceiling / N")
            continue
        claim.bandwidth("partitioned_weights_vs_one_link_ceiling", method="djinn.distributed partitioned prefill",
                        timing=TimingStats.from_dict(bw["timing"]), bytes_moved=bw["bytes_per_forward"],
                        ceiling_GBps=_ceiling_GBps(bw), bound=MIN_BANDWIDTH_X,
                        params=_params(r, tokens=CFG.bandwidth_tokens, chunk_MiB=CFG.chunk_bytes >> 20),
                        what="weight bytes of all layers per pass (each GPU's pass, its own prompt)")


def test_ttft_and_decode_step_1p85x_faster_than_one_gpu(scaleout, claim):
    ranks = claim.measure(lambda: scaleout["ranks"])
    claim.info(one_gpu={r["rank"]: r["one_gpu"] for r in ranks},
               partitioned={r["rank"]: {k: r["partitioned"][k] for k in ("ttft", "decode", "work")} for r in ranks})
    for r in ranks:
        one, part = r["one_gpu"], r["partitioned"]
        for figure in ("ttft", "decode"):  # the ratios compare the same work, or say nothing
            same_work(claim, one["work"][figure], part["work"][figure], layers=CFG.layers, figure=figure,
                      params=_params(r, tokens=CFG.ttft_tokens))
        claim.ratio("ttft_one_gpu_over_partitioned", method="one-GPU streaming prefill + argmax",
                    measured=TimingStats.from_dict(one["ttft"]["timing"]),
                    reference=TimingStats.from_dict(part["ttft"]["timing"]), bound=MIN_SPEEDUP, op=">=", unit="ms",
                    reference_method="partitioned prefill + argmax (all GPUs at once, each its own prompt)",
                    params=_params(r, tokens=CFG.ttft_tokens), what="time to first token, one GPU / partitioned")
        claim.ratio("decode_step_one_gpu_over_partitioned", method="one-GPU streaming decode step",
                    measured=TimingStats.from_dict(one["decode"]), reference=TimingStats.from_dict(part["decode"]),
                    bound=MIN_SPEEDUP, op=">=", unit="ms", reference_method="partitioned decode step",
                    params=_params(r, context_tokens=CFG.ttft_tokens), what="decode step, one GPU / partitioned")


def test_partitioned_logits_bitwise_equal_one_gpu_and_resident(scaleout, claim):
    ranks = claim.measure(lambda: scaleout["ranks"])
    claim.info(bitwise={r["rank"]: r["bitwise"] for r in ranks})
    for r in ranks:
        b = r["bitwise"]
        params = _params(r, layers=b["layers"], slots=b["slots"], prompt_tokens=CFG.bitwise_tokens,
                         decode_steps=CFG.bitwise_steps, prompt_seed=b["prompt_seed"])
        claim.check("unequal_logits_and_tokens_vs_one_gpu_streaming", value=sum(b["vs_one_device"].values()),
                    method="torch bit patterns, prefill + decode logits, tokens", bound=0, op="<=", unit="elements",
                    params=params)
        claim.check("unequal_logits_and_tokens_vs_resident", value=sum(b["vs_resident"].values()),
                    method="torch bit patterns, prefill + decode logits, tokens", bound=0, op="<=", unit="elements",
                    params=params)


def test_each_gpu_stays_within_its_24GiB_budget(scaleout, claim):
    ranks = claim.measure(lambda: scaleout["ranks"])
    for r in ranks:
        part = r["partitioned"]
        params = _params(r, budget_GiB=CFG.budget_bytes / 2**30, slots=part["stats"]["slots"])
        claim.check("peak_torch_reserved_over_budget", method="torch.cuda.max_memory_reserved, partitioned runs",
                    value=part["peak_torch_reserved_bytes"] / CFG.budget_bytes, bound=1.0, op="<=", unit="x budget",
                    params=params)
        claim.check("nvml_used_after_over_budget", method="NVML used (whole device) after the partitioned runs",
                    value=part["nvml_used_bytes_after"] / CFG.budget_bytes, bound=1.0, op="<=", unit="x budget",
                    params=params)
