"""Behaviour of djinn_core.streaming on the CPU: a tiny Llama whose ring is smaller than the model streams layer weights
through the same slot rotation, chunking and parameter binding as on a GPU, and gives the resident model's logits and
greedy tokens bit for bit. Speed is never checked here."""

from __future__ import annotations

import math

import pytest
import torch

from djinn_core import streaming
from djinn_core.errors import BudgetTooSmall, ConfigError, InsufficientHostMemory, StreamingBudgetTooSmall
from djinn_core.memory import host_ram
from djinn_core.models import build_model, decoder_layers, init_parameters_
from djinn_core.streaming import (LayerLayout, StreamedModel, StreamingPolicy, build_streamed_model,
                                  pack_layer_weights, place_resident_, plan_budget)
from djinn_core.bench.experiments.reference import greedy_reference

pytestmark = pytest.mark.cpu

DTYPE = torch.float32
SEED = 0
KiB = 1 << 10


def _layout(num_layers: int = 6) -> LayerLayout:
    return LayerLayout.of(decoder_layers(build_model("llama-tiny", dtype=DTYPE, num_layers=num_layers,
                                                     materialize=False))[0])


LAYER = _layout().stride  # about 580 KiB


def _prompt(n: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (1, n), generator=g)


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, steps: int = 6) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    return greedy_reference(model, ids, steps)


def _streamed(num_layers: int, slots: int, chunk: int, depth: int | None = None, **kw) -> StreamedModel:
    policy = StreamingPolicy(chunk_bytes=chunk, ring_bytes=slots * LAYER, prefetch_depth=depth)
    return build_streamed_model("llama-tiny", budget_bytes=1 << 30, device="cpu", dtype=DTYPE, seed=SEED,
                                num_layers=num_layers, policy=policy, progress=False, **kw)


@pytest.fixture(scope="module")
def resident7():
    return build_model("llama-tiny", device="cpu", dtype=DTYPE, seed=SEED, num_layers=7)


# ----------------------------------------------------------------------------------------------------------- policy
@pytest.mark.parametrize("kw", [dict(chunk_bytes=0, ring_bytes=1 << 20), dict(chunk_bytes=-1, ring_bytes=1 << 20),
                                dict(chunk_bytes=True, ring_bytes=1 << 20), dict(chunk_bytes=1.5, ring_bytes=1 << 20),
                                dict(chunk_bytes=1 << 20, ring_bytes=0),
                                dict(chunk_bytes=1 << 20, ring_bytes=1 << 20, prefetch_depth=-1),
                                dict(chunk_bytes=1 << 20, ring_bytes=1 << 20, prefetch_depth=1.0)])
def test_policy_rejects_bad_values(kw):
    with pytest.raises(ConfigError):
        StreamingPolicy(**kw)


def test_policy_rejects_ring_smaller_than_a_chunk():
    with pytest.raises(ConfigError, match="smaller than one chunk"):
        StreamingPolicy(chunk_bytes=64 << 20, ring_bytes=16 << 20)


def test_policy_is_frozen_and_counts_slots():
    p = StreamingPolicy(chunk_bytes=64 * KiB, ring_bytes=3 * LAYER + 100)
    with pytest.raises(AttributeError):
        p.chunk_bytes = 1  # type: ignore[misc]
    assert p.slots(LAYER) == 3
    assert p.depth(3) == 2
    with pytest.raises(ConfigError, match="cannot hold one layer"):
        StreamingPolicy(chunk_bytes=64 * KiB, ring_bytes=LAYER - 1).slots(LAYER)
    with pytest.raises(ConfigError, match="needs 4 ring slots"):
        StreamingPolicy(chunk_bytes=64 * KiB, ring_bytes=3 * LAYER, prefetch_depth=3).depth(3)


def test_layout_is_aligned_and_chunks_cover_the_layer():
    lay = _layout()
    offsets = [e.offset for e in lay.entries]
    assert offsets == sorted(offsets) and all(o % streaming.PARAM_ALIGNMENT == 0 for o in offsets)
    assert lay.stride % streaming.LAYER_ALIGNMENT == 0 and lay.stride >= lay.used_bytes >= lay.param_bytes
    for chunk in (4 * KiB, 100_000, lay.used_bytes, 10 * lay.used_bytes):
        ch = lay.chunks(chunk)
        assert ch[0][0] == 0 and ch[-1][1] == lay.used_bytes
        assert all(a == z for (_, a), (z, _) in zip(ch, ch[1:]))
        assert all(0 < z - a <= chunk for a, z in ch)
        assert len(ch) == math.ceil(lay.used_bytes / chunk)


