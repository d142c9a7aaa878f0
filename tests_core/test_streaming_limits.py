"""Streaming refuses absurd layouts and wrong types with typed errors that give the numbers, before anything is pinned
or allocated (issue 18): a chunk below the floor, a layer or a ring of too many chunks, ``chunk_bytes=None``, and
``device="cuda"`` on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch

from djinn_core import streaming
from djinn_core.errors import ConfigError, DeviceUnavailable
from djinn_core.models import build_model, decoder_layers
from djinn_core.streaming import (MAX_CHUNKS_PER_LAYER, MAX_RING_CHUNKS, MIN_CHUNK_BYTES, LayerLayout, StreamedModel,
                                  StreamingPolicy, build_streamed_model, pack_layer_weights)

pytestmark = pytest.mark.cpu

KiB, MiB = 1 << 10, 1 << 20
DTYPE = torch.float32


def _used_bytes(arch: str, dtype: torch.dtype) -> int:
    return LayerLayout.of(decoder_layers(build_model(arch, dtype=dtype, num_layers=1, materialize=False))[0]).used_bytes


TINY_USED = _used_bytes("llama-tiny", DTYPE)  # about 580 KiB


@pytest.fixture
def nothing_pinned(monkeypatch):
    """Fail the test if a weight pack or a ring is allocated: every refusal here must come first."""
    def never(*a, **k):
        raise AssertionError("allocated before the input was validated")
    monkeypatch.setattr(streaming.WeightPack, "__init__", never)
    monkeypatch.setattr(streaming.WeightRing, "__init__", never)


@pytest.mark.parametrize("chunk", [1, 512, MIN_CHUNK_BYTES - 1])
def test_a_chunk_below_the_floor_is_refused_with_the_numbers(chunk, nothing_pinned):
    with pytest.raises(ConfigError, match=rf"chunk_bytes={chunk} is below the floor of {MIN_CHUNK_BYTES} bytes"):
        StreamingPolicy(chunk_bytes=chunk, ring_bytes=1 << 30)
    with pytest.raises(ConfigError, match="MIN_CHUNK_BYTES"):
        build_streamed_model("llama-tiny", budget_bytes=1 << 30, device="cpu", dtype=DTYPE, chunk_bytes=chunk)


def test_the_floor_itself_is_accepted():
    assert StreamingPolicy(chunk_bytes=MIN_CHUNK_BYTES, ring_bytes=1 << 20).chunk_bytes == MIN_CHUNK_BYTES


def test_the_default_ring_at_the_floor_chunk_is_refused_not_allocated(nothing_pinned):
    """The issue's case: a tiny model, a 1 GiB budget planned into ~1700 slots, tiny chunks: it used to allocate host
    memory without bound; now the ring's chunk count is refused before anything is allocated."""
    with pytest.raises(ConfigError, match=rf"over the ring's \d+ slots.* {MAX_RING_CHUNKS} per ring \(MAX_RING_CHUNKS\)"):
        build_streamed_model("llama-tiny", budget_bytes=1 << 30, device="cpu", dtype=DTYPE,
                             chunk_bytes=MIN_CHUNK_BYTES, progress=False)


def test_a_layer_of_too_many_chunks_is_refused_before_pinning(nothing_pinned):
    used = _used_bytes("llama2-70b", torch.float16)  # 1.6 GiB: 417k chunks of 4 KiB
    with pytest.raises(ConfigError) as e:
        build_streamed_model("llama2-70b", num_layers=2, budget_bytes=12 << 30, device="cpu",
                             chunk_bytes=MIN_CHUNK_BYTES, max_tokens=64, max_slots=2)
    msg = str(e.value)
    assert f"{-(-used // MIN_CHUNK_BYTES)} chunks" in msg and f"{MAX_CHUNKS_PER_LAYER} chunks per layer" in msg
    assert f"at least {-(-used // MAX_CHUNKS_PER_LAYER)} bytes" in msg  # what would be accepted


