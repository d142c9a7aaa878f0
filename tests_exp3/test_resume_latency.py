"""exp3: resume latency is O(1) in depth.

H100, Llama-2-13B architecture, 2048-token prompt, L in {1, 10, 20, 30, 40}; in the same run:

* recompute: the forward through layers 0..L-1 again (what a system without breakpoints does);
* manual pinned offload: the hidden state copied back by hand from pinned memory (one H2D copy), timed -- like
  Djinn's restore -- as the first thing after the session's state was offloaded and the copies drained (the same
  machine state; the same copy in a tight loop is recorded too, ``manual_tight_loop_ms``);
* eager PyTorch: everything held on the GPU during the pause (nothing to copy; the VRAM it keeps is sampled);
* Djinn: ``session.restore()`` on a paused session, event-timed from the call until the compute stream may run
  layer L (``session.ready_event``; the KV copies are then in flight behind it), median of 20 after 3 warm-ups,
  interleaved with the manual copy-back;
* resume-to-next-token: from ``resume()`` to the logits of the first decode step (the first step that needs the
  restored KV), against max(copy of all restored bytes at the same-run pinned ceiling, the same continuation's compute
  from a resident checkpoint).

Bounds: Djinn <= 1.25 x manual at every L; max/min of Djinn over L <= 1.3, with every depth paused at once and the
depths timed round by round (the link's rate wanders within a minute: timed one depth after another, a depth met at
a slow stretch looks slower); recompute / Djinn at L=40 >= 100; resume-to-next-token <= 1.1 x max(copy, compute).
The ``cpu`` tests run the same code on a tiny config and assert behaviour only.
"""

from __future__ import annotations

import pytest
import torch

from djinn_core.bench import preconditions as pre
from djinn_core.bench.experiments.resume_latency import (REPEATS, depth_rounds, measure_resume_at_depth,
                                                       time_restore_across_depths)
from djinn_core.errors import ConfigError
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.slab import Slab
from djinn_core.models import build_model
from djinn_core.runtime import BreakpointRuntime, capture_at
from djinn_core.runtime.checkpoint import SessionState
from djinn_core.runtime.kv_cache import SlabKVCache, TorchKVAllocator

LAYERS = [1, 10, 20, 30, 40]
NEW_TOKENS = 64
_RESULTS: dict[int, dict] = {}  # L -> medians (ms), filled by the parametrized test, read by the depth test


@pytest.fixture(scope="module")
def runtime_13b(llama2_13b_fp16, prompt_2048_ids):
    rt = BreakpointRuntime(llama2_13b_fp16, slab=Slab(8 << 30, prompt_2048_ids.device), host_pool=HostPool(4 << 30))
    yield rt
    rt.close_all()


@pytest.mark.h100
@pytest.mark.slow
@pytest.mark.parametrize("layer", LAYERS, ids=lambda L: f"L={L}")
def test_resume_latency_against_baselines(layer, llama2_13b_fp16, runtime_13b, prompt_2048_ids, copy_ceilings,
                                          vram_sampler, claim):
    ids = prompt_2048_ids
    params = {"model": "llama2-13b", "L": layer, "prompt_tokens": ids.shape[1]}
    r = measure_resume_at_depth(llama2_13b_fp16, runtime_13b, ids, layer, new_tokens=NEW_TOKENS,
                                h2d_ceiling=lambda nbytes: copy_ceilings.measure(nbytes, "h2d"),
                                sampler=vram_sampler(period_s=0.01))
    _RESULTS[layer] = r.medians()
    claim.info(**r.info())
    claim.measure(lambda: None)
    for peer, timing in (("manual pinned offload", r.manual), ("recompute", r.recompute),
                         ("resident continuation compute", r.compute)):
        pre.peer_ran(claim, peer=peer, timing=timing, params=params)
    pre.bytes_moved(claim, nbytes=r.state_bytes, what="bytes of the paused session's state each restore brings back",
                    params=params)
    claim.ratio("resume_vs_manual_pinned_offload",
                what="restore until layer L may compute, against copying the hidden state back by hand",
                method="djinn",
                measured=r.djinn, reference=r.manual, bound=1.25, op="<=", params=params,
                reference_method="manual_pinned_offload", check=False)
    claim.ratio("resume_to_next_token_vs_max_copy_compute",
                what="resume to the first decode step's logits, against max(restored bytes at the pinned "
                     "ceiling, resident compute)",
                method="djinn", measured=r.to_next, reference=r.bound_ms, bound=1.1, op="<=", params=params,
                reference_method="max(copy_at_ceiling, compute)", check=False)
    claim.ratio("recompute_over_djinn_resume", what="recomputing layers 0..L-1 against Djinn's restore",
                method="recompute", measured=r.recompute, reference=r.djinn, bound=1.0,
                op=">=", params=params, reference_method="djinn", check=False)
    failed = [rec["claim"] for rec in claim.records if not rec["passed"]]
    assert not failed, f"L={layer}: {failed}; medians {_RESULTS[layer]}"


def open_at_depths(rt, ids, layers):
    """One session of ``ids`` per depth, each run to its layer and paused (so only one is resident while the next
    computes); returns the sessions and their hidden states at their layers."""
    sessions, hiddens = {}, {}
    for L in layers:
        s = rt.open(ids, max_new_tokens=1)
        hiddens[L] = s.run_to(L).hidden.clone()
        s.pause()
        sessions[L] = s
    return sessions, hiddens


