"""Scale-out (issue 22): partitioned weight streaming over N GPUs of one host, against one GPU in the same run.

:func:`run` starts one process per GPU (:func:`djinn_core.distributed.launch.spawn`, NCCL) and returns what every rank
measured; each rank (:func:`rank_main`):

1. pins its shard of every layer (1/N of the model) and a small one-GPU pack of ``baseline_sets`` whole layers;
2. one-GPU baseline, one rank at a time (the others wait on the host): the same depth streamed from its pack alone
   (layer i <- set i % baseline_sets: every layer still crosses the link), TTFT and decode steps, each timed run
   preceded by the pinned one-link ceiling on the same buffers;
3. partitioned, all ranks at once, each on its own prompt (data parallel over sessions): effective weight bandwidth
   on a short prefill (all layers' weight bytes / pass time), TTFT, decode steps, the all-gather of one layer; each
   timed pass preceded by every rank's one-link ceiling, measured one rank at a time;
4. bitwise: ``baseline_sets`` layers, partitioned vs one-GPU streaming vs resident, greedy logits and tokens.

Every timed figure also records the work it timed (:func:`count_work`: forwards, layer loads and layer bytes landed in
the ring per forward, from the engine's own counters, and the batch, prompt tokens and decode steps); the claims
first state, as preconditions (:func:`same_work`, :func:`bandwidth_bytes_counted`), that the one-GPU baseline and
the partitioned run did the same work per forward, so that a ratio never compares unlike work.

Each rank writes ``rank{r}.json``. The claims are asserted in ``tests_exp2/test_scaleout.py``; the CPU tests run
:func:`bitwise_rank` and the timing helpers under gloo. Environment: ``DJINN_SCALEOUT_LAYERS`` (default 80; fewer
for a rehearsal), ``DJINN_SCALEOUT_WORLD`` (2), ``DJINN_SCALEOUT_BASELINE_SETS`` (4, or the layer count when that
is smaller).
"""

from __future__ import annotations

import json
import logging
import os
import math
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import DynamicCache

from djinn_core.bench.ceilings import CopyCeiling, copy_ceiling_on
from djinn_core.bench.experiments.exp2_streaming import (budgeted_model, free_device_memory, greedy, measure_forwards,
                                                         mismatches, nvml_used_bytes, prefill_fn, prompt,
                                                         streamed_model)
from djinn_core.bench.provenance import pci_address, result_provenance
from djinn_core.bench.timing import TimingStats, back_to_back, time_cuda, time_host
from djinn_core.distributed import (PartitionedStreamedModel, RankGroup, ShardPack, check_node_host_ram,
                                    pack_layer_shards, partitioned_plan, seeded_layer_fill, shard_bytes_for)
from djinn_core.distributed.launch import spawn
from djinn_core.errors import ConfigError
from djinn_core.models import architecture_config, build_model, decoder_layers, resolve_dtype
from djinn_core.streaming import (LayerLayout, StreamedModel, StreamingPolicy, WeightPack, pack_layer_weights,
                                  place_resident_)
from djinn_core.validation import check_int

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
PROMPT_SEED = 1  # rank r's prompts use PROMPT_SEED + r: every rank serves its own session
DEVICE_OVERHEAD_MARGIN = 512 * MiB  # as exp2: on top of the context and NCCL buffers measured before building


