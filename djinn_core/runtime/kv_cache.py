"""SlabKVCache: a transformers ``Cache`` whose per-layer K and V live in fixed-capacity allocations.

Each decoder layer's keys and values share one allocation of shape ``(2, batch, kv_heads, capacity, head_dim)``
(index 0 = K, 1 = V), so a layer's KV is one swap item (``ItemKey("kv", i)``, :mod:`djinn_core.runtime.packing`). ``update`` copies the new tokens in at
position ``n`` and returns strided views ``[:, :, :n + s]``; the views are re-fetched from the allocation handle at
every access because the slab may compact (move) allocations between calls.

Where the bytes come from is the caller's decision: a :class:`KVAllocator` hands out handles with a ``view()``
method (a :class:`djinn_core.memory.slab.SlabTensor` is one; :class:`TorchKVAllocator` gives ordinary tensors, for
references and tests). Copy-on-write prefix sharing (forks) is by reference-counted :class:`KVBlock`\\ s: a layer
whose block is shared copies its prefix into a fresh block at its first ``update`` (on the current stream).

Nothing here synchronises; every copy is queued on the current stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from transformers.cache_utils import Cache, DynamicLayer

from djinn_core.errors import CacheCapacityExceeded, CheckpointStateError, ConfigError
from djinn_core.models import family_of
from djinn_core.validation import check_int

log = logging.getLogger(__name__)


class KVHandle(Protocol):
    """An allocation handle. ``view()`` returns the current tensor (call it at every use; the bytes may move)."""

    def view(self) -> torch.Tensor: ...


class KVAllocator(Protocol):
    """Where a cache's blocks come from. ``name`` is ``"kv.<layer>"`` (the allocation's tag)."""

    def allocate_kv(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> KVHandle: ...

    def free_kv(self, handle: KVHandle) -> None: ...


class _TensorHandle:
    """A handle over an ordinary tensor (no slab): ``view()`` is the tensor itself."""

    __slots__ = ("_t",)

    def __init__(self, t: torch.Tensor):
        self._t = t

    def view(self) -> torch.Tensor:
        return self._t


class TorchKVAllocator:
    """Blocks from the PyTorch allocator on ``device`` (reference runs and tests; no slab, no swapping)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def allocate_kv(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> KVHandle:
        return _TensorHandle(torch.empty(shape, dtype=dtype, device=self.device))

    def free_kv(self, handle: KVHandle) -> None:
        pass  # the tensor goes when the handle does


@dataclass(eq=False)
class KVBlock:
    """One layer's K/V allocation and how many caches reference it (``refs > 1``: shared, read-only)."""

    handle: KVHandle
    allocator: KVAllocator
    refs: int = 1

    def view(self) -> torch.Tensor:
        """The block's bytes, ``(2, batch, kv_heads, capacity, head_dim)``."""
        return self.handle.view()

    def release(self) -> None:
        """Drop one reference; the allocation is freed with the last one."""
        if self.refs <= 0:
            raise CheckpointStateError("KV block released more often than referenced")
        self.refs -= 1
        if self.refs == 0:
            self.allocator.free_kv(self.handle)


@dataclass(frozen=True)
class KVGeometry:
    """Shape of a cache: one block per layer of ``(2, batch, kv_heads, capacity, head_dim)`` in ``dtype``."""

    num_layers: int
    batch: int
    kv_heads: int
    head_dim: int
    capacity: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "batch", "kv_heads", "head_dim", "capacity"):
            check_int(f"KVGeometry.{name}", getattr(self, name), minimum=1)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (2, self.batch, self.kv_heads, self.capacity, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one layer's block (K and V, whole capacity)."""
        n = 1
        for d in self.block_shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def for_model(cls, config: Any, *, batch: int, capacity: int, dtype: torch.dtype) -> "KVGeometry":
        """The geometry of a model with ``config``, as its family lays out the cache
        (:meth:`~djinn_core.models.family.ModelFamily.kv_shape`)."""
        num_layers, kv_heads, head_dim = family_of(config).kv_shape(config)
        return cls(num_layers, batch, kv_heads, head_dim, capacity, dtype)


class SlabKVLayer(DynamicLayer):
    """One layer's cache: ``length`` tokens held in a :class:`KVBlock` of fixed capacity."""

    is_sliding = False
    is_croppable = False

    def __init__(self, cache: "SlabKVCache", layer_idx: int):
        self._cache = cache
        self.layer_idx = layer_idx
        self.block: KVBlock | None = None
        self.length = 0
        # one-shot: make the current stream wait until the block's bytes have arrived (set by a resume)
        self.before_use: Callable[[], None] | None = None
        super().__init__()  # sets keys/values to None (ignored by the setters) and is_initialized = False
        self.dtype = cache.geometry.dtype

    # keys / values are always fresh views of the block (the slab may have moved it since the last call)
    @property
    def keys(self) -> torch.Tensor | None:  # (batch, kv_heads, length, head_dim), strided over capacity
        return None if self.block is None else self.block.view()[0, :, :, : self.length]

    @keys.setter
    def keys(self, value: Any) -> None:
        if value is not None:
            raise CheckpointStateError("SlabKVLayer.keys is a view of its block; it cannot be assigned")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.block is None else self.block.view()[1, :, :, : self.length]

    @values.setter
    def values(self, value: Any) -> None:
        if value is not None:
            raise CheckpointStateError("SlabKVLayer.values is a view of its block; it cannot be assigned")

    @property
    def device(self) -> torch.device | None:
        return None if self.block is None else self.block.view().device

    @device.setter
    def device(self, value: Any) -> None:  # DynamicLayer.lazy_initialization assigns it; we derive it
        pass

    @property
    def shared(self) -> bool:
        """True while this layer reads a block that another cache also references (copy-on-write pending)."""
        return self.block is not None and self.block.refs > 1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.block = self._cache._new_block(self.layer_idx)
        self.is_initialized = True

    def wait_ready(self) -> None:
        """Run the pending ``before_use`` wait, if any (the current stream waits for this block's restore)."""
        fn, self.before_use = self.before_use, None
        if fn is not None:
            fn()

    def _copy_on_write(self) -> None:
        self.wait_ready()
        old = self.block
        assert old is not None
        new = self._cache._new_block(self.layer_idx)
        n = self.length
        new.view()[:, :, :, :n].copy_(old.view()[:, :, :, :n])  # current stream
        old.release()
        self.block = new
        log.debug("kv.%d: copy-on-write of %d tokens", self.layer_idx, n)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``s`` new tokens at position ``length``; returns (K, V) views of the first ``length + s`` tokens."""
        # runs once per layer per decode step, on the host's critical path: checks and views kept to a minimum
        shape = key_states.shape
        if len(shape) != 4 or value_states.shape != shape or (shape[0], shape[1], shape[3]) != self._cache._bhd:
            g = self._cache.geometry
            raise ConfigError(f"kv.{self.layer_idx}: K/V of shape {tuple(shape)}, {tuple(value_states.shape)}; "
                              f"this cache holds (batch, kv_heads, s, head_dim) = "
                              f"({g.batch}, {g.kv_heads}, s, {g.head_dim})")
        dtype = self._cache.geometry.dtype
        if key_states.dtype != dtype or value_states.dtype != dtype:
            raise ConfigError(f"kv.{self.layer_idx}: K/V dtype {key_states.dtype}; this cache holds {dtype}")
        start = self.length
        end = start + shape[2]
        if end > self._cache.geometry.capacity:
            raise CacheCapacityExceeded(
                f"kv.{self.layer_idx}: {start} + {shape[2]} tokens exceed the capacity of "
                f"{self._cache.geometry.capacity}")
        self.wait_ready()
        if self.block is None:
            self.lazy_initialization(key_states, value_states)
        elif self.shared:
            self._copy_on_write()
        k, v = self.block.view().unbind(0)  # each (batch, kv_heads, capacity, head_dim)
        k.narrow(2, start, end - start).copy_(key_states)
        v.narrow(2, start, end - start).copy_(value_states)
        self.length = end
        return k.narrow(2, 0, end), v.narrow(2, 0, end)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self._cache.geometry.capacity

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise CheckpointStateError("SlabKVCache does not crop")

    def offload(self) -> None:
        raise CheckpointStateError("SlabKVCache moves through the swap engine, not Cache.offload")

    prefetch = offload


class SlabKVCache(Cache):
    """A transformers ``Cache`` with one fixed-capacity block per decoder layer, from ``allocator``.

    Blocks are allocated lazily at a layer's first ``update`` or eagerly with :meth:`allocate`. :meth:`detach` and
    :meth:`attach` hand blocks out and back (pause/resume); :meth:`share_prefix` makes this cache reference another
    cache's blocks copy-on-write (fork).
    """

    def __init__(self, geometry: KVGeometry, allocator: KVAllocator):
        self.geometry = geometry
        self._bhd = (geometry.batch, geometry.kv_heads, geometry.head_dim)  # what update() checks K/V against
        self.allocator = allocator
        super().__init__(layers=[SlabKVLayer(self, i) for i in range(geometry.num_layers)])

    def _new_block(self, layer_idx: int) -> KVBlock:
        handle = self.allocator.allocate_kv(f"kv.{layer_idx}", self.geometry.block_shape, self.geometry.dtype)
        return KVBlock(handle, self.allocator)

    def _check_layers(self, layers: range | list[int]) -> None:
        for i in layers:
            if not 0 <= i < self.geometry.num_layers:
                raise ConfigError(f"layer {i} outside 0..{self.geometry.num_layers - 1}")

    def allocate(self, layers: range | list[int] | None = None) -> None:
        """Give every listed layer without a block an empty one now (so no allocation happens during compute)."""
        layers = range(self.geometry.num_layers) if layers is None else layers
        self._check_layers(layers)
        for i in layers:
            layer = self.layers[i]
            if layer.block is None:
                layer.block = self._new_block(i)
                layer.is_initialized = True

    def wait_ready(self) -> None:
        """Make the current stream wait for every block still being restored."""
        for layer in self.layers:
            layer.wait_ready()

    def lengths(self) -> list[int]:
        """Tokens held per layer."""
        return [layer.length for layer in self.layers]

    def detach(self, layer_idx: int) -> KVBlock | None:
        """Take layer ``layer_idx``'s block out (its length is kept); the layer holds no block afterwards."""
        layer = self.layers[layer_idx]
        block, layer.block = layer.block, None
        layer.before_use = None
        layer.is_initialized = False
        return block

    def attach(self, layer_idx: int, block: KVBlock) -> None:
        """Give layer ``layer_idx`` a block (its bytes must hold the layer's ``length`` tokens)."""
        layer = self.layers[layer_idx]
        if layer.block is not None:
            raise CheckpointStateError(f"kv.{layer_idx} already holds a block")
        layer.block = block
        layer.is_initialized = True

    def share_prefix(self, other: "SlabKVCache", layers: range | list[int]) -> None:
        """Reference ``other``'s blocks for ``layers`` (copy-on-write), with its lengths."""
        if other.geometry != self.geometry:
            raise ConfigError("share_prefix needs caches of the same geometry")
        self._check_layers(layers)
        for i in layers:
            src = other.layers[i]
            src.wait_ready()
            if src.block is None:
                raise CheckpointStateError(f"kv.{i} of the source cache holds no block (paused or never written)")
            mine = self.layers[i]
            if mine.block is not None:
                mine.block.release()
            src.block.refs += 1
            mine.block = src.block
            mine.length = src.length
            mine.is_initialized = True

    def release(self, layers: range | list[int] | None = None) -> None:
        """Drop this cache's reference to the listed blocks (all by default); lengths are kept."""
        layers = range(self.geometry.num_layers) if layers is None else layers
        for i in layers:
            block = self.detach(i)
            if block is not None:
                block.release()

    def resident_bytes(self) -> int:
        """Bytes of blocks this cache references (shared blocks counted in full)."""
        return sum(self.geometry.block_bytes for layer in self.layers if layer.block is not None)
