"""Pinned host pool: host memory pinned once, at creation, in large segments, then sub-allocated.

Pinning (``cudaHostAlloc`` through ``torch.empty(..., pin_memory=True)``) is slow, so it happens once, in
``segment_bytes`` pieces, and never per copy. The requested capacity is checked against the host's available RAM
(:func:`~djinn_core.memory.host_ram.check_host_ram`, keeping ``min_free_host_bytes`` available) *before* anything is
pinned, so an impossible pool fails fast with :class:`~djinn_core.errors.InsufficientHostMemory` instead of driving the
host into swap. Pinning time is logged.

Sub-allocation: each segment has its own first-fit, coalescing free list (:class:`~djinn_core.memory.slab.FreeList`);
a block never spans segments, so one request can be at most ``segment_bytes`` (larger requests raise ConfigError naming
the limit -- create the pool with a larger ``segment_bytes``). Blocks are ``alignment``-aligned.

Fences: a block freed while an in-flight host-to-device copy still reads it is freed with ``after=event``. A later
block overlapping that range carries the pending events in :attr:`HostBlock.fences`; a stream that writes the block
(the swap engine's device-to-host stream) ``wait_event``s on them first, and a CPU writer calls
:meth:`HostBlock.wait_host` (an event wait, not a device-wide synchronize).

Without CUDA (``pin=False``, the default there) segments are ordinary memory and the same bookkeeping runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from djinn_core.errors import ConfigError, DeviceUnavailable, DoubleFree, HostPoolExhausted, UnknownAllocation
from djinn_core.memory.host_ram import check_host_ram
from djinn_core.memory.slab import (DEFAULT_ALIGNMENT, FreeList, check_alignment, event_pending, tensor_nbytes,
                                    typed_view)
from djinn_core.validation import check_int

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 1 << 30  # one pinned allocation; also the largest block


@dataclass(frozen=True)
class HostPoolStats:
    """Pool occupancy in bytes (aligned sizes). ``largest_free`` is the largest block one request can get now."""

    capacity: int
    used: int
    free: int
    largest_free: int
    high_water: int
    allocations: int
    segments: int
    segment_bytes: int
    pinned: bool
    pin_ms: float  # wall time spent pinning at creation


class HostBlock:
    """Handle of one host-pool block. ``view()`` is a CPU tensor (pinned when the pool is) of ``shape`` / ``dtype``.

    ``fences``: CUDA events of in-flight copies still reading this range from an earlier owner; a stream writing the
    block must ``wait_event`` on them, a CPU writer must call :meth:`wait_host` first.
    """

    __slots__ = ("block_id", "segment", "offset", "size", "nbytes", "shape", "dtype", "fences", "_pool", "_freed",
                 "_view")

    def __init__(self, pool: "HostPool", block_id: int, segment: int, offset: int, size: int, nbytes: int,
                 shape: tuple[int, ...], dtype: torch.dtype, fences: list[Any]):
        self._pool = pool
        self.block_id = block_id
        self.segment = segment
        self.offset = offset
        self.size = size
        self.nbytes = nbytes
        self.shape = shape
        self.dtype = dtype
        self.fences = fences
        self._freed = False
        self._view: torch.Tensor | None = None

    @property
    def alive(self) -> bool:
        return not self._freed

    def view(self) -> torch.Tensor:
        """The block as a contiguous CPU tensor (non-blocking; see ``fences``). Blocks never move."""
        if self._freed:
            raise UnknownAllocation(f"host block {self.block_id} was freed")
        if self._view is None:
            self._view = typed_view(self._pool._segments[self.segment], self.offset, self.nbytes, self.shape,
                                    self.dtype)
        return self._view

    def data_ptr(self) -> int:
        """The block's host address (no tensor view is made: a copy issued through the CUDA driver needs only this)."""
        if self._freed:
            raise UnknownAllocation(f"host block {self.block_id} was freed")
        return self._pool._segment_ptrs[self.segment] + self.offset

    def wait_host(self) -> None:
        """Block the calling thread until no earlier in-flight copy reads this range (per-event waits)."""
        for ev in self.fences:
            ev.synchronize()
        self.fences = []

    def __repr__(self) -> str:
        return (f"HostBlock(id={self.block_id}, segment={self.segment}, offset={self.offset}, {tuple(self.shape)}, "
                f"{self.dtype}{', freed' if self._freed else ''})")


