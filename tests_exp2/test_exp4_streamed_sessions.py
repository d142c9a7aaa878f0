"""exp4 (issue 21): breakpoint sessions over the 48-layer Llama-2-70B architecture streamed under a 24 GiB VRAM
budget. An edit at layer L costs only what follows it -- edit -> logits within 1.1x of the larger of moving layers
L.. at the same-run pinned ceiling and computing them -- where recomputing from 0 or an nnsight-style whole forward
streams every layer; and a streamed session paused, swapped, forked and resumed at L is bitwise the resident model.
Batched decode of sessions through one weight stream is ``test_exp4_batched_decode.py`` (a report of its own, so
each report's pytest run fits one call on the lent GPU).

h100 tests are paper scale (run: ``pytest -m h100 tests_exp2/test_exp4_streamed_sessions.py``); the cpu tests run
the same helpers on a tiny model (behaviour only, never speed).
"""

from __future__ import annotations

import pytest
import torch

from djinn_core.bench.experiments.exp2_streaming import SEED, free_device_memory, prompt, slot_ceiling
from djinn_core.bench.experiments.exp4_streamed_sessions import (ARCH, BUDGET_BYTES, EDIT_BOUND, EDIT_LAYERS, LAYERS,
                                                                 NEW_TOKENS, PROMPT_TOKENS, RING_SLOTS,
                                                                 batched_divergence, measure_edit_costs,
                                                                 resident_reference, session_run, steering_vector,
                                                                 streamed_runtime, unequal)
from djinn_core.memory.vram_budget import allocator_fraction
from djinn_core.models import build_model

GiB = 1 << 30
BITWISE_PROMPT_TOKENS = 64
DIVERGENCE_PROMPTS = (64, 48, 32, 16)  # batched-vs-alone record: four sessions at different lengths
DIVERGENCE_STEPS = 16


@pytest.mark.h100
@pytest.mark.slow
@pytest.mark.parametrize("layer", EDIT_LAYERS, ids=[f"L={L}" for L in EDIT_LAYERS])
def test_an_edit_at_L_costs_only_the_layers_after_it(llama70b_host_pack, cuda_device, copy_ceilings, claim, layer):
    pack = llama70b_host_pack

    def run() -> dict:
        with streamed_runtime(pack, cuda_device, record_timeline=True) as rt:
            ids = prompt(PROMPT_TOKENS, rt.model.config.vocab_size, device=cuda_device)
            v = steering_vector(rt.model.config.hidden_size, cuda_device, rt.dtype)
            costs = measure_edit_costs(rt, ids, layer, lambda h: h + v, warmup=1, repeats=5,
                                       ceiling=slot_ceiling(rt.streamed, copy_ceilings))
            return {"costs": costs, "stats": rt.stats()}

    res = claim.measure(run)
    c = res["costs"]
    n = res["stats"]["streaming"]["layers"]
    params = {"layer": layer, "layers": n, "tokens": PROMPT_TOKENS, "budget_GiB": BUDGET_BYTES / GiB,
              "slots": res["stats"]["split"]["slots"], "distinct_host_layers": pack.num_sets}
    bound_ms = max(c.transfer_ms, c.compute_ms)
    claim.info(costs=c.to_dict(), runtime=res["stats"], transfer_ms=c.transfer_ms, bound_ms=bound_ms)
    claim.precondition("bytes_streamed_by_an_edit", value=c.streamed_bytes, op=">", bound=0, unit="bytes",
                       what="bytes one edit -> logits streamed", params=params)
    claim.precondition("edit_streams_exactly_layers_L_to_n", value=max(abs(b - (n - layer) * c.layer_bytes)
                                                                        for b in c.resume_bytes),
                       op="<=", bound=0, unit="bytes", what="|bytes streamed - bytes of layers L..n-1|, every run",
                       params=params)
    claim.ratio("edit_to_logits_vs_max_transfer_compute", method="djinn streamed session: edit, resume (full logits)",
                measured=c.djinn, reference=bound_ms, bound=EDIT_BOUND, op="<=", params=params,
                reference_method="max(bytes of layers L.. / same-run pinned H2D ceiling, their compute by CUDA events)")
    claim.ratio("edit_vs_recompute_from_0", method="djinn streamed session: edit, resume", measured=c.djinn,
                reference=c.recompute, bound=1.0, op="<=", params=params, check=False,
                reference_method="fresh session on the same streamed model: run_to(L), edit, resume")
    claim.ratio("edit_vs_nnsight_style_whole_forward", method="djinn streamed session: edit, resume",
                measured=c.djinn, reference=c.whole_forward, bound=1.0, op="<=", params=params, check=False,
                reference_method="one forward with the edit as a pre-hook on layer L, same streamed model")