# ----------------------------------------------------------------------------------------------- equality with resident
@pytest.mark.parametrize("num_layers,slots,chunk,depth", [
    (7, 1, 64 * KiB, None),  # one slot: no overlap, still correct
    (7, 2, 4 * KiB, None),  # 7 layers over 2 slots: does not divide
    (7, 3, 100_000, None),  # 7 over 3, chunks not aligned to parameters
    (7, 4, 2 << 20, None),  # chunk larger than a layer (not the ring): one copy per layer
    (7, 4, 64 * KiB, 1),  # shallower prefetch than the ring allows
    (6, 4, 16 * KiB, None),  # 6 over 4
])
def test_streamed_logits_and_tokens_equal_resident(resident7, num_layers, slots, chunk, depth):
    resident = resident7 if num_layers == 7 else build_model("llama-tiny", dtype=DTYPE, seed=SEED,
                                                             num_layers=num_layers)
    ids = _prompt()
    want = _greedy(resident, ids)
    with _streamed(num_layers, slots, chunk, depth) as sm:
        got = _greedy(sm, ids)
        assert sm.slots == slots and sm.depth == (slots - 1 if depth is None else depth)
        passes = 1 + len(got[2])
        assert sm.bytes_streamed == passes * num_layers * sm.layout.used_bytes
        assert sm.passes == passes
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert got[2] == want[2]


def test_forward_under_inference_mode_and_batch(resident7):
    ids = torch.cat([_prompt(16, 1), _prompt(16, 2)])
    with torch.inference_mode():
        want = resident7(ids).logits
    with _streamed(7, 3, 64 * KiB) as sm, torch.inference_mode():
        got = sm(ids).logits
    assert torch.equal(got, want)


def test_host_sets_are_reused_by_deeper_layers():
    """6 layers streamed from 4 host weight sets: layer i uses set i % 4, like a resident model with those copies."""
    resident = build_model("llama-tiny", dtype=DTYPE, seed=SEED, num_layers=6)
    layers = decoder_layers(resident)
    with torch.no_grad():
        for i in (4, 5):
            for p, q in zip(layers[i].parameters(), layers[i % 4].parameters()):
                p.copy_(q)
    ids = _prompt()
    want = _greedy(resident, ids, steps=3)
    with _streamed(6, 3, 64 * KiB, host_sets=4) as sm:
        assert sm.layer_sets == (0, 1, 2, 3, 0, 1) and sm.pack.num_sets == 4
        got = _greedy(sm, ids, steps=3)
    assert torch.equal(got[0], want[0]) and got[2] == want[2]


def test_wrapping_an_existing_model_and_removing_restores_it_exactly():
    model = build_model("llama-tiny", dtype=DTYPE, seed=3, num_layers=5)
    ids = _prompt()
    with torch.no_grad():
        want = model(ids).logits
    layers = decoder_layers(model)
    before = [[(n, p) for n, p in layer.named_parameters()] for layer in layers]
    copies = [[p.detach().clone() for _, p in named] for named in before]
    pack = pack_layer_weights(model, device="cpu", progress=False)  # from the model's own weights
    sm = StreamedModel(model, pack, StreamingPolicy(chunk_bytes=32 * KiB, ring_bytes=2 * LAYER), device="cpu")
    with torch.no_grad():
        assert torch.equal(sm(ids).logits, want)
    assert sm.remove() is model
    sm.remove()  # idempotent
    for layer, named, saved in zip(layers, before, copies):
        assert not layer._forward_pre_hooks and not layer._forward_hooks
        now = list(layer.named_parameters())
        assert [n for n, _ in now] == [n for n, _ in named]
        assert all(p is q for (_, p), (_, q) in zip(now, named))  # the very same Parameter objects
        assert all(torch.equal(p, s) for (_, p), s in zip(now, saved))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    pack.release()


def test_meta_layers_go_back_to_meta_after_remove():
    sm = _streamed(4, 2, 64 * KiB)
    with torch.no_grad():
        sm(_prompt(8))
    model = sm.remove()
    assert all(p.is_meta for p in decoder_layers(model).parameters())
    assert model.model.embed_tokens.weight.device.type == "cpu"


