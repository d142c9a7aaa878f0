"""decode_graphs.py: which modules are graphed, that the model is untouched outside ``active()``, and (on a GPU)
that replays are bitwise equal to eager decoding and fall back to eager where they must."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from transformers.models.llama import modeling_llama

from djinn_core.runtime import BreakpointRuntime, decode_step, plain_run
from djinn_core.runtime.decode_graphs import DecodeGraphs
from djinn_core.errors import ConfigError
from djinn_core.runtime.kv_cache import KVGeometry, SlabKVCache, TorchKVAllocator
from djinn_core.models import build_model, decoder_layers
from djinn_core.models.architectures import architecture_config
from djinn_core.models.llama import GRAPHABLE, LlamaLayerSplit

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
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_of_the_llama_family_is_split_around_its_attention(arch):
    model = build_model(arch, dtype=torch.float32, seed=0)
    g = DecodeGraphs(model)
    layers = list(decoder_layers(model))
    assert [layer for layer, _ in g.splits] == layers
    assert all(isinstance(sp, LlamaLayerSplit) for _, sp in g.splits)
    assert DecodeGraphs(model, split_layers=False).splits == []


def _split_forward(split, rotary, calls):
    def forward(*args, **kwargs):
        h, cos, sin, ctx = split.bind(args, kwargs)
        calls.append(1)
        return split.post(split.attend(*split.pre(h, cos, sin, rotary), ctx), h)
    return forward


@pytest.mark.cpu
@pytest.mark.parametrize("arch,batch,window", [("llama-tiny", 1, None), ("llama-tiny", 3, None),
                                               ("mistral-tiny", 2, None), ("mistral-tiny", 2, 8),
                                               ("qwen2-tiny", 2, None)])
def test_the_split_parts_composed_are_bitwise_the_layer_forward(arch, batch, window):
    """The parts launch the layer's own operators in its order: decode steps through them equal eager ones bitwise
    (logits and the KV written), on the CPU's kernels; with a sliding window shorter than the sequence too."""
    cfg = architecture_config(arch)
    if window is not None:
        cfg.sliding_window = window
    model = build_model(cfg, dtype=torch.float32, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(1))
    g = DecodeGraphs(model)
    geo = KVGeometry.for_model(model.config, batch=batch, capacity=9 + 6, dtype=torch.float32)
    caches = [SlabKVCache(geo, TorchKVAllocator(ids.device)) for _ in range(2)]
    with torch.no_grad():
        first = [model(ids, past_key_values=c, use_cache=True).logits[:, -1] for c in caches]
    assert torch.equal(*first)
    calls = []
    tok = first[0].argmax(-1, keepdim=True)
    for _ in range(5):
        eager = decode_step(model, caches[0], tok)
        rotary = getattr(*g.functions[0])
        for layer, split in g.splits:
            layer.forward = _split_forward(split, rotary, calls)
        try:
            parts = decode_step(model, caches[1], tok)
        finally:
            for layer, _ in g.splits:
                del layer.forward
        assert torch.equal(parts, eager)
        tok = eager.argmax(-1, keepdim=True)
    assert len(calls) == 5 * model.config.num_hidden_layers
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert a.length == b.length == 9 + 5
        n = a.length
        assert torch.equal(a.block.view()[:, :, :, :n], b.block.view()[:, :, :, :n])


@pytest.mark.cpu
def test_a_split_binds_only_plain_decode_calls(llama_tiny_fp32):
    _, split = DecodeGraphs(llama_tiny_fp32).splits[0]
    h, cos, sin, cache = torch.zeros(1, 1, 8), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), object()
    bound = split.bind((h,), {"position_embeddings": (cos, sin), "past_key_values": cache, "attention_mask": None,
                              "position_ids": None, "use_cache": True, "cache_position": 7})
    assert bound[:3] == (h, cos, sin) and split.cache(bound[3]) is cache
    assert bound[3][2] == {"position_ids": None, "use_cache": True, "cache_position": 7}  # what the attention gets
    assert split.bind((h,), {"past_key_values": cache}) is None  # no position embeddings
    assert split.bind((h,), {"position_embeddings": (cos, sin)}) is None  # no cache
    assert split.bind((h, None), {"position_embeddings": (cos, sin), "past_key_values": cache}) is None
    assert split.bind((), {"hidden_states": h, "position_embeddings": (cos, sin),
                           "past_key_values": cache})[0] is h
    w = split.weights()
    assert len(w) == 9 and len(set(w)) == 9  # two norms, q/k/v/o, gate/up/down: each read where it lies