@pytest.mark.h100
@pytest.mark.slow
def test_streamed_sessions_are_bitwise_the_resident_model(llama70b_host_pack, cuda_device, claim):
    """Paused at L, swapped to the host and resumed (L=1: no edit; L=24: edited, through a fork; L=47: edited),
    then 64 greedy tokens: the prompt logits, every step's logits and the tokens equal the resident model's with the
    same edit as a plain forward pre-hook. The layer count is what the host pack holds distinct (48 on the H200).
    Recorded beside it, without a claim: where batched decode of four sessions at different lengths first departs
    from each decoded alone, on the resident model (``batched_vs_alone`` in the JSON)."""
    pack = llama70b_host_pack
    n = min(LAYERS, pack.num_sets)
    cases = [(L, edit, fork) for L, edit, fork in ((1, False, False), (24, True, True), (47, True, False)) if L < n]

    def run() -> dict:
        with streamed_runtime(pack, cuda_device, num_layers=n, session_tokens=BITWISE_PROMPT_TOKENS + NEW_TOKENS) as rt:
            ids = prompt(BITWISE_PROMPT_TOKENS, rt.model.config.vocab_size, device=cuda_device)
            v = steering_vector(rt.model.config.hidden_size, cuda_device, rt.dtype)
            got = [session_run(rt, ids, L, (lambda h: h + v) if e else None, NEW_TOKENS, fork=f) for L, e, f in cases]
            stats = rt.stats()
        free_device_memory()
        with allocator_fraction(1.0, cuda_device):  # the exact reference (77.5 GiB) is not held to the budget
            resident = build_model(ARCH, num_layers=n, device=cuda_device, seed=SEED)
            want = [resident_reference(resident, ids, L, (lambda h: h + v) if e else None, NEW_TOKENS)
                    for L, e, _ in cases]
            # recorded, no claim: where batched decode departs from each session decoded alone (GEMM shapes change)
            alone = [prompt(n, resident.config.vocab_size, seed=2 + i, device=cuda_device)
                     for i, n in enumerate(DIVERGENCE_PROMPTS)]
            divergence = batched_divergence(resident, alone, DIVERGENCE_STEPS)
            del resident
            free_device_memory()
        return {"diff": {f"L={L}": unequal(g, w) for (L, _, _), g, w in zip(cases, got, want)},
                "tokens": [g[1].tolist() for g in got], "stats": stats, "batched_vs_alone": divergence}

    res = claim.measure(run)
    params = {"layers": n, "cases": [list(c) for c in cases], "prompt_tokens": BITWISE_PROMPT_TOKENS,
              "new_tokens": NEW_TOKENS, "slots": RING_SLOTS, "budget_GiB": BUDGET_BYTES / GiB}
    claim.info(**res)
    claim.check("unequal_logits_and_tokens_vs_resident", method="torch bit patterns: prompt and step logits, tokens",
                value=sum(sum(d.values()) for d in res["diff"].values()), bound=0, op="<=", unit="elements",
                params=params)


# ------------------------------------------------------------------------------------------- CPU plumbing versions
@pytest.mark.cpu
def test_edit_cost_plumbing_cpu(tiny_runtime):
    """The edit-cost path at tiny scale (5 layers over 2 slots): every djinn edit -> logits streams exactly layers
    L..4, the three methods each ran, and the compute of layers L.. comes from the per-layer marks."""
    with tiny_runtime(record_timeline=True) as rt:
        ids = prompt(16, 512)
        v = steering_vector(128, "cpu", torch.float32)
        for layer in (1, 4):
            c = measure_edit_costs(rt, ids, layer, lambda h: h + v, warmup=1, repeats=2)
            assert c.resume_bytes == [(5 - layer) * c.layer_bytes] * 3
            assert c.djinn.n == c.recompute.n == c.whole_forward.n == 2
            assert c.compute_ms >= 0 and c.ceilings == []
        assert rt.slab.stats.used == 0 and not rt.sessions


@pytest.mark.cpu
def test_bitwise_plumbing_cpu(tiny_runtime):
    resident = build_model("llama-tiny", num_layers=5, dtype=torch.float32, seed=SEED)
    ids = prompt(16, 512)
    v = steering_vector(128, "cpu", torch.float32)
    with tiny_runtime() as rt:
        for layer, fork in ((1, False), (3, True)):
            got = session_run(rt, ids, layer, lambda h: h + v, 6, fork=fork)
            assert unequal(got, resident_reference(resident, ids, layer, lambda h: h + v, 6)) == {
                "prompt_logits": 0, "tokens": 0, "step_logits": 0}
