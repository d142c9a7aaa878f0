"""exp3 correctness: pause + swap + resume is bitwise invisible, with and without an edit.

* CPU: every layer of SmolLM2-135M-Instruct with a real chat prompt, 64 greedy tokens.
* H100: the Llama-2-13B architecture (random weights, fp16), L in {1, 10, 20, 30, 40}, 2048-token prompt.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from djinn_core.runtime import BreakpointRuntime, plain_run
from djinn_core.memory.host_pool import HostPool
from djinn_core.runtime.kv_cache import KVGeometry, SlabKVCache, TorchKVAllocator
from djinn_core.memory.slab import Slab

NEW_TOKENS = 64
LAYERS_13B = [1, 10, 20, 30, 40]


def _session_run(rt, ids, layer, *, edit=None):
    s = rt.open(ids, max_new_tokens=NEW_TOKENS)
    ck = s.run_to(layer)
    if edit is not None:
        ck.edit(edit)
    s.pause()
    logits = s.resume()
    tokens, steps = s.generate(NEW_TOKENS, return_logits=True)
    s.close()
    return logits, tokens, steps


def _equal(got, ref) -> dict:
    return {"prompt_logits_equal": bool(torch.equal(got[0], ref[0])),
            "tokens_equal": bool(torch.equal(got[1], ref[1])),
            "step_logits_equal": bool(torch.equal(got[2], ref[2]))}


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
    rt = BreakpointRuntime(model, budget_bytes=256 << 20)
    mismatches = []
    for layer in range(n + 1):
        s = rt.open(ids, max_new_tokens=NEW_TOKENS)
        s.run_to(layer)
        s.pause()
        logits = s.resume()
        kv_equal = all(torch.equal(s.cache.layers[i].keys, ref_cache.layers[i].keys)
                       and torch.equal(s.cache.layers[i].values, ref_cache.layers[i].values) for i in range(n))
        if not (torch.equal(logits, ref_logits) and kv_equal):
            mismatches.append(layer)
        s.close()
    ref = plain_run(model, ids, NEW_TOKENS)
    token_layers = [n // 2]
    token_mismatches = [L for L in token_layers if not all(_equal(_session_run(rt, ids, L), ref).values())]
    claim.info(prompt_tokens=ids.shape[1], answer=tok.decode(ref[1][0]), mismatches=mismatches,
               token_mismatches=token_mismatches, token_layers=token_layers)
    claim.check("pause_swap_resume_bitwise_equal_at_every_layer", method="djinn",
                value=len(mismatches) + len(token_mismatches), bound=0, op="==", unit="layers",
                params={"model": "SmolLM2-135M-Instruct", "layers": n + 1, "new_tokens": NEW_TOKENS})


@pytest.mark.cpu
def test_edit_equals_a_plain_forward_hook_on_smollm2(smollm2_cpu, smollm2_chat_ids):
    model, _ = smollm2_cpu
    ids = smollm2_chat_ids
    layer = model.config.num_hidden_layers // 2
    v = 4.0 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ref = plain_run(model, ids, NEW_TOKENS, layer=layer, edit=lambda h: h + v)
    rt = BreakpointRuntime(model, budget_bytes=256 << 20)
    got = _session_run(rt, ids, layer, edit=lambda h: h + v)
    assert all(_equal(got, ref).values())
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
    same = plain_run(model, prompt_2048_ids, NEW_TOKENS, cache=SlabKVCache(geo, TorchKVAllocator(prompt_2048_ids.device)))
    dynamic = plain_run(model, prompt_2048_ids, NEW_TOKENS)
    return same, dynamic


@pytest.mark.h100
@pytest.mark.slow
@pytest.mark.parametrize("layer", LAYERS_13B, ids=lambda L: f"L={L}")
def test_pause_resume_is_bitwise_invisible_on_llama2_13b(layer, runtime_13b, reference_13b, prompt_2048_ids,
                                                         claim):
    same, dynamic = reference_13b
    got = _session_run(runtime_13b, prompt_2048_ids, layer)
    eq = _equal(got, same)
    claim.info(vs_same_cache=eq, vs_dynamic_cache=_equal(got, dynamic),
               reference_caches_agree=_equal(same, dynamic))
    claim.check("pause_swap_resume_bitwise_equal_64_tokens", method="djinn",
                value=int(all(eq.values())), bound=1, op="==", unit="bool",
                params={"model": "llama2-13b", "L": layer, "prompt_tokens": prompt_2048_ids.shape[1],
                        "new_tokens": NEW_TOKENS})


@pytest.mark.h100
@pytest.mark.slow
def test_edit_equals_a_plain_forward_hook_on_llama2_13b(llama2_13b_fp16, runtime_13b, prompt_2048_ids, claim):
    model = llama2_13b_fp16
    layer = 20
    g = torch.Generator(device=prompt_2048_ids.device).manual_seed(0)
    v = torch.randn(model.config.hidden_size, generator=g, device=prompt_2048_ids.device).half()
    geo = KVGeometry.for_model(model.config, batch=1, capacity=prompt_2048_ids.shape[1] + NEW_TOKENS,
                               dtype=torch.float16)
    ref = plain_run(model, prompt_2048_ids, NEW_TOKENS, layer=layer, edit=lambda h: h + v,
                    cache=SlabKVCache(geo, TorchKVAllocator(prompt_2048_ids.device)))
    got = _session_run(runtime_13b, prompt_2048_ids, layer, edit=lambda h: h + v)
    eq = _equal(got, ref)
    claim.check("edit_bitwise_equal_to_plain_forward_hook",
                method="djinn", value=int(all(eq.values())), bound=1, op="==", unit="bool",
                params={"model": "llama2-13b", "L": layer, "new_tokens": NEW_TOKENS})