@pytest.mark.cpu
def test_split_layers_capture_into_one_pool_only_in_layer_order(llama_tiny_fp32):
    """Graphs sharing a pool may reuse each other's freed capture memory, which is safe only when they replay in
    capture order: a capture out of layer order starts a new generation (a new pool, the old graphs dropped)."""
    g = DecodeGraphs(llama_tiny_fp32)
    shape = ((1, 1, 128), torch.float16)
    first = g._generation(shape, 0)
    assert g._generation(shape, 1) is first and g._generation(shape, 4) is first and first.last == 4
    first.keys.append("k")
    g._graphs["k"] = SimpleNamespace(static_out=None)
    second = g._generation(shape, 2)  # behind layer 4: out of order
    assert second is not first and second.pool is not first.pool and second.last == 2
    assert "k" not in g._graphs  # the old generation's graphs are gone
    other = g._generation(((2, 1, 128), torch.float16), 0)  # another input shape: a generation of its own
    assert other is not second and g._generation(shape, 3) is second


@pytest.mark.cpu
def test_off_cuda_active_is_a_no_op_and_the_model_is_untouched(llama_tiny_fp32):
    model = llama_tiny_fp32
    g = DecodeGraphs(model)
    assert not g.enabled
    orig = [getattr(home, name) for home, name in g.functions]
    with g.active():
        assert all("forward" not in m.__dict__ for m in g.modules)
        assert all("forward" not in layer.__dict__ for layer, _ in g.splits)
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
@pytest.mark.parametrize("arch,split", [("llama-tiny", True), ("mistral-tiny", True), ("qwen2-tiny", True),
                                        ("llama-tiny", False)])
def test_gpu_replayed_decode_is_bitwise_equal_to_eager_and_leaves_the_model_as_it_was(arch, split, cuda_device):
    model = build_model(arch, device=cuda_device, dtype=torch.float16, seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 37), device=cuda_device,
                        generator=torch.Generator(device=cuda_device).manual_seed(2))
    g = DecodeGraphs(model, split_layers=split)
    eager = _decode(model, ids, 12)
    graphed = _decode(model, ids, 12, g)
    assert torch.equal(graphed, eager)
    layers = model.config.num_hidden_layers
    assert len(g.modules) == 3 * layers and len(g.functions) == 1
    if g.splits:  # every layer: a graph before its attention and one after
        assert len(g.splits) == layers
        assert g.captures == 2 * layers
        assert g.replays == 12 * 2 * layers  # every decode step, the capturing one included
    else:
        assert g.captures == len(g.modules) + 1  # one rotary graph serves every layer
        assert g.replays == 12 * (len(g.modules) + layers)
    assert all("forward" not in m.__dict__ for m in g.modules)
    assert all("forward" not in layer.__dict__ for layer, _ in g.splits)
    home, name = g.functions[0]
    assert getattr(home, name) is getattr(sys.modules[type(decoder_layers(model)[0].self_attn).__module__], name)
    captures = g.captures
    again = _decode(model, ids, 12, g)  # the captured graphs serve a new cache (other KV addresses) as well
    assert torch.equal(again, eager) and g.captures == captures


@pytest.mark.gpu
def test_gpu_hooks_prefill_and_moved_weights_take_the_eager_path(gpu_tiny):
    model, ids = gpu_tiny
    g = DecodeGraphs(model)
    layers = model.config.num_hidden_layers
    eager = _decode(model, ids, 4)
    mlp = g.modules[2]
    old = mlp.down_proj.weight
    assert torch.equal(_decode(model, ids, 4, g), eager)
    assert g.captures == 2 * layers
    mlp.down_proj.weight = torch.nn.Parameter(old.detach().clone(), requires_grad=False)  # same values, moved
    try:
        assert torch.equal(_decode(model, ids, 4, g), eager)
        # the first layer's graphs against the new weight, captured out of layer order: every layer's afresh
        assert g.captures == 4 * layers
    finally:
        mlp.down_proj.weight = old
    g = DecodeGraphs(model)
    seen = []
    h = g.modules[0].register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        assert torch.equal(_decode(model, ids, 4, g), eager)
    finally:
        h.remove()
    # the hooked norm's layer runs its own forward (its other norm and MLP as module graphs, the rotary graph; the
    # hooked norm eager: its hook saw every output); every other layer its two graphs
    assert g.graph_count == 2 * (layers - 1) + 2 + 1
    assert len(seen) == 1 + 4  # the prefill, then 4 decode steps
    # the hook gone, the first layer's graphs would come after the others': all are captured again, in layer order
    assert torch.equal(_decode(model, ids, 4, g), eager)
    assert g.graph_count == 2 * layers + 2 + 1
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
