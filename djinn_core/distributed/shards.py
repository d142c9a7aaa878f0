"""Layer shards: rank ``r`` of ``N`` keeps, in its own host memory, the ``r``-th of ``N`` contiguous parts of every
decoder layer's packed bytes.

Geometry (bytes): a layer's ``used_bytes`` (its :class:`~djinn_core.streaming.layout.LayerLayout`) are cut into ``N``
parts of ``shard_bytes = round_up(ceil(used_bytes / N), LAYER_ALIGNMENT)``; rank ``r``'s part is the layer's bytes
``[r * shard_bytes, min((r + 1) * shard_bytes, used_bytes))`` followed by zero padding up to ``shard_bytes`` (only
the last parts are shorter than ``shard_bytes``; with small layers a trailing part may be all padding). Every part has
the same size, as ``all_gather_into_tensor`` requires, and the parts laid end to end are the layer's bytes at their
own offsets: a ring slot of ``N * shard_bytes`` (the :func:`gathered_layout` stride) holds the layer after one
all-gather, byte for byte.

The shards are stored in a :class:`~djinn_core.streaming.host_pack.WeightPack` (one pinned-memory mechanism for the
library: segments pinned once with ``cudaHostRegister``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from djinn_core.errors import ConfigError
from djinn_core.memory.host_ram import check_host_ram
from djinn_core.streaming.host_pack import DEFAULT_SEGMENT_BYTES, LayerFill, WeightPack, check_pack_args
from djinn_core.streaming.layout import LAYER_ALIGNMENT, LayerLayout, bind_parameters, restore_parameters, round_up
from djinn_core.validation import check_int

log = logging.getLogger(__name__)

GiB = 1 << 30


def shard_bytes_for(used_bytes: int, world_size: int) -> int:
    """Bytes of each rank's shard of a layer of ``used_bytes``: an equal share, rounded up to a page."""
    check_int("used_bytes", used_bytes, 1)
    check_int("world_size", world_size, 1)
    return round_up(-(-used_bytes // world_size), LAYER_ALIGNMENT)


def shard_range(used_bytes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The layer bytes ``[start, stop)`` in ``rank``'s shard (``stop - start`` may be below the shard size, or 0)."""
    check_int("rank", rank, 0, world_size - 1)
    shard = shard_bytes_for(used_bytes, world_size)
    start = min(rank * shard, used_bytes)
    return start, min(start + shard, used_bytes)


def gathered_layout(layout: LayerLayout, world_size: int) -> LayerLayout:
    """``layout`` with the stride of a ring slot that holds ``world_size`` shards end to end (parameters at the same
    offsets; the stride is at least ``layout.stride``)."""
    return dataclasses.replace(layout, stride=world_size * shard_bytes_for(layout.used_bytes, world_size))


class ShardPack:
    """Rank ``rank``'s shard of each of ``num_sets`` layer weight sets, in host memory (pinned once when ``pin``).

    It reads like a :class:`WeightPack` to :class:`~djinn_core.streaming.model.StreamedModel`: ``layout`` is the
    gathered slot layout (:func:`gathered_layout`), :meth:`layer` gives the bytes this rank copies to its device for
    a weight set (``shard_bytes`` of them, the copy source). Build one with :func:`pack_layer_shards`.
    """

    def __init__(self, layout: LayerLayout, num_sets: int, *, rank: int, world_size: int, pin: bool,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, progress: bool = True):
        check_int("world_size", world_size, 1)
        check_int("rank", rank, 0, world_size - 1)
        self.rank = rank
        self.world_size = world_size
        self.layout = gathered_layout(layout, world_size)
        self.shard_bytes = shard_bytes_for(layout.used_bytes, world_size)
        self.start, self.stop = shard_range(layout.used_bytes, world_size, rank)
        # NOTE: a storage-only layout (no parameters): the WeightPack reads only its stride and used bytes
        self._store = WeightPack(LayerLayout((), self.shard_bytes, self.shard_bytes), num_sets, pin=pin,
                                 segment_bytes=segment_bytes, progress=progress)
        self.ready_event: Any = None

    @property
    def num_sets(self) -> int:
        return self._store.num_sets

    @property
    def pinned(self) -> bool:
        return self._store.pinned

    @property
    def nbytes(self) -> int:
        """Host bytes of this rank's shards."""
        return self._store.nbytes

    @property
    def natural_bytes(self) -> int:
        """Layer bytes in each of this rank's shards (without padding)."""
        return self.stop - self.start

    @property
    def pin_s(self) -> float:
        return self._store.pin_s

    def layer(self, index: int) -> torch.Tensor:
        """This rank's shard of weight set ``index`` (uint8, ``shard_bytes`` long, pinned when the pack is)."""
        return self._store.layer(index)

    def release(self) -> None:
        """Unpin and free the shards (every model streaming from them must have been removed first)."""
        self._store.release()


def pack_layer_shards(
    model: nn.Module,
    *,
    rank: int,
    world_size: int,
    device: torch.device | str,
    fill: LayerFill | None = None,
    num_sets: int | None = None,
    pin: bool | None = None,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    min_free_host_bytes: int | None = None,
    progress: bool = True,
) -> ShardPack:
    """Pack rank ``rank``'s shard of ``model``'s first ``num_sets`` decoder layers (default: all) in host memory.

    Each layer is materialised whole in a staging buffer on ``device`` (one layer stride; the GPU, or host memory on
    a CPU) -- by ``fill(layer, index)`` when given (e.g. the seeded ``init_parameters_``, identical on every rank), else
    from the layer's own parameters -- and only this rank's bytes are copied to the host (device-to-host on the
    current stream). Checks this rank's host RAM (:class:`InsufficientHostMemory`) before pinning; ``pin`` defaults
    to ``device`` being CUDA. The model's own parameters are left as they were.
    """
    device, layers, num_sets, layout, pin = check_pack_args(model, device=device, num_sets=num_sets, pin=pin,
                                                            min_free_host_bytes=min_free_host_bytes, what="shards")
    check_host_ram(num_sets * shard_bytes_for(layout.used_bytes, world_size),
                   f"rank {rank}'s shards of {num_sets} layer weight sets", min_free_host_bytes=min_free_host_bytes)
    pack = ShardPack(layout, num_sets, rank=rank, world_size=world_size, pin=pin, segment_bytes=segment_bytes,
                     progress=progress)
    start, stop = pack.start, pack.stop
    n = stop - start
    staging = torch.empty(layout.stride, dtype=torch.uint8, device=device)
    views = layout.views(staging)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in tqdm(range(num_sets), desc=f"packing rank {rank}'s layer shards", unit="layer", disable=not progress):
            layer = layers[i]
            if fill is None:
                for view, (name, p) in zip(views, layer.named_parameters()):
                    if p.is_meta:
                        raise ConfigError(f"layer {i} parameter {name} is on meta: pass fill= to materialise it")
                    view.copy_(p.detach())
            else:
                originals = bind_parameters(layer, views)
                try:
                    fill(layer, i)
                finally:
                    restore_parameters(layer, originals)
            dst = pack.layer(i)
            dst[n:].zero_()  # padding: disjoint from the bytes the copy below writes
            # D2H on the current stream; the next layer's fill overwrites staging after it
            dst[:n].copy_(staging[start:stop], non_blocking=pack.pinned and device.type == "cuda")
    if device.type == "cuda":
        pack.ready_event = torch.cuda.Event()
        pack.ready_event.record(torch.cuda.current_stream(device))
        # back to the driver: a VRAM split counts the ring, not the allocator's cache of this slot
        staging = views = view = None
        torch.cuda.empty_cache()
    log.info("packed rank %d of %d's shards of %d layer weight sets (%.2f GiB, %d of %d layer bytes each) in %.1f s",
             rank, world_size, num_sets, pack.nbytes / GiB, n, layout.used_bytes, time.perf_counter() - t0)
    return pack


__all__ = ["ShardPack", "gathered_layout", "pack_layer_shards", "shard_bytes_for", "shard_range"]