def test_a_ring_of_too_many_chunks_is_refused_with_the_numbers():
    per_layer = -(-TINY_USED // MIN_CHUNK_BYTES)
    slots = MAX_RING_CHUNKS // per_layer + 1
    policy = StreamingPolicy(chunk_bytes=MIN_CHUNK_BYTES, ring_bytes=1 << 30)
    assert policy.chunks_per_layer(TINY_USED, slots - 1) == per_layer  # one slot fewer fits
    with pytest.raises(ConfigError, match=rf"{per_layer * slots} over the ring's {slots} slots"):
        policy.chunks_per_layer(TINY_USED, slots)


def test_a_ring_refused_by_the_streamed_model_allocates_nothing(monkeypatch):
    model = build_model("llama-tiny", dtype=DTYPE, seed=0, num_layers=2)
    pack = pack_layer_weights(model, device="cpu", progress=False)
    monkeypatch.setattr(streaming.WeightRing, "__init__", lambda *a, **k: pytest.fail("ring allocated"))
    per_layer = -(-TINY_USED // MIN_CHUNK_BYTES)
    slots = MAX_RING_CHUNKS // per_layer + 1
    policy = StreamingPolicy(chunk_bytes=MIN_CHUNK_BYTES, ring_bytes=slots * pack.layout.stride)
    with pytest.raises(ConfigError, match="MAX_RING_CHUNKS"):
        StreamedModel(model, pack, policy, device="cpu")
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(model))  # the model is untouched
    pack.release()


def test_the_gpu_chunk_sweeps_stay_valid():
    """The exp2 sweeps (16..512 MiB on a 70B layer over 4 slots; 16 MiB over 2) and the CPU plumbing sweep (16..512
    KiB on a tiny layer over 2 slots) are inside the bounds."""
    used_70b = _used_bytes("llama2-70b", torch.float16)
    for mib in (16, 64, 128, 512):
        StreamingPolicy(chunk_bytes=mib * MiB, ring_bytes=4 * used_70b).chunks_per_layer(used_70b, 4)
    for kib in (16, 64, 128, 512):
        StreamingPolicy(chunk_bytes=kib * KiB, ring_bytes=2 * TINY_USED).chunks_per_layer(TINY_USED, 2)


@pytest.mark.parametrize("kw", [dict(chunk_bytes=None), dict(chunk_bytes="64MiB"), dict(chunk_bytes=64.0 * MiB),
                                dict(prefetch_depth="1"), dict(policy={"chunk_bytes": 64 * KiB}),
                                dict(host_sets=0), dict(batch=None), dict(max_tokens="2048"),
                                dict(prefill_tokens=0), dict(device_overhead_bytes=-1),
                                dict(min_free_host_bytes="4GiB"), dict(budget_bytes=None)])
def test_wrong_types_are_config_errors_not_tracebacks(kw, nothing_pinned):
    args = dict(budget_bytes=1 << 30, device="cpu", dtype=DTYPE, num_layers=2, progress=False)
    args.update(kw)
    with pytest.raises(ConfigError):
        build_streamed_model("llama-tiny", **args)


@pytest.mark.parametrize("kw", [dict(chunk_bytes=None, ring_bytes=1 << 20), dict(ring_bytes=None),
                                dict(ring_bytes="1GiB"), dict(ring_bytes=1 << 20, prefetch_depth=True)])
def test_policy_wrong_types_are_config_errors(kw):
    with pytest.raises(ConfigError):
        StreamingPolicy(**kw)


def test_cuda_without_a_gpu_is_device_unavailable_not_budget_too_small(nothing_pinned):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(DeviceUnavailable, match="no CUDA GPU"):  # a budget far too small: the device comes first
        build_streamed_model("llama2-70b", budget_bytes=1 << 20, device="cuda")
    with pytest.raises(DeviceUnavailable):
        streaming.place_resident_(build_model("llama-tiny", num_layers=1, materialize=False), "cuda", seed=0)