def test_slots_rotate_in_ring_order_across_forwards():
    """7 layers over 3 slots: the second forward's layer 0 takes slot 7 % 3 = 1, not slot 0."""
    with _streamed(7, 3, 64 * KiB, record_timeline=True) as sm, torch.no_grad():
        sm(_prompt(8))
        first = sm.read_timeline()
        sm(_prompt(8))
        second = sm.read_timeline()
    assert all(set(r) == {"layer", "host_set", "slot", "copy_start_ms", "copy_end_ms", "compute_start_ms",
                          "compute_end_ms"} for r in first + second)
    assert [r["slot"] for r in first] == [i % 3 for i in range(7)]
    assert [r["slot"] for r in second] == [(7 + i) % 3 for i in range(7)]
    for r in first:  # CPU copies are synchronous: a layer's copy ends before its compute starts
        assert r["copy_start_ms"] <= r["copy_end_ms"] <= r["compute_start_ms"] <= r["compute_end_ms"]


def test_timeline_must_be_asked_for():
    with _streamed(3, 2, 64 * KiB) as sm, torch.no_grad():
        sm(_prompt(8))
        with pytest.raises(ConfigError, match="record_timeline"):
            sm.read_timeline()


def test_stats_count_chunks_and_bytes():
    with _streamed(5, 2, 64 * KiB) as sm, torch.no_grad():
        sm(_prompt(8))
        st = sm.stats()
    assert st["chunks_per_layer"] == math.ceil(sm.layout.used_bytes / (64 * KiB))
    assert st["bytes_streamed"] == 5 * sm.layout.used_bytes and st["layers_streamed"] == 5
    assert sm.bytes_per_pass == 5 * sm.layout.param_bytes


def test_a_prefetched_pass_is_adopted_by_the_forward_that_starts_there(resident7):
    """prefetch(0) between forwards issues the next forward's first loads (depth 1: layers 0 and 1) in ring order;
    the forward adopts them and streams the rest, each layer once, with the resident model's logits."""
    ids = _prompt(8)
    with torch.no_grad():
        want = resident7(ids).logits
    with _streamed(7, 3, 64 * KiB, depth=1, record_timeline=True) as sm, torch.no_grad():
        sm(ids)
        before = sm.bytes_streamed
        sm.prefetch(0)
        assert sm.bytes_streamed - before == 2 * sm.layout.used_bytes and sm.passes == 1
        got = sm(ids).logits
        rows = sm.read_timeline()
        st = sm.stats()
    assert torch.equal(got, want)
    assert st["bytes_streamed"] - before == 7 * sm.layout.used_bytes and st["passes"] == 2
    assert st["prefetches"] == 1 and st["bytes_dropped"] == 0
    assert [r["slot"] for r in rows] == [(7 + i) % 3 for i in range(7)]  # ring order continues through the prefetch


def test_a_prefetch_no_forward_uses_is_dropped_and_changes_nothing(resident7):
    """prefetch(4), then a forward from layer 0: the prefetched loads are dropped (counted), the forward streams its
    own from the ring's next slots and its logits are the resident model's; a later prefetch that another load
    overtakes is dropped too."""
    ids = _prompt(8)
    with torch.no_grad():
        want = resident7(ids).logits
    with _streamed(7, 3, 64 * KiB, depth=1) as sm, torch.no_grad():
        sm.prefetch(4)
        assert torch.equal(sm(ids).logits, want)
        assert sm.bytes_dropped == 2 * sm.layout.used_bytes
        sm.prefetch(0)
        sm.prefetch(0)  # a second prefetch drops the first
        assert sm.bytes_dropped == 4 * sm.layout.used_bytes
        assert torch.equal(sm(ids).logits, want)
        with pytest.raises(ConfigError, match="prefetch start"):
            sm.prefetch(7)


# ---------------------------------------------------------------------------------------------------------- bad input
def test_prefetch_deeper_than_the_ring_is_rejected():
    with pytest.raises(ConfigError, match="ring slots"):
        _streamed(4, 2, 64 * KiB, depth=2)