class HostPool:
    """Host memory pinned once in segments of ``segment_bytes`` and sub-allocated as typed blocks. Not thread-safe.

    Args:
        capacity_bytes: total bytes to pin (rounded up to ``alignment``; the last segment may be smaller).
        segment_bytes: bytes per pinned segment (one pinned allocation), also the largest single block.
        pin: pin the segments (default: ``torch.cuda.is_available()``); ``True`` without CUDA raises
            DeviceUnavailable.
        alignment: block alignment in bytes (power of two).
        min_free_host_bytes: host RAM that must stay available after pinning (default
            :func:`~djinn_core.memory.host_ram.default_min_free_host_bytes`).
    """

    def __init__(self, capacity_bytes: int, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES, pin: bool | None = None,
                 alignment: int = DEFAULT_ALIGNMENT, min_free_host_bytes: int | None = None):
        check_int("capacity_bytes", capacity_bytes)
        check_int("segment_bytes", segment_bytes, 1)
        self.alignment = check_alignment(alignment)
        if segment_bytes % alignment:
            raise ConfigError(f"segment_bytes ({segment_bytes}) must be a multiple of alignment ({alignment})")
        if pin is None:
            pin = torch.cuda.is_available()
        if not isinstance(pin, bool):
            raise ConfigError(f"pin must be a bool or None, got {pin!r}")
        if pin and not torch.cuda.is_available():
            raise DeviceUnavailable("pinning host memory needs CUDA; this machine has no CUDA GPU (use pin=False)")
        self.capacity = -(-capacity_bytes // alignment) * alignment
        self.segment_bytes = segment_bytes
        self.pinned = pin
        check_host_ram(self.capacity, "host pool", min_free_host_bytes=min_free_host_bytes)

        sizes = [segment_bytes] * (self.capacity // segment_bytes)
        if self.capacity % segment_bytes:
            sizes.append(self.capacity % segment_bytes)
        t0 = time.perf_counter()
        self._segments: list[torch.Tensor] = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n in sizes]
        self._segment_ptrs: list[int] = [c.data_ptr() for c in self._segments]
        self.pin_ms = (time.perf_counter() - t0) * 1e3
        gib = self.capacity / 2**30
        log.info("host pool: %s %.3f GiB in %d segment(s) of %.3f GiB in %.1f ms (%.1f ms/GiB)",
                 "pinned" if pin else "allocated (unpinned)", gib, len(sizes), segment_bytes / 2**30, self.pin_ms,
                 self.pin_ms / gib if gib else 0.0)
        self._free = [FreeList(n) for n in sizes]
        self._fences: list[list[tuple[int, int, Any]]] = [[] for _ in sizes]  # per segment: (offset, size, event)
        self._live: dict[int, HostBlock] = {}
        self._next_id = 1
        self._used = 0
        self._high_water = 0

    # -- allocation --------------------------------------------------------------------------------------------------
    def aligned_size(self, nbytes: int) -> int:
        check_int("nbytes", nbytes)
        a = self.alignment
        return max(a, -(-nbytes // a) * a)

    def allocate(self, shape: Sequence[int] | int, dtype: torch.dtype) -> HostBlock:
        """A block for a contiguous ``dtype`` tensor of ``shape`` (contents undefined); first fit over the segments.

        Raises ConfigError for a block larger than ``segment_bytes`` and :class:`HostPoolExhausted` (pool unchanged)
        when no segment has a large enough hole.
        """
        shape_t, nbytes = tensor_nbytes(shape, dtype)
        size = self.aligned_size(nbytes)
        if size > self.segment_bytes:
            raise ConfigError(
                f"host block of {size} bytes exceeds segment_bytes={self.segment_bytes}; blocks never span segments, "
                f"create the pool with a larger segment_bytes"
            )
        for si, fl in enumerate(self._free):
            offset = fl.take(size)
            if offset is not None:
                break
        else:
            raise HostPoolExhausted(size, self.capacity - self._used, self.capacity)
        fences = self._overlapping_fences(si, offset, size)
        block = HostBlock(self, self._next_id, si, offset, size, nbytes, shape_t, dtype, fences)
        self._live[block.block_id] = block
        self._next_id += 1
        self._used += size
        self._high_water = max(self._high_water, self._used)
        return block

    def _overlapping_fences(self, segment: int, offset: int, size: int) -> list[Any]:
        fl = self._fences[segment]
        if not fl:
            return []
        self._fences[segment] = fl = [f for f in fl if event_pending(f[2])]
        return [ev for off, sz, ev in fl if off < offset + size and offset < off + sz]

    def free(self, block: HostBlock, *, after: Any = None) -> None:
        """Return ``block`` to the pool. ``after``: a CUDA event after which no in-flight copy reads or writes it.

        Raises :class:`DoubleFree` (freed already) or :class:`UnknownAllocation` (not from this pool).
        """
        if not isinstance(block, HostBlock) or block._pool is not self:
            raise UnknownAllocation(f"{block!r} was not allocated by this host pool")
        if block._freed:
            raise DoubleFree(f"host block {block.block_id} freed twice")
        del self._live[block.block_id]
        block._freed = True
        block._view = None
        self._free[block.segment].release(block.offset, block.size)
        self._used -= block.size
        # ``after`` is not queried: callers pass the event of a copy they just issued (pending, or nearly so)
        pending = [ev for ev in block.fences if event_pending(ev)]
        if after is not None:
            pending.append(after)
        self._fences[block.segment].extend((block.offset, block.size, ev) for ev in pending)

    def fits(self, sizes: Sequence[int]) -> bool:
        """Whether blocks of these byte counts could all be allocated now (first fit, in the given order)."""
        trial = [fl.copy() for fl in self._free]
        for n in sizes:
            size = self.aligned_size(n)
            if size > self.segment_bytes or not any(t.take(size) is not None for t in trial):
                return False
        return True

    # -- queries -----------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> HostPoolStats:
        return HostPoolStats(
            capacity=self.capacity,
            used=self._used,
            free=self.capacity - self._used,
            largest_free=max((fl.largest for fl in self._free), default=0),
            high_water=self._high_water,
            allocations=len(self._live),
            segments=len(self._segments),
            segment_bytes=self.segment_bytes,
            pinned=self.pinned,
            pin_ms=self.pin_ms,
        )

    def raw_bytes(self, segment: int, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of pinned segment ``segment`` at ``offset``, bypassing the bookkeeping (copy ceilings measured
        on the pool's own memory). Writing it can corrupt live blocks."""
        check_int("segment", segment, 0, len(self._segments) - 1)
        check_int("offset", offset)
        check_int("nbytes", nbytes)
        if offset + nbytes > self._segments[segment].numel():
            raise ConfigError(f"range [{offset}, {offset + nbytes}) exceeds segment {segment}")
        return self._segments[segment][offset : offset + nbytes]

    def blocks(self) -> list[HostBlock]:
        return list(self._live.values())

    def check_invariants(self) -> None:
        """Raise AssertionError unless live blocks and holes tile every segment exactly and the totals balance."""
        for si, fl in enumerate(self._free):
            ranges = sorted([(b.offset, b.size) for b in self._live.values() if b.segment == si] + fl.holes())
            cursor = 0
            for off, size in ranges:
                assert off == cursor and size > 0, f"segment {si}: gap or overlap at {cursor}"
                cursor = off + size
            assert cursor == fl.capacity, f"segment {si}: ranges end at {cursor}, capacity {fl.capacity}"
        assert self._used == sum(b.size for b in self._live.values())
        assert self.capacity - self._used == sum(fl.total for fl in self._free), "accounting does not balance"

    def __repr__(self) -> str:
        s = self.stats
        return f"HostPool({s.used}/{s.capacity} B used, {s.segments} segments, pinned={s.pinned})"


__all__ = ["HostPool", "HostBlock", "HostPoolStats", "DEFAULT_SEGMENT_BYTES"]
