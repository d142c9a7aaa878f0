"""Pinned host pool: host memory pinned once, at creation, in large chunks, then sub-allocated.

Pinning (``cudaHostAlloc`` through ``torch.empty(..., pin_memory=True)``) is slow -- hundreds of milliseconds per GiB
-- so it happens once, in ``chunk_bytes`` pieces, and never per copy. The requested capacity is checked against the
host's available RAM (minus ``reserve_bytes``) *before* anything is pinned, so an impossible pool fails fast with
:class:`~djinn_core.errors.InsufficientHostMemory` instead of driving the host into swap. Pinning time is logged.

Sub-allocation: each chunk has its own first-fit, coalescing free list (:class:`~djinn_core.memory.slab.FreeList`); a block
never spans chunks, so one request can be at most ``chunk_bytes`` (larger requests raise ConfigError naming the
limit -- create the pool with a larger ``chunk_bytes``). Blocks are ``alignment``-aligned.

Fences: a block freed while an in-flight host-to-device copy still reads it is freed with ``after=event``. A later
block overlapping that range carries the pending events in :attr:`HostBlock.fences`; a stream that writes the block
(the swap engine's device-to-host stream) ``wait_event``s on them first, and a CPU writer calls
:meth:`HostBlock.wait_host` (an event wait, not a device-wide synchronize).

Without CUDA (``pin=False``, the default there) chunks are ordinary memory and the same bookkeeping runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from djinn_core.errors import ConfigError, DeviceUnavailable, DoubleFree, HostPoolExhausted, InsufficientHostMemory, UnknownAllocation
from djinn_core.memory.slab import DEFAULT_ALIGNMENT, FreeList, _check_alignment, _check_int, event_pending, tensor_nbytes, typed_view

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 30
DEFAULT_RESERVE_BYTES = 2 << 30  # host RAM left unpinned for the OS, Python and pageable tensors


@dataclass(frozen=True)
class HostPoolStats:
    """Pool occupancy in bytes (aligned sizes). ``largest_free`` is the largest block one request can get now."""

    capacity: int
    used: int
    free: int
    largest_free: int
    high_water: int
    allocations: int
    chunks: int
    chunk_bytes: int
    pinned: bool
    pin_ms: float  # wall time spent pinning at creation


class HostBlock:
    """Handle of one host-pool block. ``view()`` is a CPU tensor (pinned when the pool is) of ``shape`` / ``dtype``.

    ``fences``: CUDA events of in-flight copies still reading this range from an earlier owner; a stream writing the
    block must ``wait_event`` on them, a CPU writer must call :meth:`wait_host` first.
    """

    __slots__ = ("block_id", "chunk", "offset", "size", "nbytes", "shape", "dtype", "fences", "_pool", "_freed", "_view")

    def __init__(self, pool: "HostPool", block_id: int, chunk: int, offset: int, size: int, nbytes: int,
                 shape: tuple[int, ...], dtype: torch.dtype, fences: list[Any]):
        self._pool = pool
        self.block_id = block_id
        self.chunk = chunk
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
            self._view = typed_view(self._pool._chunks[self.chunk], self.offset, self.nbytes, self.shape, self.dtype)
        return self._view

    def data_ptr(self) -> int:
        """The block's host address (no tensor view is made: a copy issued through the CUDA driver needs only this)."""
        if self._freed:
            raise UnknownAllocation(f"host block {self.block_id} was freed")
        return self._pool._chunk_ptrs[self.chunk] + self.offset

    def wait_host(self) -> None:
        """Block the calling thread until no earlier in-flight copy reads this range (per-event waits)."""
        for ev in self.fences:
            ev.synchronize()
        self.fences = []

    def __repr__(self) -> str:
        return (f"HostBlock(id={self.block_id}, chunk={self.chunk}, offset={self.offset}, {tuple(self.shape)}, "
                f"{self.dtype}{', freed' if self._freed else ''})")


