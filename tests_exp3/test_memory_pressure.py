"""exp3: memory pressure. More paused sessions complete than fit in VRAM; VRAM stays under its budget; nothing is lost.

H100, Llama-2-13B architecture (random fp16 weights, 24.2 GiB, shared by every session); each session is a distinct
2048-token prompt (1.59 GiB of KV at a capacity of 2048 + 32 tokens) paused at layer 20. For N in {8, 32, 50, 64}:
spawn all N in turn, then resume them round-robin and generate 16 tokens each, twice over, so sessions are evicted
to the host pool and brought back. In the same run: the eager baseline (plain PyTorch ``DynamicCache`` per session,
kept resident until out of memory) against the count predicted from measured free memory, and pinned copy ceilings
for the per-swap bandwidth claim.

The CPU version runs the same workload on a tiny config with a slab that forces swapping.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tqdm import tqdm

from djinn_core.runtime import BreakpointRuntime, SessionState
from djinn_core.errors import AdmissionRefused, ConfigError
from djinn_core.memory.host_pool import HostPool
from djinn_core.runtime.kv_cache import KVGeometry
from djinn_core.models import build_model
from djinn_core.memory.slab import Slab
from djinn_core.memory.swap import SwapEngine, swap_timeline
from djinn_core.bench.timing import TimingStats

log = logging.getLogger(__name__)
GiB = 2**30

PAUSE_LAYER = 20
PROMPT_TOKENS = 2048
GEN_PER_ROUND = 16
ROUNDS = 2
NEW_TOKENS = GEN_PER_ROUND * ROUNDS
SESSION_COUNTS = [8, 32, 50, 64]
BUDGET_HEADROOM = 3 * GiB  # the default VRAM budget leaves this much of the card unused
ACTIVATION_HEADROOM = 3 * GiB  # inside the budget, outside the slab: activations and the torch allocator
RESERVE_HEAD_BYTES = 64 << 20  # a checkpoint head (hidden state + layer kwargs: ~21 MiB at 2048 tokens), rounded up


def prompts(n: int, seq: int, vocab: int, device: torch.device | str) -> list[torch.Tensor]:
    """n distinct seeded prompts (token ids), the same for every N, so each session has one solo reference."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (1, seq), generator=g).to(device) for _ in range(n)]


@dataclass
class WorkloadResult:
    tokens: dict[int, torch.Tensor]  # prompt index -> (1, NEW_TOKENS) token ids
    marks: list[dict[str, Any]] = field(default_factory=list)  # (event, session, slab_used) in order
    max_slab_used: int = 0
    evictions: int = 0


def run_workload(rt: BreakpointRuntime, ps: list[torch.Tensor], *, layer: int, mark=None,
                 progress: bool = False) -> WorkloadResult:
    """Spawn every prompt to ``layer``, then ROUNDS x round-robin resume + generate GEN_PER_ROUND tokens."""
    res = WorkloadResult(tokens={})

    def note(event: str, i: int) -> None:
        used = rt.slab.stats.used
        res.max_slab_used = max(res.max_slab_used, used)
        rec = {"event": event, "session": i, "slab_used": used, "evictions": rt.evictions}
        res.marks.append(rec)
        if mark is not None:
            mark(event, session=i, slab_used=used, evictions=rt.evictions)

    sessions = []
    for i, p in enumerate(tqdm(ps, desc="spawn", disable=not progress)):
        s = rt.open(p, max_new_tokens=NEW_TOKENS)
        s.run_to(layer)
        sessions.append(s)
        note("spawn", i)
    out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(ps))}
    for r in range(ROUNDS):
        for i, s in enumerate(tqdm(sessions, desc=f"round {r}", disable=not progress)):
            if s.state in (SessionState.CHECKPOINT, SessionState.PAUSED, SessionState.SWAPPED):
                s.resume()
            out[i].append(s.generate(GEN_PER_ROUND).cpu())
            note(f"round{r}", i)
    res.tokens = {i: torch.cat(t, dim=1) for i, t in out.items()}
    res.evictions = rt.evictions
    for s in sessions:
        s.close()
    return res


def solo_tokens(rt: BreakpointRuntime, p: torch.Tensor, *, layer: int) -> torch.Tensor:
    """The same session alone on an idle runtime: run_to, resume, generate ROUNDS x GEN_PER_ROUND."""
    s = rt.open(p, max_new_tokens=NEW_TOKENS)
    s.run_to(layer)
    s.resume()
    toks = torch.cat([s.generate(GEN_PER_ROUND).cpu() for _ in range(ROUNDS)], dim=1)
    s.close()
    return toks


