"""exp3 correctness: pause + swap + resume is bitwise invisible, with and without an edit.

* CPU: every layer of SmolLM2-135M-Instruct with a real chat prompt, 64 greedy tokens.
* H100: the Llama-2-13B architecture (random weights, fp16), L in {1, 10, 20, 30, 40}, 2048-token prompt.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from djinn_core.bench import preconditions as pre
from djinn_core.bench.experiments.token_accuracy import (bitwise_equal, layers_unequal_to_plain_forward,
                                                        session_run)
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.slab import Slab
from djinn_core.runtime import BreakpointRuntime, plain_run
from djinn_core.runtime.kv_cache import KVGeometry, SlabKVCache, TorchKVAllocator

NEW_TOKENS = 64
LAYERS_13B = [1, 10, 20, 30, 40]


@pytest.mark.cpu
@pytest.mark.slow
def test_pause_resume_is_bitwise_invisible_at_every_layer_of_smollm2(smollm2_cpu, smollm2_chat_ids, claim):
    """Every layer: prompt logits and the whole KV state after resume equal the uninterrupted run's, bit for bit.

    Equal logits and equal KV make every later greedy step the same computation on the same bytes; the 64 tokens
    themselves are compared at the middle breakpoint (decoding is the CPU's expensive part).
    """
    model, tok = smollm2_cpu
    ids = smollm2_chat_ids
    n = model.config.num_hidden_layers
    ref_cache = DynamicCache(config=model.config)
    ref_logits = model(ids, past_key_values=ref_cache, use_cache=True).logits
    rt = BreakpointRuntime(model, slab_bytes=256 << 20)
    mismatches = layers_unequal_to_plain_forward(model, rt, ids, NEW_TOKENS, ref_logits, ref_cache)
    pre.bytes_moved(claim, nbytes=rt.swap.stats.bytes_out, what="bytes the pauses moved to the host pool",
                    params={"model": "SmolLM2-135M-Instruct", "layers": n + 1})
    ref = plain_run(model, ids, NEW_TOKENS)
    token_layers = [n // 2]
    token_mismatches = [L for L in token_layers
                        if not all(bitwise_equal(session_run(rt, ids, L, NEW_TOKENS), ref).values())]
    claim.info(prompt_tokens=ids.shape[1], answer=tok.decode(ref[1][0]), mismatches=mismatches,
               token_mismatches=token_mismatches, token_layers=token_layers)
    claim.check("pause_swap_resume_bitwise_equal_at_every_layer",
                what="breakpoint depths where logits, KV or 64 greedy tokens after pause, swap and resume "
                     "differ from the uninterrupted run",
                method="djinn",
                value=len(mismatches) + len(token_mismatches), bound=0, op="==", unit="layers",
                params={"model": "SmolLM2-135M-Instruct", "layers": n + 1, "new_tokens": NEW_TOKENS})


@pytest.mark.cpu
def test_edit_equals_a_plain_forward_hook_on_smollm2(smollm2_cpu, smollm2_chat_ids):
    model, _ = smollm2_cpu
    ids = smollm2_chat_ids
    layer = model.config.num_hidden_layers // 2
    v = 4.0 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ref = plain_run(model, ids, NEW_TOKENS, layer=layer, edit=lambda h: h + v)
    rt = BreakpointRuntime(model, slab_bytes=256 << 20)
    got = session_run(rt, ids, layer, NEW_TOKENS, edit=lambda h: h + v)
    assert all(bitwise_equal(got, ref).values())
    assert not torch.equal(ref[0], model(ids).logits), "the steering vector changed nothing"


# ---------------------------------------------------------------------------------------------------------------
# H100: Llama-2-13B architecture


@pytest.fixture(scope="module")
def runtime_13b(llama2_13b_fp16, prompt_2048_ids):
    """A runtime with an 8 GiB slab and a 4 GiB pinned host pool (one 2048-token session is ~1.7 GiB at L=40)."""
    rt = BreakpointRuntime(llama2_13b_fp16, slab=Slab(8 << 30, prompt_2048_ids.device),
                           host_pool=HostPool(4 << 30))
    yield rt
    rt.close_all()


@pytest.fixture(scope="module")
def reference_13b(llama2_13b_fp16, prompt_2048_ids):
    """Uninterrupted runs: with the same cache class (the claim) and with HF's DynamicCache (recorded)."""
    model = llama2_13b_fp16
    geo = KVGeometry.for_model(model.config, batch=1, capacity=prompt_2048_ids.shape[1] + NEW_TOKENS,
                               dtype=torch.float16)
    same = plain_run(model, prompt_2048_ids, NEW_TOKENS,
                     cache=SlabKVCache(geo, TorchKVAllocator(prompt_2048_ids.device)))
    dynamic = plain_run(model, prompt_2048_ids, NEW_TOKENS)
    return same, dynamic


@pytest.mark.h100
@pytest.mark.slow
@pytest.mark.parametrize("layer", LAYERS_13B, ids=lambda L: f"L={L}")
def test_pause_resume_is_bitwise_invisible_on_llama2_13b(layer, runtime_13b, reference_13b, prompt_2048_ids,
                                                         claim):
    same, dynamic = reference_13b
    out_before = runtime_13b.swap.stats.bytes_out
    got = session_run(runtime_13b, prompt_2048_ids, layer, NEW_TOKENS)
    pre.bytes_moved(claim, nbytes=runtime_13b.swap.stats.bytes_out - out_before,
                    what="bytes the pause moved to the host pool", params={"L": layer})
    eq = bitwise_equal(got, same)
    claim.info(vs_same_cache=eq, vs_dynamic_cache=bitwise_equal(got, dynamic),
               reference_caches_agree=bitwise_equal(same, dynamic))
    claim.check("pause_swap_resume_bitwise_equal_64_tokens",
                what="pause, swap and resume at L, then 64 greedy tokens, bitwise equal to the uninterrupted "
                     "run (1: equal)",
                method="djinn",
                value=int(all(eq.values())), bound=1, op="==", unit="bool",
                params={"model": "llama2-13b", "L": layer, "prompt_tokens": prompt_2048_ids.shape[1],
                        "new_tokens": NEW_TOKENS})


@pytest.mark.h100
@pytest.mark.slow
def test_edit_equals_a_plain_forward_hook_on_llama2_13b(llama2_13b_fp16, runtime_13b, reference_13b, prompt_2048_ids,
                                                        claim):
    model = llama2_13b_fp16
    layer = 20
    g = torch.Generator(device=prompt_2048_ids.device).manual_seed(0)
    v = torch.randn(model.config.hidden_size, generator=g, device=prompt_2048_ids.device).half()
    geo = KVGeometry.for_model(model.config, batch=1, capacity=prompt_2048_ids.shape[1] + NEW_TOKENS,
                               dtype=torch.float16)
    ref = plain_run(model, prompt_2048_ids, NEW_TOKENS, layer=layer, edit=lambda h: h + v,
                    cache=SlabKVCache(geo, TorchKVAllocator(prompt_2048_ids.device)))
    got = session_run(runtime_13b, prompt_2048_ids, layer, NEW_TOKENS, edit=lambda h: h + v)
    eq = bitwise_equal(got, ref)
    claim.precondition("edit_changed_the_run", value=int(not torch.equal(ref[0], reference_13b[0][0])), op="==",
                       bound=1, unit="bool", params={"L": layer},
                       what="the edit changed the prompt logits (an edit that changes nothing proves nothing)")
    claim.check("edit_bitwise_equal_to_plain_forward_hook",
                what="an edit at the checkpoint, bitwise equal to the same edit by a forward hook (1: equal)",
                method="djinn", value=int(all(eq.values())), bound=1, op="==", unit="bool",
                params={"model": "llama2-13b", "L": layer, "new_tokens": NEW_TOKENS})