class HostPool:
    """Host memory pinned once in chunks of ``chunk_bytes`` and sub-allocated as typed blocks. Not thread-safe.

    Args:
        capacity_bytes: total bytes to pin (rounded up to ``alignment``; the last chunk may be smaller).
        chunk_bytes: bytes per pinned chunk, also the largest single block.
        pin: pin the chunks (default: ``torch.cuda.is_available()``); ``True`` without CUDA raises DeviceUnavailable.
        alignment: block alignment in bytes (power of two).
        reserve_bytes: host RAM that must stay available after pinning (default 2 GiB, capped at a quarter of RAM).
    """

    def __init__(self, capacity_bytes: int, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, pin: bool | None = None,
                 alignment: int = DEFAULT_ALIGNMENT, reserve_bytes: int | None = None):
        _check_int("capacity_bytes", capacity_bytes)
        _check_int("chunk_bytes", chunk_bytes, 1)
        self.alignment = _check_alignment(alignment)
        if chunk_bytes % alignment:
            raise ConfigError(f"chunk_bytes ({chunk_bytes}) must be a multiple of alignment ({alignment})")
        if pin is None:
            pin = torch.cuda.is_available()
        if not isinstance(pin, bool):
            raise ConfigError(f"pin must be a bool or None, got {pin!r}")
        if pin and not torch.cuda.is_available():
            raise DeviceUnavailable("pinning host memory needs CUDA; this machine has no CUDA GPU (use pin=False)")
        self.capacity = -(-capacity_bytes // alignment) * alignment
        self.chunk_bytes = chunk_bytes
        self.pinned = pin
        self._check_host_ram(reserve_bytes)

        sizes = [chunk_bytes] * (self.capacity // chunk_bytes)
        if self.capacity % chunk_bytes:
            sizes.append(self.capacity % chunk_bytes)
        t0 = time.perf_counter()
        self._chunks: list[torch.Tensor] = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n in sizes]
        self._chunk_ptrs: list[int] = [c.data_ptr() for c in self._chunks]
        self.pin_ms = (time.perf_counter() - t0) * 1e3
        gib = self.capacity / 2**30
        log.info("host pool: %s %.3f GiB in %d chunk(s) of %.3f GiB in %.1f ms (%.1f ms/GiB)",
                 "pinned" if pin else "allocated (unpinned)", gib, len(sizes), chunk_bytes / 2**30, self.pin_ms,
                 self.pin_ms / gib if gib else 0.0)
        self._free = [FreeList(n) for n in sizes]
        self._fences: list[list[tuple[int, int, Any]]] = [[] for _ in sizes]  # per chunk: (offset, size, event)
        self._live: dict[int, HostBlock] = {}
        self._next_id = 1
        self._used = 0
        self._high_water = 0

    def _check_host_ram(self, reserve_bytes: int | None) -> None:
        import psutil

        vm = psutil.virtual_memory()
        if reserve_bytes is None:
            reserve_bytes = min(DEFAULT_RESERVE_BYTES, vm.total // 4)
        _check_int("reserve_bytes", reserve_bytes)
        if self.capacity > vm.available - reserve_bytes:
            raise InsufficientHostMemory(
                f"host pool of {self.capacity / 2**30:.2f} GiB does not fit: {vm.available / 2**30:.2f} GiB of host RAM "
                f"available, {reserve_bytes / 2**30:.2f} GiB must stay free (reserve_bytes); nothing was pinned"
            )

    # -- allocation --------------------------------------------------------------------------------------------------
    def aligned_size(self, nbytes: int) -> int:
        _check_int("nbytes", nbytes)
        a = self.alignment
        return max(a, -(-nbytes // a) * a)

    def allocate(self, shape: Sequence[int] | int, dtype: torch.dtype) -> HostBlock:
        """A block for a contiguous ``dtype`` tensor of ``shape`` (contents undefined); first fit over the chunks.

        Raises ConfigError for a block larger than ``chunk_bytes`` and :class:`HostPoolExhausted` (pool unchanged)
        when no chunk has a large enough hole.
        """
        shape_t, nbytes = tensor_nbytes(shape, dtype)
        size = self.aligned_size(nbytes)
        if size > self.chunk_bytes:
            raise ConfigError(
                f"host block of {size} bytes exceeds chunk_bytes={self.chunk_bytes}; blocks never span chunks, "
                f"create the pool with a larger chunk_bytes"
            )
        for ci, fl in enumerate(self._free):
            offset = fl.take(size)
            if offset is not None:
                break
        else:
            raise HostPoolExhausted(size, self.capacity - self._used, self.capacity)
        fences = self._overlapping_fences(ci, offset, size)
        block = HostBlock(self, self._next_id, ci, offset, size, nbytes, shape_t, dtype, fences)
        self._live[block.block_id] = block
        self._next_id += 1
        self._used += size
        self._high_water = max(self._high_water, self._used)
        return block

    def _overlapping_fences(self, chunk: int, offset: int, size: int) -> list[Any]:
        fl = self._fences[chunk]
        if not fl:
            return []
        self._fences[chunk] = fl = [f for f in fl if event_pending(f[2])]
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
        self._free[block.chunk].release(block.offset, block.size)
        self._used -= block.size
        # ``after`` is not queried: callers pass the event of a copy they just issued (pending, or nearly so)
        pending = [ev for ev in block.fences if event_pending(ev)]
        if after is not None:
            pending.append(after)
        self._fences[block.chunk].extend((block.offset, block.size, ev) for ev in pending)

    def fits(self, sizes: Sequence[int]) -> bool:
        """Whether blocks of these byte counts could all be allocated now (first fit, in the given order)."""
        trial = [fl.copy() for fl in self._free]
        for n in sizes:
            size = self.aligned_size(n)
            if size > self.chunk_bytes or not any(t.take(size) is not None for t in trial):
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
            chunks=len(self._chunks),
            chunk_bytes=self.chunk_bytes,
            pinned=self.pinned,
            pin_ms=self.pin_ms,
        )

    def raw_bytes(self, chunk: int, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of pinned chunk ``chunk`` at ``offset``, bypassing the bookkeeping (copy ceilings measured on
        the pool's own memory). Writing it can corrupt live blocks."""
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < len(self._chunks):
            raise ConfigError(f"chunk must be in 0..{len(self._chunks) - 1}, got {chunk!r}")
        _check_int("offset", offset)
        _check_int("nbytes", nbytes)
        if offset + nbytes > self._chunks[chunk].numel():
            raise ConfigError(f"range [{offset}, {offset + nbytes}) exceeds chunk {chunk}")
        return self._chunks[chunk][offset : offset + nbytes]

    def blocks(self) -> list[HostBlock]:
        return list(self._live.values())

    def check_invariants(self) -> None:
        """Raise AssertionError unless live blocks and holes tile every chunk exactly and the totals balance."""
        for ci, fl in enumerate(self._free):
            ranges = sorted([(b.offset, b.size) for b in self._live.values() if b.chunk == ci] + fl.holes())
            cursor = 0
            for off, size in ranges:
                assert off == cursor and size > 0, f"chunk {ci}: gap or overlap at {cursor}"
                cursor = off + size
            assert cursor == fl.capacity, f"chunk {ci}: ranges end at {cursor}, capacity {fl.capacity}"
        assert self._used == sum(b.size for b in self._live.values())
        assert self.capacity - self._used == sum(fl.total for fl in self._free), "accounting does not balance"

    def __repr__(self) -> str:
        s = self.stats
        return f"HostPool({s.used}/{s.capacity} B used, {s.chunks} chunks, pinned={s.pinned})"


__all__ = ["HostPool", "HostBlock", "HostPoolStats", "DEFAULT_CHUNK_BYTES"]
