"""exp3: memory pressure. More paused sessions complete than fit in VRAM; VRAM stays under its budget; nothing is lost.

Llama-2-13B architecture (random fp16 weights, 24.2 GiB, shared by every session); each session is a distinct
2048-token prompt (1.59 GiB of KV at a capacity of 2048 + 32 tokens) paused at layer 20. Against the run's VRAM
budget (``--djinn-vram-budget``, default the H100 80GB card; see djinn_core.memory.vram_budget), for N in {8, 32, 50, 64}
(and, where the budget is larger than an 80 GB card, the N whose demand is 1.6x the budget): spawn all N in turn, then
resume them round-robin and generate 16 tokens each, twice over, so sessions are evicted to the host pool and brought
back. In the same run: the eager baseline (plain PyTorch ``DynamicCache`` per session, kept resident until out of
memory under the same budget) against the count predicted from the memory it may allocate; pinned copy ceilings
before and after each run for the median swap bandwidth; and, for each whole-session swap, a copy of the same bytes
the same way on the same stream right before and right after it (``LinkBracket``: the link's rate wanders from copy
to copy, docs/notes/bench.md), against which every swap is rated.

Preconditions (each fails the test when it does not hold): the budget fits the card; the host can pin the swap pool;
the largest N asks for at least 1.5x the budget; wherever the sessions cannot all stay in the slab, something was
evicted and swaps of both directions were timed, each between its two bracket copies, before any swap-bandwidth
claim; the eager baseline ran out of memory before the ratio to it.

The CPU version runs the same workload on a tiny config with a slab that forces swapping.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
import torch
from tqdm import tqdm

from djinn_core.bench import link_health
from djinn_core.bench import preconditions as pre
from djinn_core.bench.ceilings import LinkBracket
from djinn_core.memory.vram_budget import allocatable_bytes
from djinn_core.bench.experiments.memory_pressure import (GEN_PER_ROUND, NEW_TOKENS, ROUNDS, WorkloadResult,
                                                          demand_bytes, eager_baseline, must_evict, prompts,
                                                          run_workload, session_counts, solo_tokens, swap_pool_bytes,
                                                          swap_reference_GBps, unequal_sessions)
from djinn_core.bench.timing import TimingStats
from djinn_core.bench.vram import nvml_handle
from djinn_core.errors import AdmissionRefused, ConfigError
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.host_ram import default_min_free_host_bytes
from djinn_core.memory.slab import Slab
from djinn_core.memory.swap import SwapEngine, swap_timeline
from djinn_core.models import architecture_config, build_model, model_sizes
from djinn_core.runtime import BreakpointRuntime, SessionState
from djinn_core.runtime.kv_cache import KVGeometry
from fixtures.budget import budget_of

GiB = 2**30

MODEL = "llama2-13b"
PAUSE_LAYER = 20
PROMPT_TOKENS = 2048
ACTIVATION_HEADROOM = 3 * GiB  # inside the budget, outside the slab: activations and the torch allocator
RESERVE_HEAD_BYTES = 64 << 20  # a checkpoint head (hidden state + layer kwargs: ~21 MiB at 2048 tokens), rounded up


@functools.cache
def sizes_13b() -> tuple[int, int]:
    """(bytes of one fully decoded session's KV, weight bytes) of the 13B architecture, from its config."""
    config = architecture_config(MODEL)
    geo = KVGeometry.for_model(config, batch=1, capacity=PROMPT_TOKENS + NEW_TOKENS, dtype=torch.float16)
    return geo.block_bytes * geo.num_layers, model_sizes(config, torch.float16).total_weight_bytes


def counts_for(config: pytest.Config) -> list[int]:
    session_bytes, weight_bytes = sizes_13b()
    return session_counts(budget_of(config).bytes, session_bytes, weight_bytes, bar=pre.OVERSUBSCRIPTION_BAR)


def selected_counts(request: pytest.FixtureRequest) -> list[int]:
    """The N of this module's tests that this pytest run will run (``-k`` may run a part of the report)."""
    return sorted({item.callspec.params["sessions"] for item in request.session.items
                   if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
                   and "sessions" in item.callspec.params})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """N from the budget: the seeds' counts, plus the count whose demand is 1.6x a budget they do not oversubscribe."""
    if "sessions" in metafunc.fixturenames:
        metafunc.parametrize("sessions", counts_for(metafunc.config), ids=lambda n: f"N={n}")


# ---------------------------------------------------------------------------------------------------------- H100

@dataclass
class PressureRig:
    model: Any
    prompts: list[torch.Tensor]
    slab: Slab | None
    pool: HostPool | None  # None: the host cannot pin it (the test's precondition fails)
    budget: dict[str, Any]  # the run's VRAM budget (vram_budget.to_dict()) and its enforcement
    budget_bytes: int | None
    session_bytes: int
    weight_bytes: int
    counts: list[int]  # every N of the report
    sized_for: int  # the largest N this run runs: prompts, solo references and the host pool are sized for it
    pool_bytes: int
    host_pinnable_bytes: int  # host RAM available for pinning (available less what must stay free)
    solo: dict[int, torch.Tensor]
    eager: dict[str, Any] | None  # None when the largest N's test does not run here
    bracket: LinkBracket | None  # reference copies of one session's bytes around each whole-session swap


@pytest.fixture(scope="module")
def pressure_rig(llama2_13b_fp16, cuda_device, vram_budget, vram_enforcement, pytestconfig,
                 request) -> PressureRig:
    model = llama2_13b_fp16
    counts = counts_for(pytestconfig)
    # a part of the report (pytest -k, joined later by djinn merge) pins, prompts and references only what its own
    # largest N needs, and runs the eager baseline only if it runs the report's largest N (the one compared with it)
    sized_for = max(selected_counts(request) or counts)
    ps = prompts(sized_for, PROMPT_TOKENS, model.config.vocab_size, cuda_device)
    geo = KVGeometry.for_model(model.config, batch=1, capacity=PROMPT_TOKENS + NEW_TOKENS, dtype=torch.float16)
    session_bytes = geo.block_bytes * geo.num_layers
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (session_bytes, weight_bytes) == sizes_13b(), "the model differs from the config the counts came from"
    eager = (eager_baseline(model, ps, KVGeometry.for_model(model.config, batch=1, capacity=PROMPT_TOKENS,
                                                           dtype=torch.float16).block_bytes * geo.num_layers,
                            allocatable=lambda: allocatable_bytes(cuda_device, vram_enforcement))
             if sized_for == max(counts) else None)
    budget = vram_budget.bytes
    # the brackets' buffers (one session's bytes, pinned and on the GPU) exist before the slab and the host pool are
    # sized, so both count them; whole-session swaps only (a swap of at least 99% of a session)
    bracket = (LinkBracket(session_bytes, cuda_device, min_swap_bytes=int(session_bytes * 0.99))
               if budget is not None and not vram_budget.exceeds_card else None)
    pynvml, handle = nvml_handle(cuda_device.index or 0)
    used_now = pynvml.nvmlDeviceGetMemoryInfo(handle).used  # weights, CUDA context, allocator cache, brackets
    slab = pool = None
    pool_bytes = 0
    vm = psutil.virtual_memory()
    pinnable = vm.available - default_min_free_host_bytes(vm.total)
    if budget is not None and not vram_budget.exceeds_card:
        slab = Slab(budget - used_now - ACTIVATION_HEADROOM, cuda_device)
        # the host pool holds what must be swapped out at the largest N run here: every session's state (KV plus a
        # checkpoint head) beyond what the slab holds, plus two sessions of slack; pinned only where the host can
        # spare it (the test's precondition says so otherwise: no InsufficientHostMemory error, no skip)
        pool_bytes = swap_pool_bytes(sized_for, session_bytes, RESERVE_HEAD_BYTES, slab.capacity)
        if pool_bytes <= pinnable:
            pool = HostPool(pool_bytes, segment_bytes=1 << 30)
    solo: dict[int, torch.Tensor] = {}
    if pool is not None:
        rt = BreakpointRuntime(model, slab=slab, host_pool=pool)
        solo = {i: solo_tokens(rt, p, layer=PAUSE_LAYER) for i, p in enumerate(tqdm(ps, desc="solo references"))}
        rt.close_all()
    yield PressureRig(model, ps, slab, pool, {**vram_budget.to_dict(), "enforcement": vram_enforcement}, budget,
                      session_bytes, weight_bytes, counts, sized_for, pool_bytes, pinnable, solo, eager, bracket)
    del slab, pool, bracket
    gc.collect()
    torch.cuda.empty_cache()


def _setup_preconditions(claim, rig: PressureRig, sessions: int, params: dict[str, Any]) -> None:
    """What must hold before anything runs: a budget within the card, a host that can pin the swap pool, and (at the
    largest N) a demand of at least 1.5x the budget."""
    card = rig.budget["card_bytes"]
    claim.precondition("vram_budget_within_card", value=(rig.budget_bytes or float("nan")) / card, op="<=", bound=1.0,
                       unit="x card", what=f"the VRAM budget ({rig.budget['spec']}) over the card's memory",
                       params=params)
    pre.at_least(claim, "host_ram_pins_the_swap_pool", value=rig.host_pinnable_bytes, bound=rig.pool_bytes,
                 unit="bytes", what="host RAM available for pinning (available less what must stay free), against "
                                    f"the swap pool the largest N run here (N={rig.sized_for}) needs", params=params)
    if sessions == max(rig.counts):
        pre.oversubscribed(claim, demand_bytes=demand_bytes(sessions, rig.session_bytes, rig.weight_bytes),
                           budget_bytes=rig.budget_bytes, params=params)


@pytest.mark.h100
@pytest.mark.slow
def test_paused_sessions_oversubscribe_vram_and_all_complete(sessions, pressure_rig, copy_ceilings, vram_sampler,
                                                             claim):
    rig = pressure_rig
    params = {"sessions": sessions, "model": MODEL, "prompt_tokens": PROMPT_TOKENS, "layer": PAUSE_LAYER}
    _setup_preconditions(claim, rig, sessions, params)
    ps = rig.prompts[:sessions]
    swap = SwapEngine(rig.slab, rig.pool, record_timing=True)
    swap.bracket = rig.bracket  # a copy of the same bytes right before and after each whole-session swap
    # policy: keep one whole session's state (its KV plus a checkpoint head) free, evicting behind each call, so a
    # resume finds its room ready and never shares the link with an eviction
    reserve = rig.session_bytes + RESERVE_HEAD_BYTES
    rt = BreakpointRuntime(rig.model, slab=rig.slab, swap=swap, free_target_bytes=reserve)
    health_read = link_health.reader(rig.slab.device.index or 0)
    health_before = health_read()
    ceil_before = {d: copy_ceilings.measure(rig.session_bytes, d) for d in ("h2d", "d2h")}
    sampler = vram_sampler(period_s=0.01)
    health = link_health.HealthSampler(period_s=1.0, read=health_read)

    def run() -> WorkloadResult:
        with sampler, health:
            return run_workload(rt, ps, layer=PAUSE_LAYER, mark=sampler.mark, progress=True)

    result = claim.measure(run)
    ceil_after = {d: copy_ceilings.measure(rig.session_bytes, d) for d in ("h2d", "d2h")}
    health_after = health_read()
    rt.close_all()

    demand = demand_bytes(sessions, rig.session_bytes, rig.weight_bytes)
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
    expect_swaps = must_evict(sessions, rig.session_bytes, rig.slab.capacity, reserve)
    claim.info(vram=sampler.to_dict(), budget_bytes=rig.budget_bytes, budget=rig.budget, breakdown=breakdown,
               peaks_against_budget=sampler.peaks(rig.budget_bytes),
               eager=rig.eager, swaps=timeline, evictions=result.evictions, expect_swaps=expect_swaps,
               session_counts=rig.counts, rig_sized_for=rig.sized_for,
               marks=result.marks, ceilings={"before": {d: c.to_dict() for d, c in ceil_before.items()},
                                             "after": {d: c.to_dict() for d, c in ceil_after.items()}},
               oversubscription=demand / rig.budget_bytes, free_target_bytes=reserve,
               link_health={"before": health_before, "after": health_after,
                            "delta": link_health.delta(health_before, health_after)})
    if expect_swaps:  # the sessions cannot all stay in the slab: the run must have swapped, both ways
        pre.evicted(claim, evictions=result.evictions, params=params)
        for direction in ("out", "in"):
            pre.swaps_measured(claim, direction=direction, swaps=sum(1 for d, _, _ in full if d == direction),
                               params=params)
    claim.check("sessions_with_tokens_unequal_to_solo_run", what="sessions whose tokens differ from their solo run",
                method="djinn", value=len(bad), bound=0, op="==",
                unit="sessions", params=params, check=False)
    claim.check("sessions_completed_fraction", what="fraction of the sessions that completed",
                method="djinn", value=len(result.tokens) / sessions, bound=1.0,
                op="==", unit="fraction", params=params, check=False)
    claim.check("peak_nvml_used_over_budget", what="peak GPU memory used (NVML, all processes) over the VRAM budget",
                method="djinn", value=peak_nvml / rig.budget_bytes, bound=1.0,
                op="<=", unit="x budget", params=params, check=False)
    claim.check("peak_torch_reserved_over_budget", what="peak torch-reserved GPU memory over the VRAM budget",
                method="djinn", value=peak_reserved / rig.budget_bytes,
                bound=1.0, op="<=", unit="x budget", params=params, check=False)
    if expect_swaps:
        # plateau: once the first eviction happened, the slab stays full to within the reserve the policy keeps free
        # plus one session's state (evictions free whole sessions)
        first = next(k for k, m in enumerate(result.marks) if m["evictions"] > 0)
        low = min(m["slab_used"] for m in result.marks[first:])
        claim.check("slab_fill_after_first_eviction",
                    what="lowest slab fill after the first eviction, over the slab's capacity",
                    method="djinn", value=low / rig.slab.capacity,
                    bound=1.0 - (reserve + rig.session_bytes) / rig.slab.capacity, op=">=", unit="x slab",
                    params=params, check=False)
        for direction, ceiling_key in (("out", "d2h"), ("in", "h2d")):
            evs = [ms for d, _, ms in full if d == direction]
            ceiling = min(ceil_before[ceiling_key].GBps, ceil_after[ceiling_key].GBps)
            claim.bandwidth(f"swap_{direction}_bandwidth_median",
                            what=f"median whole-session swap-{direction} under pressure",
                            method="djinn", timing=TimingStats(tuple(evs)),
                            bytes_moved=rig.session_bytes, ceiling_GBps=ceiling, bound=0.9,
                            params={**params, "swaps": len(evs)}, check=False)
            rows = [t for t in full_timeline if t["direction"] == direction]
            pre.swaps_bracketed(claim, direction=direction, bracketed=sum("over_bracket" in t for t in rows),
                                swaps=len(rows), params=params)
            # each swap against the link just around it, or against the run's ceiling where a bracket copy shared
            # the link with a copy the other way (and so ran slower than the link alone)
            worst = min(rows, key=lambda t: t["GBps"] / swap_reference_GBps(t, ceiling))
            claim.info(**{f"slowest_swap_{direction}": {**worst, "link_health": health.around(worst["host_start_s"])},
                          f"slowest_swap_{direction}_over_run_ceiling": min(t["GBps"] for t in rows) / ceiling,
                          f"swaps_{direction}_rated_against_run_ceiling":
                              sum(t.get("bracket_overlap_ms", 0.0) > 0 for t in rows)})
            claim.check(f"swap_{direction}_worst_over_bracket",
                        what=f"lowest whole-session swap-{direction} bandwidth over the link's rate just around it "
                             f"(a copy of the same bytes, same way, same stream, right before and right after it)",
                        method="djinn", value=worst["GBps"] / swap_reference_GBps(worst, ceiling),
                        bound=0.9, op=">=", unit="x link around it", params={**params, "swaps": len(rows)},
                        check=False)
    if sessions == max(rig.counts):
        # the eager baseline's "most it held" is a maximum only if it ran out of memory
        claim.precondition("eager_baseline_ran_out_of_memory", value=int(rig.eager["oom_at_session"] is not None),
                           op="==", bound=1, unit="bool", params=params,
                           what=f"eager PyTorch ran out of memory (held {rig.eager['sessions_held']} sessions)")
        pre.peer_ran(claim, peer="eager", value=rig.eager["sessions_held"], params=params)
        claim.check("sessions_completed_over_eager_max",
                    what="sessions completed over the most eager PyTorch held before running out of memory",
                    method="djinn vs eager", bound=1.0, op=">",
                    value=len(result.tokens) / rig.eager["sessions_held"], unit="x", params=params,
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
    rt = BreakpointRuntime(model, slab=slab, host_pool=HostPool(per_session * pool_sessions,
                                                                segment_bytes=per_session))
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
    rt = BreakpointRuntime(base.model, slab=base.slab, swap=base.swap, free_target_bytes=reserve)
    free_after_call: list[int] = []
    result = run_workload(rt, ps, layer=3, mark=lambda event, **rec: free_after_call.append(rt.slab.free_bytes))
    assert unequal_sessions(result, solo) == []
    assert result.evictions > 0
    assert min(free_after_call) >= reserve, "an eviction behind each call keeps the reserve free"
    assert rt.slab.stats.used == 0 and rt.host_pool.stats.used == 0
    with pytest.raises(ConfigError, match="free_target_bytes"):
        BreakpointRuntime(base.model, slab=base.slab, swap=base.swap, free_target_bytes=-1)


@pytest.mark.cpu
def test_a_swap_is_rated_against_its_brackets_unless_they_shared_the_link():
    clean = {"GBps": 45.0, "bracket_GBps": 46.0, "bracket_overlap_ms": 0.0}
    shared = {"GBps": 45.0, "bracket_GBps": 30.0, "bracket_overlap_ms": 4.2}  # slowed by a copy the other way
    assert swap_reference_GBps(clean, 52.0) == 46.0
    assert swap_reference_GBps(shared, 52.0) == 52.0
    assert swap_reference_GBps({"GBps": 45.0}, 52.0) == 52.0  # no brackets


@pytest.mark.cpu
def test_brackets_around_every_whole_session_swap_change_no_token():
    rt, ps, solo = tiny_rig(6, slab_sessions=2.5, pool_sessions=10)
    geo = KVGeometry.for_model(rt.model.config, batch=1, capacity=40 + NEW_TOKENS, dtype=torch.float32)
    session = geo.block_bytes * geo.num_layers
    rt.swap.bracket = bracket = LinkBracket(session, "cpu", min_swap_bytes=int(session * 0.99))
    calls: list[tuple[str, int]] = []
    inner = rt.swap.bracket
    rt.swap.bracket = lambda direction, stream, nbytes: (calls.append((direction, nbytes)), inner(direction, stream,
                                                                                                 nbytes))[1]
    result = run_workload(rt, ps, layer=3)
    assert unequal_sessions(result, solo) == [] and result.evictions > 0
    whole = [c for c in calls if c[1] >= session * 0.99]
    assert whole and bracket.copies == len(whole)  # one copy before and one after each whole-session swap
    assert {d for d, _ in whole} == {"out", "in"}


@pytest.mark.cpu
def test_a_part_of_the_report_sizes_its_rig_for_the_n_it_runs(request):
    from types import SimpleNamespace as NS

    here, other = request.module, object()
    items = [NS(module=here, callspec=NS(params={"sessions": n})) for n in (8, 64)]
    items += [NS(module=other, callspec=NS(params={"sessions": 126})), NS(module=here)]  # another file; no params
    fake = NS(module=here, session=NS(items=items))
    assert selected_counts(fake) == [8, 64]
    assert selected_counts(NS(module=here, session=NS(items=[]))) == []