def unequal_sessions(result: WorkloadResult, solo: dict[int, torch.Tensor]) -> list[int]:
    return [i for i, t in result.tokens.items() if not torch.equal(t, solo[i])]


# ---------------------------------------------------------------------------------------------------------- H100

@dataclass
class PressureRig:
    model: Any
    prompts: list[torch.Tensor]
    slab: Slab
    pool: HostPool
    budget_bytes: int
    session_bytes: int
    weight_bytes: int
    solo: dict[int, torch.Tensor]
    eager: dict[str, Any]


def eager_baseline(model, ps: list[torch.Tensor], kv_session_bytes: int) -> dict[str, Any]:
    """Plain PyTorch: one DynamicCache per 2048-token session kept resident until the GPU runs out of memory."""
    from transformers import DynamicCache

    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    predicted = free // kv_session_bytes
    caches = []
    oom_at = None
    try:
        with torch.no_grad():
            for k in range(4 * len(ps)):
                c = DynamicCache(config=model.config)
                model(ps[k % len(ps)], past_key_values=c, use_cache=True, logits_to_keep=1)
                caches.append(c)
    except torch.cuda.OutOfMemoryError:
        oom_at = len(caches) + 1
    held = len(caches)
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    del caches
    gc.collect()
    torch.cuda.empty_cache()
    return {"free_before_bytes": free, "total_bytes": total, "kv_session_bytes": kv_session_bytes,
            "predicted_sessions": int(predicted), "sessions_held": held, "oom_at_session": oom_at,
            "allocated_at_oom_bytes": allocated, "reserved_at_oom_bytes": reserved}


