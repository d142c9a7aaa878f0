"""Partitioned weight streaming: N processes, one per GPU, each pulls 1/N of every layer over its own host link and
an all-gather assembles the layer in every GPU's ring slot (ZeRO-Infinity's bandwidth-centric partitioning).

Per layer load ``j`` into slot ``s`` on rank ``r`` (:meth:`ShardedWeightRing.copy_async`):

    copy stream:    wait slot_free[s]; copy rank r's shard of layer j (host -> slot s bytes [r*shard, (r+1)*shard)) in
                    chunks; record h2d_done[s]
    gather stream:  wait h2d_done[s]; all-gather the N shards into slot s (in place); record gathered[s]
    compute stream: (StreamedModel) wait gathered[s]; bind layer j's parameters to slot s; compute; record slot_free[s]

The all-gather runs on its own stream so the copy stream goes on with the next layer's shard while it runs; the
compute stream waits only for the slot it reads. Everything else -- slot rotation, prefetch depth, parameter binding
-- is :class:`~djinn_core.streaming.model.StreamedModel`'s, unchanged: the slot holds the layer's bytes exactly, so
logits are bitwise those of one-GPU streaming. Without CUDA (gloo) the copies and all-gathers are synchronous.

Every rank must run the same sequence of forwards (each computes its own batch: data parallel over sessions): the
all-gathers are collectives, issued in layer order by each rank's hooks, and a rank that skips a forward, or stops in
the middle of one, leaves the others waiting (until the group's timeout). Check inputs before a forward on all ranks.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from functools import partial
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from djinn_core.distributed.group import RankGroup
from djinn_core.distributed.shards import ShardPack, gathered_layout, pack_layer_shards, shard_bytes_for
from djinn_core.errors import ConfigError, InsufficientHostMemory, StreamingBudgetTooSmall
from djinn_core.memory.host_ram import check_host_ram
from djinn_core.models import build_model, decoder_layers
from djinn_core.streaming.builder import DEFAULT_CUDA_OVERHEAD_BYTES, place_resident_, seeded_layer_fill
from djinn_core.streaming.layout import LayerLayout
from djinn_core.streaming.model import StreamedModel
from djinn_core.streaming.plan import (DEFAULT_CHUNK_BYTES, GiB, StreamingBudget, StreamingPolicy, check_chunk_bytes,
                                       plan_budget)
from djinn_core.streaming.ring import RingBase
from djinn_core.trace import Mark, make_mark
from djinn_core.validation import check_int, check_optional_int

# NOTE: torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); older ones lack the new
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ShardedWeightRing(RingBase):
    """A ring of ``slots`` whole-layer slots on ``device``, each filled from ``world_size`` shards: this rank's over
    its own host link (copy stream), the others' by an in-place all-gather (gather stream).

    It has the attributes :class:`StreamedModel` reads from a :class:`~djinn_core.streaming.ring.WeightRing`:
    ``slot_views``, ``chunk_events`` (here one event per slot: the slot's all-gather is done), ``slot_free``,
    ``copy_async``, ``copy_marks`` (from the shard copy's start to the all-gather's end), ``buffer``, ``release``.

    Args:
        layout: the gathered slot layout (:func:`~djinn_core.distributed.shards.gathered_layout`).
        slots: number of slots.
        shard_bytes: bytes of each rank's shard (``layout.stride // world_size``).
        rank, world_size: this rank's place in ``group`` (``None``: the default group).
        chunk_bytes: copy granularity of the shard's host-to-device copy.
        device: this rank's device (its GPU, or the CPU under gloo).
        ready_event: a CUDA event the copy stream waits on before its first copy (the shards' fill), or None.
    """

    def __init__(self, layout: LayerLayout, slots: int, *, shard_bytes: int, rank: int, world_size: int, group: Any,
                 chunk_bytes: int, device: torch.device, ready_event: Any = None):
        if layout.stride != world_size * shard_bytes:
            raise ConfigError(f"slot stride {layout.stride} is not {world_size} shards of {shard_bytes} bytes")
        self.device = device
        self.cuda = device.type == "cuda"
        self.slots = check_int("slots", slots, 1)
        self.rank = rank
        self.world_size = world_size
        self.shard_bytes = shard_bytes
        self.group = group
        self.chunks = tuple((a, min(a + chunk_bytes, shard_bytes)) for a in range(0, shard_bytes, chunk_bytes))
        self.buffer: torch.Tensor | None = torch.empty(slots * layout.stride, dtype=torch.uint8, device=device)
        self._slot_bufs = [self.buffer[s * layout.stride:(s + 1) * layout.stride] for s in range(slots)]
        self._own = [b[rank * shard_bytes:(rank + 1) * shard_bytes] for b in self._slot_bufs]  # all-gather input
        self._own_chunks = [[own[a:z] for a, z in self.chunks] for own in self._own]
        self.slot_views = [layout.views(b) for b in self._slot_bufs]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.gather_stream = torch.cuda.Stream(device) if self.cuda else None
        if self.cuda:
            self.buffer.record_stream(self.copy_stream)
            self.buffer.record_stream(self.gather_stream)
        self._h2d_done = [self._event() for _ in range(slots)]
        self.chunk_events = [[self._event()] for _ in range(slots)]  # the slot's all-gather is done
        self.slot_free = [self._event() for _ in range(slots)]
        self._ready_event = ready_event
        self.next_slot = 0
        self.copy_marks: tuple[Mark, Mark] | None = None

    def copy_async(self, host: torch.Tensor, timed: bool = False) -> int:
        """Issue this rank's shard ``host`` (``shard_bytes``, pinned) into its part of the next slot on the copy
        stream, then the slot's all-gather on the gather stream; return the slot. Every rank must issue the same
        sequence of calls. With ``timed``, ``copy_marks`` holds a mark on the copy stream before the first chunk and
        one on the gather stream after the all-gather."""
        copy_stream, gather_stream = self.copy_stream, self.gather_stream
        with torch.cuda.stream(copy_stream) if self.cuda else nullcontext():
            s = self._take_slot()
            if timed:
                start = make_mark("copy_start", copy_stream, self.device)
            for (a, z), dst in zip(self.chunks, self._own_chunks[s]):
                dst.copy_(host[a:z], non_blocking=self.cuda)
            self._h2d_done[s].record(copy_stream)
        with torch.cuda.stream(gather_stream) if self.cuda else nullcontext():
            if self.cuda:
                gather_stream.wait_event(self._h2d_done[s])
            # NOTE: a synchronous collective: under NCCL the gather stream waits for it, the host does not
            _all_gather(self._slot_bufs[s], self._own[s], group=self.group)
            self.chunk_events[s][0].record(gather_stream)
            if timed:
                self.copy_marks = (start, make_mark("gathered", gather_stream, self.device))
        return s

    def gather_slot(self, slot: int) -> None:
        """All-gather slot ``slot`` again, on the current stream (a measurement: every rank must call it)."""
        _all_gather(self._slot_bufs[slot], self._own[slot], group=self.group)

    def release(self) -> None:
        """Wait for the copy and gather streams, then free the ring."""
        for stream in (self.copy_stream, self.gather_stream):
            if stream is not None:
                stream.synchronize()
        self.slot_views = []
        self._own_chunks = []
        self._own = []
        self._slot_bufs = []
        self.buffer = None


class PartitionedStreamedModel(StreamedModel):
    """A :class:`StreamedModel` whose ring slots are filled from this rank's :class:`ShardPack` and an all-gather over
    ``group`` (``None``: the default process group). The shards' rank and world size must be this process's in
    ``group``. Call the model as usual on every rank, each with its own inputs; see the module docstring for the
    lockstep rule."""

    def __init__(
        self,
        model: nn.Module,
        shards: ShardPack,
        policy: StreamingPolicy,
        *,
        device: torch.device | str,
        group: Any = None,
        layer_sets: Sequence[int] | None = None,
        budget: StreamingBudget | None = None,
        record_timeline: bool = False,
        owns_pack: bool = False,
    ):
        if not isinstance(shards, ShardPack):
            raise ConfigError(f"shards must be a ShardPack, got {type(shards).__name__}")
        if not dist.is_initialized():
            raise ConfigError("partitioned streaming needs an initialized process group (see init_group)")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if (shards.rank, shards.world_size) != (rank, world):
            raise ConfigError(f"the shards are rank {shards.rank} of {shards.world_size}; this process is rank {rank} "
                              f"of {world} in its group")
        self.group = group
        self.rank = rank
        self.world_size = world
        super().__init__(model, shards, policy, device=device, layer_sets=layer_sets, budget=budget,
                         record_timeline=record_timeline, owns_pack=owns_pack)
        self.shard_chunks = len(self.ring.chunks)  # copies per layer over this rank's link

    def prefetch(self, start: int) -> None:
        """Nothing: a load here is a collective (each rank's shard, then the all-gather), so every rank must issue its
        loads at the same point of the same forwards; only the forwards themselves issue them."""

    def _make_ring(self) -> ShardedWeightRing:
        return ShardedWeightRing(self.layout, self.slots, shard_bytes=self.pack.shard_bytes, rank=self.rank,
                                 world_size=self.world_size, group=self.group, chunk_bytes=self.policy.chunk_bytes,
                                 device=self.device, ready_event=self.pack.ready_event)

    def stats(self) -> dict[str, Any]:
        """:meth:`StreamedModel.stats` plus the partition: rank, world size, shard bytes, this rank's host bytes.
        ``bytes_streamed`` counts layer bytes landed in the ring (copied or gathered)."""
        return {**super().stats(), "rank": self.rank, "world_size": self.world_size,
                "shard_bytes": self.pack.shard_bytes, "shard_layer_bytes": self.pack.natural_bytes,
                "shard_chunks": self.shard_chunks, "host_bytes_streamed": self.layers_streamed * self.pack.shard_bytes}


def partitioned_plan(model: nn.Module, budget_bytes: int, world_size: int, **plan_kw: Any) -> StreamingBudget:
    """:func:`~djinn_core.streaming.plan.plan_budget` with ring slots of the gathered stride (N equal shards may pad
    a layer by up to N pages)."""
    plan = plan_budget(model, budget_bytes, **plan_kw)
    stride = gathered_layout(LayerLayout.of(decoder_layers(model)[0]), world_size).stride
    slots = min(plan.slots, max(0, budget_bytes - plan.fixed_bytes) // stride)
    if slots < 1:
        raise StreamingBudgetTooSmall(f"a VRAM budget of {budget_bytes / GiB:.2f} GiB cannot hold one gathered slot "
                                      f"({stride / GiB:.3f} GiB) beside {plan.fixed_bytes / GiB:.2f} GiB fixed")
    return dataclasses.replace(plan, layer_bytes=stride, slots=slots)


def build_partitioned_streamed_model(
    config: Any,
    *,
    group: RankGroup,
    budget_bytes: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prefetch_depth: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float16,
    num_layers: int | None = None,
    batch: int = 1,
    max_tokens: int = 2048,
    prefill_tokens: int | None = None,
    device_overhead_bytes: int | None = None,
    max_slots: int | None = None,
    min_free_host_bytes: int | None = None,
    record_timeline: bool = False,
    progress: bool = True,
) -> PartitionedStreamedModel:
    """On every rank of ``group`` (call it on all): an architecture (name or config) with seeded random weights,
    streamed under ``budget_bytes`` of the rank's VRAM on ``group.device``, each rank pinning only its shards.

    As :func:`~djinn_core.streaming.build_streamed_model` (the same checks; the same weights, bit-identical to
    ``build_model(config, device=group.device, seed=seed)``), plus: the host-RAM check counts the shards of the
    ``group.local_world_size`` ranks on this host, and the ranks agree on it before any of them pins, so a refusal
    is every rank's :class:`~djinn_core.errors.InsufficientHostMemory` and no rank is left waiting for the others.
    """
    if not isinstance(group, RankGroup):
        raise ConfigError(f"group must be a RankGroup (see init_group), got {type(group).__name__}")
    device = group.device
    check_chunk_bytes(chunk_bytes)
    check_optional_int("prefetch_depth", prefetch_depth, 0)
    check_int("seed", seed, None)
    if device_overhead_bytes is None:
        device_overhead_bytes = DEFAULT_CUDA_OVERHEAD_BYTES if device.type == "cuda" else 0
    model = build_model(config, dtype=dtype, num_layers=num_layers, materialize=False)
    plan = partitioned_plan(model, budget_bytes, group.world_size, max_tokens=max_tokens,
                            prefill_tokens=prefill_tokens, batch=batch, device_overhead_bytes=device_overhead_bytes,
                            max_slots=max_slots, fused_attention=device.type == "cuda")
    policy = StreamingPolicy(chunk_bytes=min(chunk_bytes, plan.ring_bytes), ring_bytes=plan.ring_bytes,
                             prefetch_depth=prefetch_depth)
    policy.depth(plan.slots)
    layers = decoder_layers(model)
    check_node_host_ram(group, len(layers) * shard_bytes_for(LayerLayout.of(layers[0]).used_bytes, group.world_size),
                        "layer shards", min_free_host_bytes=min_free_host_bytes)
    pack = pack_layer_shards(model, rank=group.rank, world_size=group.world_size, device=device,
                             fill=partial(seeded_layer_fill, seed), min_free_host_bytes=min_free_host_bytes,
                             progress=progress)
    try:
        place_resident_(model, device, seed=seed)
        return PartitionedStreamedModel(model, pack, policy, device=device, group=group.group, budget=plan,
                                        record_timeline=record_timeline, owns_pack=True)
    except BaseException:
        pack.release()
        raise


def check_node_host_ram(group: RankGroup, nbytes: int, what: str, *, min_free_host_bytes: int | None = None) -> None:
    """Every rank: can this host spare ``nbytes`` for each of its ``group.local_world_size`` ranks? Call on all ranks
    before any of them pins; all raise :class:`~djinn_core.errors.InsufficientHostMemory` if one host cannot."""
    refusal = None
    try:
        check_host_ram(group.local_world_size * nbytes, f"{what} of {group.local_world_size} rank(s) on this host",
                       min_free_host_bytes=min_free_host_bytes)
    except InsufficientHostMemory as e:
        refusal = e
    if not group.all_ok(refusal is None):
        raise refusal or InsufficientHostMemory(f"another rank's host cannot hold its {what}; nothing was pinned")


__all__ = ["PartitionedStreamedModel", "ShardedWeightRing", "build_partitioned_streamed_model", "check_node_host_ram",
           "partitioned_plan", "seeded_layer_fill"]