@dataclass(frozen=True)
class ScaleoutConfig:
    """The experiment's parameters (bytes, tokens, counts); :meth:`from_env` reads the rehearsal knobs."""

    arch: str = "llama2-70b"
    layers: int = 80
    world_size: int = 2
    baseline_sets: int = 4  # whole layers in the one-GPU pack; also the depth of the bitwise comparison
    budget_bytes: int = 24 * GiB  # VRAM per GPU
    chunk_bytes: int = 128 * MiB
    max_slots: int = 4
    bandwidth_tokens: int = 512
    ttft_tokens: int = 2048
    decode_steps: int = 3  # timed, after one untimed step
    repeats: int = 3  # timed passes per figure, after one warm-up
    bitwise_tokens: int = 128
    bitwise_steps: int = 4
    dtype: str = "float16"
    seed: int = 0
    backend: str = "nccl"

    def __post_init__(self) -> None:
        for name in ("layers", "world_size", "baseline_sets", "budget_bytes", "chunk_bytes", "max_slots",
                     "bandwidth_tokens", "ttft_tokens", "decode_steps", "repeats", "bitwise_tokens", "bitwise_steps"):
            check_int(name, getattr(self, name), 1)
        if self.baseline_sets > self.layers:
            raise ConfigError(f"baseline_sets {self.baseline_sets} > layers {self.layers}")

    @classmethod
    def from_env(cls, **overrides: Any) -> "ScaleoutConfig":
        env = {"layers": "DJINN_SCALEOUT_LAYERS", "world_size": "DJINN_SCALEOUT_WORLD",
               "baseline_sets": "DJINN_SCALEOUT_BASELINE_SETS"}
        kw: dict[str, Any] = {}
        for field, var in env.items():
            if os.environ.get(var):
                try:
                    kw[field] = int(os.environ[var])
                except ValueError:
                    raise ConfigError(f"{var}={os.environ[var]!r} is not an int") from None
        kw.update(overrides)
        if "baseline_sets" not in kw and "layers" in kw:  # a rehearsal shorter than the default one-GPU pack
            kw["baseline_sets"] = min(cls.baseline_sets, kw["layers"])
        return cls(**kw)


# ------------------------------------------------------------------------------------------------------- helpers
def suite_numerics() -> None:
    """The numerics the claims suite sets in ``conftest.py`` (a spawned rank does not run pytest's hooks): no cuDNN
    fused attention, and deterministic kernels when ``DJINN_DETERMINISTIC=1``."""
    torch.backends.cuda.enable_cudnn_sdp(False)
    if os.environ.get("DJINN_DETERMINISTIC") == "1":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def gpu_identity(device: torch.device) -> dict[str, Any]:
    """Which GPU a rank measured: index, name, UUID, PCI address, and CUDA_VISIBLE_DEVICES."""
    if device.type != "cuda":
        return {"device": str(device)}
    p = torch.cuda.get_device_properties(device)
    return {"device": str(device), "index": device.index, "name": p.name, "uuid": str(getattr(p, "uuid", "")),
            "pci": pci_address(p), "memory_bytes": int(p.total_memory),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}


def time_decode_steps(model: Any, ids: torch.Tensor, *, steps: int, warmup: int = 1, window: int = 1) -> TimingStats:
    """Prefill ``ids`` (untimed), then time ``steps`` samples of ``window`` back-to-back greedy decode steps (one token
    each, a KV cache on the model's device) after ``warmup`` untimed ones, each sample divided by ``window``: CUDA
    events on a GPU, the host clock on a CPU."""
    cuda = ids.device.type == "cuda"
    timer = time_cuda if cuda else time_host
    samples: list[float] = []
    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        box = {"next": out.logits[:, -1].argmax(-1, keepdim=True)}

        def step() -> None:
            out = model(input_ids=box["next"], past_key_values=cache, use_cache=True)
            box["next"] = out.logits[:, -1].argmax(-1, keepdim=True)

        for k in range(warmup + steps):
            t = timer(back_to_back(step, window), warmup=0, repeats=1).per(window)
            if k >= warmup:
                samples.extend(t.samples_ms)
    return TimingStats(tuple(samples), "cuda_event" if cuda else "host")


def ceiling_alone(group: RankGroup, host: torch.Tensor, dev: torch.Tensor) -> Callable[[], CopyCeiling]:
    """A pinned host-to-device ceiling on ``host -> dev``, measured by each rank in turn while the others wait on
    the host: one link alone. Every rank must call it at the same point."""

    def measure() -> CopyCeiling:
        mine = None
        for k in range(group.world_size):
            group.barrier()
            if k == group.rank:
                mine = copy_ceiling_on(host, dev, "h2d", warmup=1, repeats=3)
        group.barrier()
        return mine

    return measure