@pytest.fixture(scope="module")
def pressure_rig(llama2_13b_fp16, cuda_device) -> PressureRig:
    model = llama2_13b_fp16
    ps = prompts(max(SESSION_COUNTS), PROMPT_TOKENS, model.config.vocab_size, cuda_device)
    geo = KVGeometry.for_model(model.config, batch=1, capacity=PROMPT_TOKENS + NEW_TOKENS, dtype=torch.float16)
    session_bytes = geo.block_bytes * geo.num_layers
    eager = eager_baseline(model, ps, KVGeometry.for_model(model.config, batch=1, capacity=PROMPT_TOKENS,
                                                          dtype=torch.float16).block_bytes * geo.num_layers)
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(cuda_device.index or 0)
    total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
    used_now = pynvml.nvmlDeviceGetMemoryInfo(handle).used  # weights, CUDA context, allocator cache
    budget = total - BUDGET_HEADROOM
    slab_bytes = budget - used_now - ACTIVATION_HEADROOM
    slab = Slab(slab_bytes, cuda_device)
    # host pool from the plan: only what must be swapped out at the largest N, plus one session of slack
    pool_bytes = max(SESSION_COUNTS) * (session_bytes + (64 << 20)) - slab_bytes + 2 * session_bytes
    pool = HostPool(pool_bytes, chunk_bytes=1 << 30)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rt = BreakpointRuntime(model, slab=slab, host_pool=pool)
    solo = {i: solo_tokens(rt, p, layer=PAUSE_LAYER) for i, p in enumerate(tqdm(ps, desc="solo references"))}
    rt.close_all()
    yield PressureRig(model, ps, slab, pool, budget, session_bytes, weight_bytes, solo, eager)
    del slab, pool
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.h100
@pytest.mark.slow
@pytest.mark.parametrize("sessions", SESSION_COUNTS, ids=lambda n: f"N={n}")
def test_paused_sessions_oversubscribe_vram_and_all_complete(sessions, pressure_rig, copy_ceilings, vram_sampler,
                                                             claim):
    rig = pressure_rig
    ps = rig.prompts[:sessions]
    params = {"sessions": sessions, "model": "llama2-13b", "prompt_tokens": PROMPT_TOKENS, "layer": PAUSE_LAYER}
    swap = SwapEngine(rig.slab, rig.pool, record_timing=True)
    # policy: keep one whole session's state (its KV plus a checkpoint head) free, evicting behind each call, so a
    # resume finds its room ready and never shares the link with an eviction
    reserve = rig.session_bytes + RESERVE_HEAD_BYTES
    rt = BreakpointRuntime(rig.model, slab=rig.slab, swap=swap, reserve_bytes=reserve)
    ceil_before = {d: copy_ceilings.measure(rig.session_bytes, d) for d in ("h2d", "d2h")}
    sampler = vram_sampler(period_s=0.01)

    def run() -> WorkloadResult:
        with sampler:
            return run_workload(rt, ps, layer=PAUSE_LAYER, mark=sampler.mark, progress=True)

    result = claim.measure(run)
    ceil_after = {d: copy_ceilings.measure(rig.session_bytes, d) for d in ("h2d", "d2h")}
    rt.close_all()

    demand = sessions * rig.session_bytes + rig.weight_bytes
    bad = unequal_sessions(result, rig.solo)
    peak_nvml, peak_reserved = sampler.peak_nvml_used(), sampler.peak_torch_reserved()
    timeline = swap_timeline(swap.records)
    swaps = [(t["direction"], t["nbytes"], t["ms"]) for t in timeline]
    full = [s for s in swaps if s[1] >= rig.session_bytes * 0.99]  # whole-session swaps (1.59 GiB)
    full_timeline = [t for t in timeline if t["nbytes"] >= rig.session_bytes * 0.99]
    slab_st = rig.slab.stats
    breakdown = {"weights_bytes": rig.weight_bytes, "slab_reserved_bytes": rig.slab.capacity,
                 "kv_resident_peak_bytes": result.max_slab_used, "host_pool_bytes": rig.pool.stats.capacity,
                 "torch_allocated_peak_bytes": sampler.peak_torch_allocated(),
                 "torch_reserved_peak_bytes": peak_reserved,
                 "torch_allocator_overhead_peak_bytes": peak_reserved - sampler.peak_torch_allocated(),
                 "nvml_used_peak_bytes": peak_nvml, "budget_bytes": rig.budget_bytes,
                 "demand_bytes": demand, "slab_high_water_bytes": slab_st.high_water}
    claim.info(vram=sampler.to_dict(), budget_bytes=rig.budget_bytes, breakdown=breakdown, eager=rig.eager,
               swaps=timeline, evictions=result.evictions,
               marks=result.marks, ceilings={"before": {d: c.to_dict() for d, c in ceil_before.items()},
                                             "after": {d: c.to_dict() for d, c in ceil_after.items()}},
               oversubscription=demand / rig.budget_bytes, reserve_bytes=reserve)
    claim.check("sessions_with_tokens_unequal_to_solo_run", method="djinn", value=len(bad), bound=0, op="==",
                unit="sessions", params=params, check=False)
    claim.check("sessions_completed_fraction", method="djinn", value=len(result.tokens) / sessions, bound=1.0,
                op="==", unit="fraction", params=params, check=False)
    claim.check("peak_nvml_used_over_budget", method="djinn", value=peak_nvml / rig.budget_bytes, bound=1.0,
                op="<=", unit="x budget", params=params, check=False)
    claim.check("peak_torch_reserved_over_budget", method="djinn", value=peak_reserved / rig.budget_bytes,
                bound=1.0, op="<=", unit="x budget", params=params, check=False)
    if result.evictions:
        # plateau: once the first eviction happened, the slab stays full to within the reserve the policy keeps free
        # plus one session's state (evictions free whole sessions)
        first = next(k for k, m in enumerate(result.marks) if m["evictions"] > 0)
        low = min(m["slab_used"] for m in result.marks[first:])
        claim.check("slab_fill_after_first_eviction", method="djinn", value=low / rig.slab.capacity,
                    bound=1.0 - (reserve + rig.session_bytes) / rig.slab.capacity, op=">=", unit="x slab",
                    params=params, check=False)
    for direction, ceiling_key in (("out", "d2h"), ("in", "h2d")):
        evs = [ms for d, _, ms in full if d == direction]
        if not evs:
            continue
        ceiling = min(ceil_before[ceiling_key].GBps, ceil_after[ceiling_key].GBps)
        claim.bandwidth(f"swap_{direction}_bandwidth_median", method="djinn", timing=TimingStats(tuple(evs)),
                        bytes_moved=rig.session_bytes, ceiling_GBps=ceiling, bound=0.9,
                        params={**params, "swaps": len(evs)}, check=False)
        worst = rig.session_bytes / (max(evs) * 1e-3) / 1e9
        # which swap it was, and how long it shared the link with copies the other way (attribution, not a claim)
        claim.info(**{f"slowest_swap_{direction}": max((t for t in full_timeline if t["direction"] == direction),
                                                       key=lambda t: t["ms"])})
        claim.check(f"swap_{direction}_bandwidth_worst_over_ceiling", method="djinn", value=worst / ceiling,
                    bound=0.9, op=">=", unit="x ceiling", params={**params, "swaps": len(evs)}, check=False)
    if sessions == max(SESSION_COUNTS):
        claim.check("sessions_completed_over_eager_max", method="djinn vs eager", bound=1.0, op=">",
                    value=len(result.tokens) / max(rig.eager["sessions_held"], 1), unit="x", params=params,
                    check=False)
    failed = [r["claim"] for r in claim.records if not r["passed"]]
    assert not failed, f"N={sessions}: {failed}; breakdown {breakdown}"


