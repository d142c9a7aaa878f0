"""SlabKVCache: bitwise equal to DynamicCache, fixed capacity, copy-on-write prefix sharing."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from djinn_core.errors import CacheCapacityExceeded, ConfigError
from djinn_core.runtime.kv_cache import KVGeometry, SlabKVCache, TorchKVAllocator
from djinn_core.models import build_model
from djinn_core.memory.slab import Slab

pytestmark = pytest.mark.cpu


def _greedy_logits(model, cache, ids, steps=6):
    out = [model(ids, past_key_values=cache, use_cache=True).logits]
    for _ in range(steps):
        tok = out[-1][:, -1:].argmax(-1)
        out.append(model(tok, past_key_values=cache, use_cache=True).logits)
    return out


@pytest.mark.parametrize("arch", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_slab_cache_logits_are_bitwise_equal_to_dynamic_cache(arch, attn):
    model = build_model(arch, dtype=torch.float32, seed=3)
    model.config._attn_implementation = attn
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))
    ref = _greedy_logits(model, DynamicCache(config=model.config), ids)
    geo = KVGeometry.for_model(model.config, batch=2, capacity=32, dtype=torch.float32)
    slab = Slab(4 << 20, "cpu")
    got = _greedy_logits(model, SlabKVCache(geo, _SlabAlloc(slab)), ids)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


class _SlabAlloc:
    def __init__(self, slab):
        self.slab = slab

    def allocate_kv(self, name, shape, dtype):
        return self.slab.allocate(shape, dtype, tag=name)

    def free_kv(self, handle):
        self.slab.free(handle)


def _geo(capacity=8):
    return KVGeometry(num_layers=2, batch=1, kv_heads=2, head_dim=4, capacity=capacity, dtype=torch.float32)


def test_update_returns_views_of_the_prefix_and_enforces_capacity():
    cache = SlabKVCache(_geo(capacity=5), TorchKVAllocator("cpu"))
    k = torch.randn(1, 2, 3, 4)
    keys, values = cache.update(k, -k, 0)
    assert torch.equal(keys, k) and torch.equal(values, -k) and cache.get_seq_length() == 3
    k2 = torch.randn(1, 2, 2, 4)
    keys, _ = cache.update(k2, k2, 0)
    assert torch.equal(keys, torch.cat([k, k2], 2))
    with pytest.raises(CacheCapacityExceeded):
        cache.update(k2[:, :, :1], k2[:, :, :1], 0)
    with pytest.raises(ConfigError):
        cache.update(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), 1)
    with pytest.raises(ConfigError):
        cache.update(k.double(), k.double(), 1)


def test_views_follow_the_block_when_the_slab_compacts():
    slab = Slab(1 << 16, "cpu")
    filler = slab.allocate((64,), torch.float32)
    cache = SlabKVCache(_geo(), _SlabAlloc(slab))
    k = torch.randn(1, 2, 3, 4)
    cache.update(k, k, 0)
    slab.free(filler)
    slab.allocate((slab.stats.free // 4,), torch.float32)  # forces the cache's block to slide down
    assert slab.stats.compactions >= 1
    assert torch.equal(cache.layers[0].keys, k)


def test_fork_shares_prefix_copy_on_write():
    slab = Slab(1 << 16, "cpu")
    parent = SlabKVCache(_geo(), _SlabAlloc(slab))
    k = torch.randn(1, 2, 3, 4)
    parent.update(k, k, 0)
    used = slab.stats.used
    child = SlabKVCache(_geo(), _SlabAlloc(slab))
    child.share_prefix(parent, [0])
    assert slab.stats.used == used and child.layers[0].shared
    a, b = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    ck, _ = child.update(a, a, 0)  # first write: own block, prefix copied
    pk, _ = parent.update(b, b, 0)
    assert not child.layers[0].shared and not parent.layers[0].shared
    assert torch.equal(ck, torch.cat([k, a], 2)) and torch.equal(pk, torch.cat([k, b], 2))
    child.release()
    parent.release()
    assert slab.stats.used == 0