@contextmanager
def count_work(sm: StreamedModel, ids: torch.Tensor, **shape: int) -> Iterator[dict[str, Any]]:
    """The work of the forwards run inside the block, from ``sm``'s own counters: ``forwards`` (passes),
    ``layer_loads`` and ``layer_bytes`` (bytes landed in the ring: copied, or copied and all-gathered; no padding),
    and per forward; with the work's shape: ``batch`` and ``prompt_tokens`` of ``ids``, plus ``shape`` (e.g.
    ``decode_steps``). The dict is filled when the block ends."""
    b0, l0, p0 = sm.bytes_streamed, sm.layers_streamed, sm.passes
    work: dict[str, Any] = {"batch": int(ids.shape[0]), "prompt_tokens": int(ids.shape[-1]),
                            **{k: int(v) for k, v in shape.items()}}
    yield work
    forwards, loads, nbytes = sm.passes - p0, sm.layers_streamed - l0, sm.bytes_streamed - b0
    work.update(forwards=forwards, layer_loads=loads, layer_bytes=nbytes,
                layers_per_forward=loads / forwards if forwards else 0.0,
                layer_bytes_per_forward=nbytes / forwards if forwards else 0.0)


WORK_FIELDS = ("batch", "prompt_tokens", "decode_steps", "layers_per_forward")


def work_differences(one: dict[str, Any], part: dict[str, Any], *, layers: int) -> dict[str, Any]:
    """How two :func:`count_work` records differ: ``layer_bytes_ratio`` (one's layer bytes per forward over
    part's; NaN when part streamed nothing), ``unequal_fields`` (of :data:`WORK_FIELDS`), and ``short_sides`` (the
    sides that did not stream ``layers`` layers per forward)."""
    denom = part.get("layer_bytes_per_forward") or 0
    ratio = one.get("layer_bytes_per_forward", 0) / denom if denom else math.nan
    unequal = [f for f in WORK_FIELDS if one.get(f) != part.get(f)]
    short = [side for side, w in (("one_gpu", one), ("partitioned", part)) if w.get("layers_per_forward") != layers]
    return {"layer_bytes_ratio": ratio, "unequal_fields": unequal, "short_sides": short}


def same_work(claim: Any, one: dict[str, Any], part: dict[str, Any], *, layers: int, figure: str,
              params: dict[str, Any] | None = None) -> None:
    """Preconditions of a ratio "one GPU over partitioned" on ``figure`` (through ``claim``, a
    :class:`~djinn_core.bench.claims.ClaimRecorder`): both sides landed the same layer bytes per forward, and ran
    the same batch, prompt tokens, decode steps and ``layers`` layers per forward. Raises
    :class:`~djinn_core.bench.claims.PreconditionFailed` when not."""
    d = work_differences(one, part, layers=layers)
    claim.precondition(f"{figure}_layer_bytes_per_forward_one_gpu_over_partitioned", value=d["layer_bytes_ratio"],
                       op="==", bound=1.0, unit="x",
                       what=f"layer bytes landed in the ring per forward (the engines' counters), one GPU "
                            f"{one.get('layer_bytes_per_forward')} over partitioned "
                            f"{part.get('layer_bytes_per_forward')}",
                       params=params)
    claim.precondition(f"{figure}_work_unequal", value=len(d["unequal_fields"]) + len(d["short_sides"]), op="<=",
                       bound=0, unit="fields",
                       what=f"fields of the timed work that differ between one GPU and partitioned (batch, prompt "
                            f"tokens, decode steps, layers per forward): {d['unequal_fields']}, and sides that did "
                            f"not stream all {layers} layers per forward: {d['short_sides']}", params=params)


def bandwidth_bytes_counted(claim: Any, work: dict[str, Any], *, bytes_per_forward: int, layers: int,
                            params: dict[str, Any] | None = None) -> None:
    """Preconditions of a bandwidth claim over ``bytes_per_forward``: the engine landed at least those bytes per
    forward (its counters), streaming all ``layers`` layers in each."""
    counted = work.get("layer_bytes_per_forward", 0)
    claim.precondition("layer_bytes_counted_over_claimed", value=counted / bytes_per_forward, op=">=", bound=1.0,
                       unit="x", what=f"layer bytes landed per forward by the engine's counters ({counted}) over the "
                                      f"bytes the bandwidth divides ({bytes_per_forward})", params=params)
    claim.precondition("layers_per_forward", value=work.get("layers_per_forward", 0), op="==", bound=layers,
                       unit="layers", what="layer loads per timed forward", params=params)


