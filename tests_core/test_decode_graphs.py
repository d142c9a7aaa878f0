"""decode_graphs.py: which modules are graphed, that the model is untouched outside ``active()``, and (on a GPU)
that replays are bitwise equal to eager decoding and fall back to eager where they must."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers.models.llama import modeling_llama

from djinn_core.runtime import BreakpointRuntime, decode_step, plain_run
from djinn_core.runtime.decode_graphs import DecodeGraphs
from djinn_core.errors import ConfigError
from djinn_core.runtime.kv_cache import KVGeometry, SlabKVCache, TorchKVAllocator
from djinn_core.models import build_model, decoder_layers
from djinn_core.models.llama import GRAPHABLE

ARCHS = ["llama-tiny", "mistral-tiny", "qwen2-tiny"]
_ROTARY_ORIG = modeling_llama.apply_rotary_pos_emb


@pytest.mark.cpu
@pytest.mark.parametrize("arch", ARCHS)
def test_norms_and_mlp_of_every_layer_are_the_graphed_modules(arch):
    model = build_model(arch, dtype=torch.float32, seed=0)
    g = DecodeGraphs(model)
    expect = [m for layer in decoder_layers(model)
              for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp)]
    assert g.modules == expect
    assert all(type(m).__name__ in GRAPHABLE for m in g.modules)
    assert model.model.norm not in g.modules  # its output leaves the model (last_hidden_state): never graphed
    home = sys.modules[type(decoder_layers(model)[0].self_attn).__module__]
    assert g.functions == [(home, "apply_rotary_pos_emb")]


@pytest.mark.cpu
def test_off_cuda_active_is_a_no_op_and_the_model_is_untouched(llama_tiny_fp32):
    model = llama_tiny_fp32
    g = DecodeGraphs(model)
    assert not g.enabled
    orig = [getattr(home, name) for home, name in g.functions]
    with g.active():
        assert all("forward" not in m.__dict__ for m in g.modules)
        assert [getattr(home, name) for home, name in g.functions] == orig
    assert g.graph_count == 0
    rt = BreakpointRuntime(model, slab_bytes=8 << 20)
    assert rt.graphs is None  # a CPU runtime does not use them


@pytest.mark.cpu
def test_bad_max_tokens_is_a_config_error(llama_tiny_fp32):
    with pytest.raises(ConfigError):
        DecodeGraphs(llama_tiny_fp32, max_tokens=0)


@pytest.mark.cpu
def test_for_model_shares_one_instance_per_model(llama_tiny_fp32):
    assert DecodeGraphs.for_model(llama_tiny_fp32) is DecodeGraphs.for_model(llama_tiny_fp32)


# ------------------------------------------------------------------------------------------------------------ GPU

def _decode(model, ids, steps, graphs=None):
    """Prefill ``ids`` into a fresh cache, then ``steps`` greedy decode steps; returns the stacked step logits."""
    geo = KVGeometry.for_model(model.config, batch=ids.shape[0], capacity=ids.shape[1] + steps,
                               dtype=next(model.parameters()).dtype)
    cache = SlabKVCache(geo, TorchKVAllocator(ids.device))
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    out = []
    ctx = graphs.active() if graphs is not None else torch.no_grad()
    with ctx:
        for _ in range(steps):
            out.append(logits)
            logits = decode_step(model, cache, logits.argmax(-1, keepdim=True))
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def gpu_tiny(cuda_device):
    model = build_model("llama-tiny", device=cuda_device, dtype=torch.float16, seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 37), device=cuda_device,
                        generator=torch.Generator(device=cuda_device).manual_seed(2))
    return model, ids


@pytest.mark.gpu
def test_gpu_replayed_decode_is_bitwise_equal_to_eager_and_leaves_the_model_as_it_was(gpu_tiny):
    model, ids = gpu_tiny
    g = DecodeGraphs(model)
    eager = _decode(model, ids, 12)
    graphed = _decode(model, ids, 12, g)
    assert torch.equal(graphed, eager)
    layers = model.config.num_hidden_layers
    assert len(g.modules) == 3 * layers and len(g.functions) == 1
    assert g.captures == len(g.modules) + 1  # one rotary graph serves every layer
    assert g.replays == 12 * (len(g.modules) + layers)  # every decode step, the capturing one included
    assert all("forward" not in m.__dict__ for m in g.modules)
    assert getattr(*g.functions[0]) is modeling_llama.apply_rotary_pos_emb is _ROTARY_ORIG
    again = _decode(model, ids, 12, g)  # the captured graphs serve a new cache (other KV addresses) as well
    assert torch.equal(again, eager) and g.captures == len(g.modules) + 1


@pytest.mark.gpu
def test_gpu_hooks_prefill_and_moved_weights_take_the_eager_path(gpu_tiny):
    model, ids = gpu_tiny
    g = DecodeGraphs(model)
    eager = _decode(model, ids, 4)
    mlp = g.modules[2]
    old = mlp.down_proj.weight
    assert torch.equal(_decode(model, ids, 4, g), eager)
    mlp.down_proj.weight = torch.nn.Parameter(old.detach().clone(), requires_grad=False)  # same values, moved
    try:
        assert torch.equal(_decode(model, ids, 4, g), eager)
        assert g.captures == len(g.modules) + 2  # and the rotary graph; then the MLP again against the new weight
    finally:
        mlp.down_proj.weight = old
    g = DecodeGraphs(model)
    seen = []
    h = g.modules[0].register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        assert torch.equal(_decode(model, ids, 4, g), eager)
    finally:
        h.remove()
    assert g.graph_count == len(g.modules)  # all but the hooked module (eager: its hook saw every output), + rotary
    assert len(seen) == 1 + 4  # the prefill, then 4 decode steps
    with g.active(), torch.no_grad():  # a prompt of many tokens never replays
        before = g.replays
        model(ids, use_cache=False)
        assert g.replays == before


@pytest.mark.gpu
def test_gpu_sessions_generate_through_graphs_bitwise_equal_to_plain_run(gpu_tiny, cuda_device):
    model, ids = gpu_tiny
    ref = plain_run(model, ids, 8)
    rt = BreakpointRuntime(model, slab_bytes=64 << 20)
    try:
        s = rt.open(ids, max_new_tokens=8)
        s.run_to(2)
        s.pause()
        logits = s.resume()
        tokens, steps = s.generate(8, return_logits=True)
        assert torch.equal(logits, ref[0]) and torch.equal(tokens, ref[1]) and torch.equal(steps, ref[2])
        assert rt.graphs is not None and rt.graphs.replays > 0
        tokens.add_(0)  # what generate returns is an ordinary tensor, editable in place
    finally:
        rt.close_all()