def test_ring_smaller_than_one_layer_is_rejected_before_pinning(monkeypatch):
    monkeypatch.setattr(streaming.WeightPack, "__init__", _never("pinned"))
    policy = StreamingPolicy(chunk_bytes=16 * KiB, ring_bytes=LAYER // 2)
    with pytest.raises(ConfigError, match="cannot hold one layer"):
        build_streamed_model("llama-tiny", budget_bytes=1 << 30, device="cpu", dtype=DTYPE, policy=policy)


def _fill_seeded(layer, index: int) -> None:
    init_parameters_(layer, SEED, prefix=f"model.layers.{index}.")


def _never(what: str):
    def fail(*a, **k):
        raise AssertionError(f"{what} before the input was validated")
    return fail


def test_budget_too_small_for_a_70b_layer_is_a_config_error_before_pinning(monkeypatch):
    monkeypatch.setattr(streaming.WeightPack, "__init__", _never("pinned"))
    with pytest.raises(StreamingBudgetTooSmall, match="cannot hold one layer") as e:
        build_streamed_model("llama2-70b", num_layers=48, budget_bytes=3 << 30, device="cpu")
    assert isinstance(e.value, ConfigError) and isinstance(e.value, BudgetTooSmall)


def test_plan_counts_slots_beside_resident_kv_and_activations():
    model = build_model("llama2-70b", num_layers=48, materialize=False)
    plan = plan_budget(model, 12 << 30, max_tokens=2064, prefill_tokens=2048, device_overhead_bytes=1 << 30)
    assert plan.layer_bytes == 1_711_308_800  # one Llama-2-70B layer in fp16, 1.594 GiB
    assert plan.resident_bytes == 2 * 32000 * 8192 * 2 + 8192 * 2
    assert plan.kv_bytes == 2 * 8 * 128 * 2 * 2064 * 49
    assert plan.slots == (plan.budget_bytes - plan.fixed_bytes) // plan.layer_bytes >= 4
    assert plan.planned_bytes <= 12 << 30
    assert plan_budget(model, 12 << 30, max_tokens=2064, max_slots=2).slots == 2
    with pytest.raises(StreamingBudgetTooSmall):
        plan_budget(model, plan.fixed_bytes + plan.layer_bytes - 1, max_tokens=2064, prefill_tokens=2048,
                    device_overhead_bytes=1 << 30)


def test_a_ring_beyond_the_budget_is_rejected():
    model = build_model("llama-tiny", dtype=DTYPE, num_layers=4, materialize=False)
    plan = plan_budget(model, 1 << 30, max_tokens=64, max_slots=2)
    pack = pack_layer_weights(model, device="cpu", fill=_fill_seeded, progress=False)
    place_resident_(model, "cpu", seed=SEED)
    with pytest.raises(StreamingBudgetTooSmall, match="exceeds the budget"):
        StreamedModel(model, pack, StreamingPolicy(chunk_bytes=64 * KiB, ring_bytes=3 * LAYER), device="cpu",
                      budget=plan)


def test_host_ram_too_small_for_the_pack_is_refused_before_pinning(monkeypatch):
    monkeypatch.setattr(streaming.WeightPack, "__init__", _never("pinned"))
    # 80 layers of Llama-2-70B need 127.5 GiB of host RAM: more than this machine has available
    with pytest.raises(InsufficientHostMemory, match="nothing was pinned"):
        build_streamed_model("llama2-70b", budget_bytes=12 << 30, device="cpu", max_tokens=512)


def test_host_ram_check_uses_available_memory(monkeypatch):
    class Tiny:
        available = 3 << 20
        total = 16 << 30
    monkeypatch.setattr(host_ram.psutil, "virtual_memory", lambda: Tiny())
    monkeypatch.setattr(streaming.WeightPack, "__init__", _never("pinned"))
    with pytest.raises(InsufficientHostMemory):
        _streamed(7, 2, 64 * KiB)


def test_mismatched_pack_and_bad_layer_sets_are_rejected():
    llama = build_model("llama-tiny", dtype=DTYPE, seed=SEED, num_layers=3)
    pack = pack_layer_weights(llama, device="cpu", progress=False)
    qwen = build_model("qwen2-tiny", dtype=DTYPE, seed=SEED, num_layers=3)  # q/k/v biases: another layout
    policy = StreamingPolicy(chunk_bytes=64 * KiB, ring_bytes=2 * LAYER)
    with pytest.raises(ConfigError, match="layout"):
        StreamedModel(qwen, pack, policy, device="cpu")
    with pytest.raises(ConfigError, match="outside"):
        StreamedModel(llama, pack, policy, device="cpu", layer_sets=[0, 1, 3])
    with pytest.raises(ConfigError, match="entries"):
        StreamedModel(llama, pack, policy, device="cpu", layer_sets=[0, 1])
    with pytest.raises(ConfigError, match="StreamingPolicy"):
        StreamedModel(llama, pack, {"chunk_bytes": 1}, device="cpu")  # type: ignore[arg-type]
    pack.release()
    with pytest.raises(ConfigError, match="released"):
        pack.layer(0)