def host_link_ceiling(ranks: list[dict[str, Any]], *, caps_below: float = 0.95) -> dict[str, Any]:
    """What the host feeds all links at once (each rank's ``ceiling_all_links_at_once``, measured with every rank
    copying at the same time, summed) against N x one link alone (the median over ranks of each one's one-link
    ceiling). ``capped``: the sum is below ``caps_below`` x N links, so the host (memory, PCIe switches), not the
    links, bounds the partitioned stream, and a bandwidth claim divides by ``per_link_GBps`` (the host's share per
    link) instead of one link's ceiling."""
    n = len(ranks)
    if n == 0:
        raise ConfigError("no ranks")
    at_once = sum(float(r["partitioned"]["ceiling_all_links_at_once"]["GBps"]) for r in ranks)
    one = sorted(float(r["partitioned"]["bandwidth"]["ceiling_GBps"]) for r in ranks)[n // 2]
    return {"all_links_at_once_GBps": at_once, "one_link_GBps": one, "links": n,
            "host_feeds_x_one_link": at_once / one, "capped": at_once < caps_below * n * one,
            "per_link_GBps": at_once / n}


def pipeline_figures(timeline: list[dict[str, Any]], *, layer_bytes: int, pass_ms: float) -> dict[str, Any]:
    """Where a pass's time goes, from a :meth:`~djinn_core.streaming.StreamedModel.read_timeline` of it:
    ``cadence_ms`` (median spacing of consecutive layers' copy starts: the rate the links sustain once the pipeline
    runs), ``steady_GBps`` (``layer_bytes`` per cadence), ``overhead_ms`` (``pass_ms`` beyond ``n`` layers at the
    cadence: the first layer's copy tail and all-gather that compute must wait for, the last layer's compute and the
    head that no copy overlaps), ``first_compute_ms`` and ``after_last_copy_ms``."""
    starts = [row["copy_start_ms"] for row in timeline]
    gaps = sorted(b - a for a, b in zip(starts, starts[1:]))
    if not gaps:
        return {"layers": len(timeline), "cadence_ms": None, "steady_GBps": None, "overhead_ms": None}
    mid = len(gaps) // 2
    cadence = gaps[mid] if len(gaps) % 2 else (gaps[mid - 1] + gaps[mid]) / 2
    return {"layers": len(timeline), "cadence_ms": cadence, "steady_GBps": layer_bytes / (cadence * 1e-3) / 1e9,
            "overhead_ms": pass_ms - len(timeline) * cadence, "pass_ms": pass_ms,
            "first_compute_ms": timeline[0]["compute_start_ms"],
            "after_last_copy_ms": pass_ms - timeline[-1]["copy_end_ms"]}


def partitioned_model(shards: ShardPack, group: RankGroup, *, num_layers: int, chunk_bytes: int, max_tokens: int,
                      prefill_tokens: int, budget_bytes: int, max_slots: int, arch: str, dtype: torch.dtype,
                      seed: int, record_timeline: bool = False) -> AbstractContextManager[PartitionedStreamedModel]:
    """As exp2's ``streamed_model``, from this rank's shards: a fresh ``arch`` model of ``num_layers`` under
    ``budget_bytes`` (counting, on CUDA, what the device already uses outside torch's allocator: the context and
    NCCL's buffers), torch's allocator capped at the rest for the duration."""
    return budgeted_model(
        lambda model, policy, plan: PartitionedStreamedModel(
            model, shards, policy, device=group.device, group=group.group, budget=plan,
            record_timeline=record_timeline, layer_sets=[i % shards.num_sets for i in range(num_layers)]),
        group.device, arch=arch, num_layers=num_layers, dtype=dtype, seed=seed, chunk_bytes=chunk_bytes,
        max_tokens=max_tokens, prefill_tokens=prefill_tokens, budget_bytes=budget_bytes, max_slots=max_slots,
        planner=partial(partitioned_plan, world_size=group.world_size), overhead_margin=DEVICE_OVERHEAD_MARGIN)


def greedy_three_ways(group: RankGroup, shards: ShardPack, pack: WeightPack, *, layers: int, slots: int,
                      chunk_bytes: int, prompt_tokens: int, steps: int, arch: str, dtype: torch.dtype,
                      seed: int) -> dict[str, Any]:
    """This rank's prompt, greedy with a KV cache through the first ``layers`` layers three ways: partitioned (from
    ``shards``, every rank at once), one-device streaming (from ``pack``), resident (``build_model``); unequal logit
    elements and tokens of the partitioned run against each. ``slots`` ring slots, no budget."""
    device = group.device

    def streamed(cls: type, source: Any, **kw: Any) -> tuple:
        model = build_model(arch, num_layers=layers, dtype=dtype, materialize=False)
        place_resident_(model, device, seed=seed)
        ring = slots * source.layout.stride
        policy = StreamingPolicy(chunk_bytes=min(chunk_bytes, ring), ring_bytes=ring)
        with cls(model, source, policy, device=device, layer_sets=list(range(layers)), **kw) as sm:
            out = greedy(sm.model, ids, steps)
        del model
        free_device_memory()
        return out

    ids = prompt(prompt_tokens, architecture_config(arch).vocab_size, seed=PROMPT_SEED + group.rank, device=device)
    got = streamed(PartitionedStreamedModel, shards, group=group.group)
    one = streamed(StreamedModel, pack)
    resident = build_model(arch, num_layers=layers, device=device, dtype=dtype, seed=seed)
    want = greedy(resident, ids, steps)
    del resident
    free_device_memory()
    return {"prompt_seed": PROMPT_SEED + group.rank, "layers": layers, "slots": slots, "tokens": got[2],
            "one_device_tokens": one[2], "resident_tokens": want[2], "vs_one_device": mismatches(got, one),
            "vs_resident": mismatches(got, want)}


def pack_both(group: RankGroup, cfg: ScaleoutConfig, *, progress: bool = True) -> tuple[ShardPack, WeightPack]:
    """This rank's shards of ``cfg.layers`` layers and the one-device pack of ``cfg.baseline_sets`` whole layers,
    seeded as ``build_model``; the host RAM of all of this host's ranks is checked (and agreed) before any pins."""
    dtype = resolve_dtype(cfg.dtype)
    meta = build_model(cfg.arch, num_layers=cfg.layers, dtype=dtype, materialize=False)
    layout = LayerLayout.of(decoder_layers(meta)[0])
    check_node_host_ram(group, cfg.layers * shard_bytes_for(layout.used_bytes, group.world_size)
                        + cfg.baseline_sets * layout.stride, "layer shards and one-device pack")
    fill = partial(seeded_layer_fill, cfg.seed)
    shards = pack_layer_shards(meta, rank=group.rank, world_size=group.world_size, device=group.device, fill=fill,
                               progress=progress)
    try:
        pack = pack_layer_weights(meta, device=group.device, fill=fill, num_sets=cfg.baseline_sets,
                                  progress=progress)
    except BaseException:
        shards.release()
        raise
    return shards, pack


def bitwise_rank(group: RankGroup, cfg: ScaleoutConfig, out_dir: str, slots: int) -> None:
    """A rank of the bitwise comparison alone (the CPU tests run it under gloo): pack, compare, write
    ``rank{r}.json``."""
    suite_numerics()
    shards, pack = pack_both(group, cfg, progress=False)
    try:
        res = greedy_three_ways(group, shards, pack, layers=cfg.baseline_sets, slots=slots,
                                chunk_bytes=cfg.chunk_bytes, prompt_tokens=cfg.bitwise_tokens,
                                steps=cfg.bitwise_steps, arch=cfg.arch, dtype=resolve_dtype(cfg.dtype), seed=cfg.seed)
        res.update(rank=group.rank, shard_bytes=shards.shard_bytes, shard_layer_bytes=shards.natural_bytes,
                   layer_used_bytes=pack.layout.used_bytes)
    finally:
        pack.release()
        shards.release()
    _write_rank(group, out_dir, res)


# ------------------------------------------------------------------------------------------------- the experiment
def _one_gpu(pack: WeightPack, group: RankGroup, cfg: ScaleoutConfig) -> dict[str, Any]:
    """Step 2 on this rank, alone: one-GPU streaming of ``cfg.layers`` layers from ``pack``."""
    device, dtype = group.device, resolve_dtype(cfg.dtype)
    with streamed_model(pack, device, num_layers=cfg.layers, chunk_bytes=cfg.chunk_bytes,
                        max_tokens=cfg.ttft_tokens + cfg.decode_steps + 2, prefill_tokens=cfg.ttft_tokens,
                        budget_bytes=cfg.budget_bytes, max_slots=cfg.max_slots, arch=cfg.arch, dtype=dtype) as sm:
        ids = prompt(cfg.ttft_tokens, sm.model.config.vocab_size, seed=PROMPT_SEED + group.rank, device=device)
        host = pack.layer(0)

        def ceiling() -> CopyCeiling:
            return copy_ceiling_on(host, sm.ring.buffer[:host.numel()], "h2d", warmup=1, repeats=3)

        with count_work(sm, ids) as ttft_work:
            ttft = measure_forwards(prefill_fn(sm.model, ids, use_cache=True), device=device,
                                    bytes_per_forward=sm.bytes_per_pass, warmup=1, repeats=cfg.repeats,
                                    ceiling=ceiling)
        with count_work(sm, ids, decode_steps=cfg.decode_steps) as decode_work:
            decode = time_decode_steps(sm.model, ids, steps=cfg.decode_steps)
        return {"ttft": ttft.to_dict(), "decode": decode.to_dict(), "stats": sm.stats(),
                "work": {"ttft": ttft_work, "decode": decode_work}}


def _partitioned(shards: ShardPack, pack: WeightPack, group: RankGroup, cfg: ScaleoutConfig) -> dict[str, Any]:
    """Step 3 on every rank at once."""
    device, dtype = group.device, resolve_dtype(cfg.dtype)
    torch.cuda.reset_peak_memory_stats(device)
    with partitioned_model(shards, group, num_layers=cfg.layers, chunk_bytes=cfg.chunk_bytes,
                           max_tokens=cfg.ttft_tokens + cfg.decode_steps + 2, prefill_tokens=cfg.ttft_tokens,
                           budget_bytes=cfg.budget_bytes, max_slots=cfg.max_slots, arch=cfg.arch, dtype=dtype,
                           seed=cfg.seed, record_timeline=True) as pm:
        vocab = pm.model.config.vocab_size
        host = pack.layer(0)
        dev = pm.ring.buffer[:host.numel()]  # slot 0: every forward reloads it before reading it
        alone = ceiling_alone(group, host, dev)
        group.barrier()
        both = copy_ceiling_on(host, dev, "h2d", warmup=1, repeats=5)  # every link at once
        ids = prompt(cfg.bandwidth_tokens, vocab, seed=PROMPT_SEED + group.rank, device=device)
        with count_work(pm, ids) as bandwidth_work:
            bandwidth = measure_forwards(prefill_fn(pm.model, ids), device=device,
                                         bytes_per_forward=pm.bytes_per_pass, warmup=1, repeats=cfg.repeats,
                                         ceiling=alone)
        bandwidth_timeline = pm.read_timeline()  # the last bandwidth prefill
        group.barrier()
        gather = time_cuda(lambda: pm.ring.gather_slot(0), warmup=2, repeats=10)
        ids = prompt(cfg.ttft_tokens, vocab, seed=PROMPT_SEED + group.rank, device=device)
        with count_work(pm, ids) as ttft_work:
            ttft = measure_forwards(prefill_fn(pm.model, ids, use_cache=True), device=device,
                                    bytes_per_forward=pm.bytes_per_pass, warmup=1, repeats=cfg.repeats,
                                    ceiling=alone)
        timeline = pm.read_timeline()  # the last TTFT prefill
        with count_work(pm, ids, decode_steps=cfg.decode_steps) as decode_work:
            decode = time_decode_steps(pm.model, ids, steps=cfg.decode_steps)
        return {"bandwidth": bandwidth.to_dict(), "bandwidth_timeline": bandwidth_timeline,
                "work": {"bandwidth": bandwidth_work, "ttft": ttft_work, "decode": decode_work},
                "ceiling_all_links_at_once": both.to_dict(),
                "allgather_per_layer": gather.to_dict(), "allgather_bytes": pm.ring.shard_bytes * group.world_size,
                "ttft": ttft.to_dict(), "decode": decode.to_dict(), "timeline": timeline, "stats": pm.stats(),
                "peak_torch_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
                "nvml_used_bytes_after": nvml_used_bytes(device)}


def rank_main(group: RankGroup, cfg: ScaleoutConfig, out_dir: str) -> None:
    """One rank of the experiment (steps 1-4 of the module docstring); writes ``rank{r}.json`` in ``out_dir``."""
    if group.device.type != "cuda":
        raise ConfigError("the scale-out experiment needs one GPU per rank (the CPU tests run bitwise_rank)")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {group.rank} %(name)s: %(message)s")
    suite_numerics()
    res: dict[str, Any] = {"rank": group.rank, "world_size": group.world_size, "gpu": gpu_identity(group.device),
                           "prompt_seed": PROMPT_SEED + group.rank}
    shards, pack = pack_both(group, cfg, progress=group.rank == 0)
    res["pinned"] = {"shard_bytes": shards.shard_bytes, "shards_bytes": shards.nbytes, "shards_pin_s": shards.pin_s,
                     "one_gpu_pack_bytes": pack.nbytes, "one_gpu_pack_pin_s": pack.pin_s}
    try:
        for k in range(group.world_size):  # step 2: one GPU at a time
            group.barrier()
            if k == group.rank:
                log.info("rank %d: one-GPU baseline", group.rank)
                res["one_gpu"] = _one_gpu(pack, group, cfg)
        group.barrier()
        log.info("rank %d: partitioned", group.rank)
        res["partitioned"] = _partitioned(shards, pack, group, cfg)
        res["bitwise"] = greedy_three_ways(group, shards, pack, layers=cfg.baseline_sets, slots=min(cfg.max_slots, 3),
                                           chunk_bytes=cfg.chunk_bytes, prompt_tokens=cfg.bitwise_tokens,
                                           steps=cfg.bitwise_steps, arch=cfg.arch, dtype=resolve_dtype(cfg.dtype),
                                           seed=cfg.seed)
    finally:
        pack.release()
        shards.release()
    _write_rank(group, out_dir, res)


def _write_rank(group: RankGroup, out_dir: str, res: dict[str, Any]) -> None:
    """``rank{r}.json``: the rank's results with its own provenance (the machine, its GPU, the commit)."""
    res.update(result_provenance(group.device.index or 0))
    Path(out_dir, f"rank{group.rank}.json").write_text(json.dumps(res, default=str))


def run(cfg: ScaleoutConfig, out_dir: str | Path, *, rank_fn: Callable[..., None] = rank_main,
        args: tuple = ()) -> dict[str, Any]:
    """Start ``cfg.world_size`` ranks running ``rank_fn(group, cfg, out_dir, *args)`` (default: the experiment) and
    return ``{"config": ..., "ranks": [rank 0's results, ...]}``. Raises if a rank fails."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rank*.json"):
        old.unlink()
    spawn(rank_fn, cfg.world_size, args=(cfg, str(out_dir), *args), backend=cfg.backend)
    ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(cfg.world_size)]
    return {"config": asdict(cfg), "ranks": ranks}


__all__ = ["PROMPT_SEED", "WORK_FIELDS", "ScaleoutConfig", "bandwidth_bytes_counted", "bitwise_rank", "ceiling_alone",
           "count_work", "gpu_identity", "greedy_three_ways", "pack_both", "partitioned_model", "pipeline_figures",
           "rank_main", "run", "same_work", "suite_numerics", "time_decode_steps", "work_differences"]