@pytest.mark.h100
@pytest.mark.slow
def test_resume_latency_is_flat_in_depth(llama2_13b_fp16, prompt_2048_ids, claim):
    # the recompute ratio at L=40 reads the per-layer test: run the whole module (it fails, never skips, otherwise)
    claim.precondition("depths_measured", value=len(set(_RESULTS) & set(LAYERS)), op="==", bound=len(LAYERS),
                       unit="depths", what=f"depths L in {LAYERS} measured by this module's per-layer test",
                       params={"layers": LAYERS})
    # every depth paused at once, timed round by round: the host pool holds all five paused states (4.3 GB)
    dev = prompt_2048_ids.device
    rt = BreakpointRuntime(llama2_13b_fp16, slab=Slab(6 << 30, dev), host_pool=HostPool(6 << 30))
    try:
        sessions, hiddens = open_at_depths(rt, prompt_2048_ids, LAYERS)
        timed = time_restore_across_depths(sessions, hiddens)
    finally:
        rt.close_all()
    params = {"layers": LAYERS, "order": "interleaved"}
    claim.precondition("restores_timed_at_every_depth", value=min(t["djinn"].n for t in timed.values()), op=">=",
                       bound=REPEATS, unit="restores", what="timed restores at the least-timed depth",
                       params=params)
    djinn = [timed[L]["djinn"].median_ms for L in LAYERS]
    manual = [timed[L]["manual"].median_ms for L in LAYERS]
    sequential = [_RESULTS[L]["djinn_ms"] for L in LAYERS]
    claim.info(per_layer=_RESULTS,
               interleaved={L: {k: t.to_dict() for k, t in timed[L].items()} for L in LAYERS},
               interleaved_djinn_over_manual={L: d / m for L, d, m in zip(LAYERS, djinn, manual)},
               interleaved_manual_max_over_min=max(manual) / min(manual),
               sequential_djinn_max_over_min=max(sequential) / min(sequential))
    claim.check("djinn_resume_max_over_min_across_depth",
                what="slowest over fastest median restore across depths L, the depths timed round by round",
                method="djinn", value=max(djinn) / min(djinn), bound=1.3, op="<=", unit="ratio", params=params,
                check=False)
    claim.ratio("recompute_over_djinn_resume_at_L40", what="recomputing layers 0..39 against Djinn's restore at L=40",
                method="recompute", measured=_RESULTS[40]["recompute_ms"],
                reference=_RESULTS[40]["djinn_ms"], bound=100.0, op=">=", params={"L": 40},
                reference_method="djinn", check=False)
    failed = [rec["claim"] for rec in claim.records if not rec["passed"]]
    assert not failed, failed


@pytest.mark.cpu
def test_resume_latency_plumbing_on_a_tiny_config():
    """Same code paths on the CPU (no timing): restore brings the state back exactly, at every depth."""
    model = build_model("llama-tiny", dtype=torch.float32, seed=0)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    rt = BreakpointRuntime(model, slab_bytes=16 << 20)
    for layer in range(model.config.num_hidden_layers + 1):
        s = rt.open(ids, max_new_tokens=4)
        ck = s.run_to(layer)
        hidden = ck.hidden.clone()
        keys = [s.cache.layers[i].keys.clone() for i in range(layer)]
        nbytes = s.state_bytes()
        for _ in range(3):
            s.pause()
            assert rt.slab.stats.used == rt.spare_bytes and s.state_bytes() == nbytes  # one spare head buffer
            s.restore()
            assert torch.equal(ck.hidden, hidden)
            assert all(torch.equal(s.cache.layers[i].keys, k) for i, k in enumerate(keys))
        recompute_cache = SlabKVCache(s.geometry, TorchKVAllocator("cpu"))
        assert torch.equal(capture_at(model, ids, recompute_cache, layer).hidden, hidden)
        s.resume()
        s.generate(4)
        s.close()
    assert rt.slab.stats.used == 0 and rt.host_pool.stats.used == 0


@pytest.mark.cpu
def test_depth_rounds_time_every_depth_once_per_round_and_rotate_the_first():
    rounds = depth_rounds(LAYERS, 7)
    assert all(sorted(r) == sorted(LAYERS) for r in rounds)
    assert [r[0] for r in rounds] == [1, 10, 20, 30, 40, 1, 10]
    with pytest.raises(ConfigError):
        depth_rounds([], 3)
    with pytest.raises(ConfigError):
        depth_rounds(LAYERS, 0)


@pytest.mark.cpu
def test_restore_across_depths_plumbing_on_a_tiny_config():
    """The interleaved measurement on the CPU (no timing): every depth paused at once on one runtime, each timed in
    every round, and every session's state comes back exactly."""
    model = build_model("llama-tiny", dtype=torch.float32, seed=0)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    rt = BreakpointRuntime(model, slab_bytes=16 << 20)
    layers = list(range(model.config.num_hidden_layers + 1))
    sessions, hiddens = open_at_depths(rt, ids, layers)
    assert all(s.state is SessionState.PAUSED for s in sessions.values())  # as the GPU test hands them over
    timed = time_restore_across_depths(sessions, hiddens, warmup=1, repeats=3)
    assert sorted(timed) == layers
    assert all(t[k].n == 3 and t[k].clock == "host" for t in timed.values() for k in ("djinn", "djinn_host", "manual"))
    for L, s in sessions.items():  # each still paused-and-restored state equals a run that never paused
        s.pause()
        assert torch.equal(s.restore().hidden, hiddens[L])
        ref = rt.open(ids, max_new_tokens=1)
        ref.run_to(L)
        assert all(torch.equal(s.cache.layers[i].keys, ref.cache.layers[i].keys) for i in range(L))
        ref.close()
    with pytest.raises(ConfigError):
        time_restore_across_depths(sessions, {0: hiddens[0]})
    rt.close_all()
    assert rt.slab.stats.used == 0 and rt.host_pool.stats.used == 0