# ---------------------------------------------------------------------------------------------------------- CPU

def tiny_rig(n_prompts: int, slab_sessions: float, pool_sessions: int):
    """A tiny Llama, its prompts and a runtime whose slab holds ``slab_sessions`` fully decoded sessions."""
    model = build_model("llama-tiny", dtype=torch.float32, seed=0)
    ps = prompts(n_prompts, 40, model.config.vocab_size, "cpu")
    geo = KVGeometry.for_model(model.config, batch=1, capacity=40 + NEW_TOKENS, dtype=torch.float32)
    per_session = geo.block_bytes * geo.num_layers
    slab = Slab(int(per_session * slab_sessions), "cpu")
    rt = BreakpointRuntime(model, slab=slab, host_pool=HostPool(per_session * pool_sessions, chunk_bytes=per_session))
    return rt, ps, {i: solo_tokens(rt, p, layer=3) for i, p in enumerate(ps)}


@pytest.mark.cpu
def test_sessions_over_a_small_budget_all_complete_bitwise_and_the_budget_holds():
    rt, ps, solo = tiny_rig(6, slab_sessions=2.5, pool_sessions=8)  # room for two and a half: six must swap
    slab = rt.slab
    used: list[int] = []
    result = run_workload(rt, ps, layer=3, mark=lambda event, **rec: used.append(rec["slab_used"]))
    assert len(result.tokens) == len(ps)
    assert unequal_sessions(result, solo) == []
    assert result.evictions > 0, "the budget was meant to force swapping"
    assert max(used) <= slab.capacity and slab.stats.high_water <= slab.capacity
    assert slab.stats.used == 0 and rt.sessions == {}


@pytest.mark.cpu
def test_a_session_larger_than_the_whole_budget_fails_clearly_while_others_complete():
    rt, ps, solo = tiny_rig(3, slab_sessions=1.5, pool_sessions=6)
    others = [rt.open(p, max_new_tokens=NEW_TOKENS) for p in ps[:2]]
    for s in others:
        s.run_to(3)
    huge = rt.open(ps[2], max_new_tokens=40 * 50)  # its KV alone is larger than the slab
    with pytest.raises(AdmissionRefused, match="never be admitted"):
        huge.run_to(3)
    assert huge.state is SessionState.OPEN  # nothing was computed or allocated
    huge.close()
    for i, s in enumerate(others):
        s.resume()
        toks = torch.cat([s.generate(GEN_PER_ROUND) for _ in range(ROUNDS)], dim=1)
        assert torch.equal(toks, solo[i])
        s.close()


@pytest.mark.cpu
def test_a_reserve_keeps_a_session_of_room_free_after_every_call_and_changes_no_token():
    base, ps, solo = tiny_rig(6, slab_sessions=3.5, pool_sessions=10)
    geo = KVGeometry.for_model(base.model.config, batch=1, capacity=40 + NEW_TOKENS, dtype=torch.float32)
    reserve = geo.block_bytes * geo.num_layers + (64 << 10)  # a whole decoded session plus a tiny checkpoint head
    rt = BreakpointRuntime(base.model, slab=base.slab, swap=base.swap, reserve_bytes=reserve)
    free_after_call: list[int] = []
    result = run_workload(rt, ps, layer=3, mark=lambda event, **rec: free_after_call.append(rt.slab.free_bytes))
    assert unequal_sessions(result, solo) == []
    assert result.evictions > 0
    assert min(free_after_call) >= reserve, "an eviction behind each call keeps the reserve free"
    assert rt.slab.stats.used == 0 and rt.host_pool.stats.used == 0
    with pytest.raises(ConfigError, match="reserve_bytes"):
        BreakpointRuntime(base.model, slab=base.slab, swap=base.swap, reserve_bytes=-1)
