"""GPU slab: one buffer reserved up front, handed out as typed, contiguous tensor views.

Two layers, kept apart as in vLLM's block manager / cache engine:

* :class:`SlabBookkeeper` (pure Python, no torch) decides *where* each allocation lives: byte offsets, a coalesced
  free list of holes, first-fit placement, and compaction plans. It is testable on any machine.
* :class:`Slab` owns the bytes (one ``torch.uint8`` buffer on the device), executes compaction moves as device
  copies on the current stream, and hands out :class:`SlabTensor` handles.

Placement policy: **compaction, not pages.** Every allocation is one contiguous, ``alignment``-aligned byte range, so
a per-layer KV tensor ``(batch, kv_heads, capacity, head_dim)`` is a single dense view that attention kernels accept.
First-fit over holes; when no hole is large enough but the free total is, allocations are slid towards offset 0
(lowest first) until a hole of the requested size opens, then the allocation is placed there. Hence an allocation
never fails while its aligned size fits in the free total (:class:`~djinn_core.errors.SlabExhausted` otherwise).

Because compaction moves allocations, a :class:`SlabTensor` is a *handle*: call :meth:`SlabTensor.view` each time
the tensor is needed and never hold a view across another :meth:`Slab.allocate` call (``Slab.generation`` counts
compactions; a view taken at one generation is valid until the next).

Stream semantics (CUDA): compaction copies and fence waits run on the *current* stream of the slab's device. Memory
still touched by an in-flight asynchronous copy (e.g. a swap-out reading a freed allocation, a swap-in writing a live
one) carries a *fence* event (:meth:`Slab.fence`, ``Slab.free(..., after=event)``). A new allocation overlapping a
fenced range, or a compaction move touching one, makes the current stream ``wait_event`` on it first -- the host
never blocks, and nothing here calls ``torch.cuda.synchronize()``. On a CPU device copies are synchronous and there
are no fences; the bookkeeping is identical.
"""

from __future__ import annotations

import bisect
import enum
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from djinn_core.errors import ConfigError, DeviceUnavailable, DoubleFree, SlabExhausted, UnknownAllocation
from djinn_core.validation import check_int, check_number, is_int

log = logging.getLogger(__name__)

DEFAULT_ALIGNMENT = 256  # bytes; also the minimum size of an allocation
STAGING_BYTES = 64 << 20  # bound on the staging buffer used to move an allocation onto an overlapping range


class Admission(enum.Enum):
    """Three-way admission answer (vLLM's ``AllocStatus``)."""

    OK = "ok"  # fits in free memory now (compaction may run)
    LATER = "later"  # fits in the whole capacity, after something is freed or evicted
    NEVER = "never"  # larger than the whole capacity


@dataclass(frozen=True)
class Move:
    """One compaction step: copy ``nbytes`` of allocation ``alloc_id`` from offset ``src`` to ``dst`` (``dst < src``)."""

    alloc_id: int
    src: int
    dst: int
    nbytes: int


@dataclass(frozen=True)
class SlabStats:
    """Slab occupancy in bytes (aligned sizes). ``high_water`` is the largest ``used`` ever seen."""

    capacity: int
    used: int
    free: int
    largest_free: int
    high_water: int
    allocations: int
    compactions: int = 0
    moved_bytes: int = 0  # bytes copied by compaction, in total


def check_alignment(alignment: Any) -> int:
    """``alignment`` if it is a power of two (bytes), else ConfigError."""
    check_int("alignment", alignment, 1)
    if alignment & (alignment - 1):
        raise ConfigError(f"alignment must be a power of two, got {alignment}")
    return alignment




class FreeList:
    """Coalesced holes ``[offset, offset + size)`` inside ``[0, capacity)``, sorted by offset; first-fit placement.

    Pure bookkeeping, shared by :class:`SlabBookkeeper` and the host pool's chunks. Sizes are whatever unit the caller
    uses (bytes here); the caller is responsible for alignment.
    """

    __slots__ = ("capacity", "_offs", "_sizes", "total")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._offs: list[int] = [0] if capacity > 0 else []
        self._sizes: list[int] = [capacity] if capacity > 0 else []
        self.total = capacity

    def first_fit(self, size: int) -> int | None:
        """Offset of the lowest hole of at least ``size`` bytes, or None. Does not modify the list."""
        for off, sz in zip(self._offs, self._sizes):
            if sz >= size:
                return off
        return None

    def take(self, size: int) -> int | None:
        """Carve ``size`` bytes from the lowest hole that holds them; return the offset, or None if no hole does."""
        for i, sz in enumerate(self._sizes):
            if sz >= size:
                off = self._offs[i]
                if sz == size:
                    del self._offs[i], self._sizes[i]
                else:
                    self._offs[i] = off + size
                    self._sizes[i] = sz - size
                self.total -= size
                return off
        return None

    def release(self, offset: int, size: int) -> None:
        """Return ``[offset, offset + size)`` to the list, merging with adjacent holes."""
        if size <= 0:
            return
        i = bisect.bisect_left(self._offs, offset)
        prev_end = self._offs[i - 1] + self._sizes[i - 1] if i > 0 else 0
        next_off = self._offs[i] if i < len(self._offs) else self.capacity
        if offset < prev_end or offset + size > next_off:
            raise AssertionError(f"release of [{offset}, {offset + size}) overlaps a hole (free list corrupted)")
        merge_prev = i > 0 and prev_end == offset
        merge_next = i < len(self._offs) and next_off == offset + size
        if merge_prev and merge_next:
            self._sizes[i - 1] += size + self._sizes[i]
            del self._offs[i], self._sizes[i]
        elif merge_prev:
            self._sizes[i - 1] += size
        elif merge_next:
            self._offs[i] = offset
            self._sizes[i] += size
        else:
            self._offs.insert(i, offset)
            self._sizes.insert(i, size)
        self.total += size

    def reset(self, taken: Iterable[tuple[int, int]]) -> None:
        """Rebuild the holes as the complement of the ``(offset, size)`` ranges in ``taken`` (non-overlapping)."""
        self._offs, self._sizes = [], []
        cursor = 0
        for off, size in sorted(taken):
            if off > cursor:
                self._offs.append(cursor)
                self._sizes.append(off - cursor)
            cursor = off + size
        if cursor < self.capacity:
            self._offs.append(cursor)
            self._sizes.append(self.capacity - cursor)
        self.total = sum(self._sizes)

    @property
    def largest(self) -> int:
        return max(self._sizes, default=0)

    def copy(self) -> "FreeList":
        other = FreeList(self.capacity)
        other._offs, other._sizes, other.total = list(self._offs), list(self._sizes), self.total
        return other

    def holes(self) -> list[tuple[int, int]]:
        return list(zip(self._offs, self._sizes))


class SlabBookkeeper:
    """Offsets only: which byte range each allocation owns. No torch, no device; testable anywhere.

    Sizes are rounded up to ``alignment`` (and at least one ``alignment`` unit, so a zero-byte allocation still has a
    distinct offset). ``capacity_bytes`` is rounded down to a multiple of ``alignment``. Allocation ids are positive
    ints, never reused, so a stale id is told apart from a foreign one: freeing an id twice raises
    :class:`DoubleFree`, an id never issued raises :class:`UnknownAllocation`.
    """

    def __init__(self, capacity_bytes: int, alignment: int = DEFAULT_ALIGNMENT):
        check_int("capacity_bytes", capacity_bytes)
        self.alignment = check_alignment(alignment)
        self.capacity = capacity_bytes - capacity_bytes % alignment
        self._free = FreeList(self.capacity)
        self._live: dict[int, tuple[int, int]] = {}  # alloc_id -> (offset, aligned size)
        self._next_id = 1
        self._used = 0
        self._high_water = 0
        self.compactions = 0
        self.moved_bytes = 0

    # -- sizes -------------------------------------------------------------------------------------------------------
    def aligned_size(self, nbytes: int) -> int:
        """Bytes an allocation of ``nbytes`` occupies: rounded up to ``alignment``, at least ``alignment``."""
        if nbytes.__class__ is not int or nbytes < 0:  # NOTE: the fast test first: every allocation comes here
            check_int("nbytes", nbytes)
        a = self.alignment
        return max(a, -(-nbytes // a) * a)

    # -- allocation --------------------------------------------------------------------------------------------------
    def allocate(self, nbytes: int) -> tuple[int, int, list[Move]]:
        """Place ``nbytes`` (aligned); return ``(alloc_id, offset, moves)``.

        ``moves`` are the compaction steps the byte owner must execute, in order, *before* using the new range
        (empty when a hole fits). Raises :class:`SlabExhausted` (nothing changed) when the aligned size exceeds the
        free total.
        """
        size = self.aligned_size(nbytes)
        if size > self._free.total:
            raise SlabExhausted(size, self._free.total, self.capacity)
        moves: list[Move] = []
        offset = self._free.take(size)
        if offset is None:
            moves = self._compact(size)
            offset = self._free.take(size)
            if offset is None:  # pragma: no cover - _compact guarantees a hole
                raise AssertionError("compaction did not open a hole")
        alloc_id = self._next_id
        self._next_id += 1
        self._live[alloc_id] = (offset, size)
        self._used += size
        self._high_water = max(self._high_water, self._used)
        return alloc_id, offset, moves

    def _compact(self, size: int) -> list[Move]:
        """Slide allocations down, lowest first, until a hole of ``size`` bytes opens; return the moves made.

        Sliding stops at the first allocation preceded by a hole already large enough, so only the allocations below
        the opened hole move. Every move has ``dst < src`` (possibly overlapping its own source range).
        """
        moves: list[Move] = []
        cursor = 0
        for alloc_id, (off, sz) in sorted(self._live.items(), key=lambda kv: kv[1][0]):
            if off - cursor >= size:
                break
            if off != cursor:
                moves.append(Move(alloc_id, off, cursor, sz))
                self._live[alloc_id] = (cursor, sz)
            cursor += sz
        self._free.reset(self._live.values())
        self.compactions += 1
        self.moved_bytes += sum(m.nbytes for m in moves)
        return moves

    def free(self, alloc_id: int) -> None:
        """Release an allocation. :class:`DoubleFree` if already freed, :class:`UnknownAllocation` if never issued."""
        rec = self._live.pop(alloc_id, None) if isinstance(alloc_id, int) else None
        if rec is None:
            if is_int(alloc_id) and 0 < alloc_id < self._next_id:
                raise DoubleFree(f"slab allocation {alloc_id} freed twice")
            raise UnknownAllocation(f"slab allocation {alloc_id!r} was never issued by this slab")
        offset, size = rec
        self._free.release(offset, size)
        self._used -= size

    def admit(self, nbytes: int) -> Admission:
        """OK if ``nbytes`` (aligned) fits in free memory now, LATER if it fits in the capacity, NEVER otherwise."""
        size = self.aligned_size(nbytes)
        if size > self.capacity:
            return Admission.NEVER
        return Admission.OK if size <= self._free.total else Admission.LATER

    # -- queries -----------------------------------------------------------------------------------------------------
    def offset(self, alloc_id: int) -> int:
        """Current byte offset of a live allocation (changes on compaction)."""
        return self._record(alloc_id)[0]

    def size(self, alloc_id: int) -> int:
        """Aligned size in bytes of a live allocation."""
        return self._record(alloc_id)[1]

    def _record(self, alloc_id: int) -> tuple[int, int]:
        try:
            return self._live[alloc_id]
        except (KeyError, TypeError):
            raise UnknownAllocation(f"slab allocation {alloc_id!r} is not live") from None

    def is_live(self, alloc_id: int) -> bool:
        return alloc_id in self._live

    def live(self) -> dict[int, tuple[int, int]]:
        """A copy of ``{alloc_id: (offset, aligned size)}``."""
        return dict(self._live)

    def holes(self) -> list[tuple[int, int]]:
        return self._free.holes()

    @property
    def free_bytes(self) -> int:
        """Free total (O(1); :attr:`stats` also finds the largest hole)."""
        return self._free.total

    @property
    def stats(self) -> SlabStats:
        return SlabStats(
            capacity=self.capacity,
            used=self._used,
            free=self._free.total,
            largest_free=self._free.largest,
            high_water=self._high_water,
            allocations=len(self._live),
            compactions=self.compactions,
            moved_bytes=self.moved_bytes,
        )

    def check_invariants(self) -> None:
        """Raise AssertionError unless allocations and holes tile ``[0, capacity)`` exactly, aligned, without overlap."""
        ranges = sorted([(o, s, "a") for o, s in self._live.values()] + [(o, s, "h") for o, s in self.holes()])
        cursor = 0
        prev_kind = None
        for off, size, kind in ranges:
            assert off == cursor, f"gap or overlap at {cursor}: next range starts at {off}"
            assert size > 0 and off % self.alignment == 0 and size % self.alignment == 0, (off, size)
            assert not (kind == "h" and prev_kind == "h"), f"uncoalesced holes at {off}"
            cursor, prev_kind = off + size, kind
        assert cursor == self.capacity, f"ranges end at {cursor}, capacity {self.capacity}"
        used = sum(s for _, s in self._live.values())
        assert used == self._used and self._free.total == self.capacity - used, "accounting does not balance"


# -------------------------------------------------------------------------------------------------------------------
# bytes


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` -> the current CUDA device, or the CPU without CUDA. Raises DeviceUnavailable for CUDA without CUDA."""
    if device is None:
        return _default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"not a device: {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {dev} requested but this machine has no CUDA GPU")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ConfigError(f"the memory layer supports cuda and cpu devices, got {dev}")
    return dev


def tensor_nbytes(shape: Sequence[int] | int, dtype: torch.dtype) -> tuple[tuple[int, ...], int]:
    """Validate ``(shape, dtype)``; return ``(shape tuple, bytes)``."""
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype must be a torch.dtype, got {dtype!r}")
    if is_int(shape):
        shape = (shape,)
    try:
        shape_t = tuple(shape)
    except TypeError:
        raise ConfigError(f"shape must be a sequence of ints, got {shape!r}") from None
    for d in shape_t:
        if d.__class__ is not int and not is_int(d) or d < 0:  # NOTE: the fast test first (every allocation)
            raise ConfigError(f"shape must be a sequence of ints >= 0, got {shape!r}")
    return shape_t, math.prod(shape_t) * dtype.itemsize


def typed_view(buffer: torch.Tensor, offset: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``buffer[offset:offset+nbytes]`` (a uint8 tensor) reinterpreted as a contiguous ``dtype`` tensor of ``shape``."""
    t = buffer[offset : offset + nbytes]
    if dtype != torch.uint8:
        t = t.view(dtype)
    return t if len(shape) == 1 and shape[0] == t.shape[0] else t.view(shape)


def event_pending(event: Any) -> bool:
    """True while a CUDA event has been recorded and has not completed (a non-blocking query)."""
    return event is not None and not event.query()


class SlabTensor:
    """Handle of one slab allocation. Call :meth:`view` each time you need the tensor (compaction may move it).

    Attributes: ``alloc_id`` (int), ``nbytes`` (requested bytes), ``shape``, ``dtype``, ``tag`` (free text).
    """

    __slots__ = ("alloc_id", "nbytes", "shape", "dtype", "tag", "_slab", "_freed", "_cache_gen", "_cache")

    def __init__(self, slab: "Slab", alloc_id: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype,
                 tag: str | None):
        self._slab = slab
        self.alloc_id = alloc_id
        self.nbytes = nbytes
        self.shape = shape
        self.dtype = dtype
        self.tag = tag
        self._freed = False
        self._cache_gen = -1
        self._cache: torch.Tensor | None = None

    @property
    def slab(self) -> "Slab":
        return self._slab

    @property
    def alive(self) -> bool:
        return not self._freed

    @property
    def offset(self) -> int:
        """Current byte offset in the slab buffer (changes on compaction)."""
        if self._freed:
            raise UnknownAllocation(f"slab tensor {self.alloc_id} ({self.tag}) was freed")
        return self._slab._book.offset(self.alloc_id)

    def view(self) -> torch.Tensor:
        """The allocation as a contiguous ``dtype`` tensor of ``shape`` on the slab's device.

        Valid until the next :meth:`Slab.allocate` (which may compact); take a fresh view after it.
        """
        if self._freed:
            raise UnknownAllocation(f"slab tensor {self.alloc_id} ({self.tag}) was freed")
        gen = self._slab.generation
        if self._cache_gen != gen or self._cache is None:
            self._cache = typed_view(self._slab._buffer, self._slab._book.offset(self.alloc_id), self.nbytes,
                                     self.shape, self.dtype)
            self._cache_gen = gen
        return self._cache

    def __repr__(self) -> str:
        state = "freed" if self._freed else f"offset={self._slab._book.offset(self.alloc_id)}"
        return f"SlabTensor(id={self.alloc_id}, {tuple(self.shape)}, {self.dtype}, {self.nbytes} B, {state}, tag={self.tag!r})"


class Slab:
    """One pre-allocated ``torch.uint8`` buffer on ``device``, sub-allocated as contiguous typed views.

    Not thread-safe: one owner (the session manager or the server loop) calls it.
    """

    def __init__(self, capacity_bytes: int, device: torch.device | str | None = None,
                 alignment: int = DEFAULT_ALIGNMENT):
        self._book = SlabBookkeeper(capacity_bytes, alignment)
        self.device = resolve_device(device)
        self._buffer = torch.empty(self._book.capacity, dtype=torch.uint8, device=self.device)
        self.generation = 0  # incremented by every compaction that moved something
        self._handles: dict[int, SlabTensor] = {}
        # fences: CUDA events after which a range is no longer touched by an in-flight copy
        self._alloc_fences: dict[int, list[Any]] = {}
        self._free_fences: list[tuple[int, int, Any]] = []  # (offset, size, event) of freed ranges
        self._prune_at = 64
        # bumped whenever the slab issues work on the current stream (compaction copies, fence waits): a side stream
        # that writes slab memory must wait_stream(current) again after it changes
        self.stream_epoch = 0
        # frees without an ``after`` event (CUDA): a side stream writing freed bytes must first wait for the current
        # stream unless it did so since the count it last saw
        self.unfenced_frees = 0
        log.info("slab: %.3f GiB on %s (alignment %d B)", self._book.capacity / 2**30, self.device, alignment)

    @classmethod
    def from_free_memory(cls, fraction: float, headroom_bytes: int, device: torch.device | str | None = None,
                         alignment: int = DEFAULT_ALIGNMENT) -> "Slab":
        """Reserve ``min(fraction * free, free - headroom_bytes)`` bytes of the device's currently free memory.

        ``headroom_bytes`` is left for activations and the torch caching allocator. On the CPU, "free" is the host's
        available RAM (psutil). Raises ConfigError when nothing would be left to reserve.
        """
        check_number("fraction", fraction, 0.0, 1.0, strict_minimum=True)
        check_int("headroom_bytes", headroom_bytes)
        dev = resolve_device(device)
        if dev.type == "cuda":
            free, _total = torch.cuda.mem_get_info(dev)
        else:
            import psutil

            free = psutil.virtual_memory().available
        capacity = min(int(free * fraction), free - headroom_bytes)
        capacity -= capacity % alignment if capacity > 0 else 0
        if capacity <= 0:
            raise ConfigError(
                f"no slab left to reserve on {dev}: {free} bytes free, headroom {headroom_bytes} bytes, "
                f"fraction {fraction}"
            )
        return cls(capacity, dev, alignment)

    # -- properties --------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._book.capacity

    @property
    def alignment(self) -> int:
        return self._book.alignment

    def raw_bytes(self, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the underlying uint8 buffer at ``offset``, bypassing the bookkeeping (copy ceilings measured
        on the slab's own memory, diagnostics). Writing it can corrupt live allocations."""
        check_int("offset", offset)
        check_int("nbytes", nbytes)
        if offset + nbytes > self.capacity:
            raise ConfigError(f"range [{offset}, {offset + nbytes}) exceeds the slab capacity {self.capacity}")
        return self._buffer[offset : offset + nbytes]

    @property
    def bookkeeper(self) -> SlabBookkeeper:
        return self._book

    @property
    def stats(self) -> SlabStats:
        return self._book.stats

    @property
    def free_bytes(self) -> int:
        """Free total in bytes, O(1) (with compaction, any allocation up to it succeeds)."""
        return self._book.free_bytes

    def aligned_size(self, nbytes: int) -> int:
        return self._book.aligned_size(nbytes)

    def admit(self, nbytes: int) -> Admission:
        return self._book.admit(nbytes)

    def admit_tensor(self, shape: Sequence[int] | int, dtype: torch.dtype) -> Admission:
        return self._book.admit(tensor_nbytes(shape, dtype)[1])

    # -- allocation --------------------------------------------------------------------------------------------------
    def allocate(self, shape: Sequence[int] | int, dtype: torch.dtype, *, tag: str | None = None,
                 fences: list[Any] | None = None) -> SlabTensor:
        """Allocate a contiguous ``dtype`` tensor of ``shape`` (contents undefined).

        Stream: any compaction copies and fence waits are issued on the current stream of the slab's device; the
        range is usable by work issued on that stream afterwards. Raises :class:`SlabExhausted` (slab unchanged) when
        the aligned size exceeds the free total.

        ``fences``: a list that receives the fence events of freed ranges the new one overlaps, instead of the
        current stream waiting for the pending ones. No event is queried (no driver call); the caller makes the
        stream that first writes the range wait for each of them (a restore does so with the one wait it needs
        anyway). Compaction, if any, still runs on the current stream.
        """
        shape_t, nbytes = tensor_nbytes(shape, dtype)
        if tag is not None and not isinstance(tag, str):
            raise ConfigError(f"tag must be a str or None, got {tag!r}")
        alloc_id, offset, moves = self._book.allocate(nbytes)
        if moves:
            self._execute_moves(moves)
        if self._free_fences:
            if fences is None:
                self._wait_free_fences(((offset, self._book.size(alloc_id)),))
            else:
                fences.extend(self._take_fences(((offset, self._book.size(alloc_id)),)))
        handle = SlabTensor(self, alloc_id, nbytes, shape_t, dtype, tag)
        self._handles[alloc_id] = handle
        return handle

    def free(self, t: SlabTensor, *, after: Any = None) -> None:
        """Release ``t``. ``after``: a CUDA event after which no in-flight copy touches its bytes (a fence).

        The range is not handed out to a stream that has not waited for that event (and for fences already attached
        to ``t`` by :meth:`fence`). Raises :class:`DoubleFree` or :class:`UnknownAllocation`.
        """
        if not isinstance(t, SlabTensor) or t._slab is not self:
            raise UnknownAllocation(f"{t!r} was not allocated by this slab")
        if t._freed:
            raise DoubleFree(f"slab tensor {t.alloc_id} ({t.tag}) freed twice")
        offset, size = self._book.offset(t.alloc_id), self._book.size(t.alloc_id)
        self._book.free(t.alloc_id)
        t._freed = True
        t._cache = None
        del self._handles[t.alloc_id]
        fences = self._alloc_fences.pop(t.alloc_id, [])
        if after is not None:
            fences.append(after)
        elif self.device.type == "cuda":
            self.unfenced_frees += 1  # its last users may still be queued on the current stream
        for ev in fences:
            if event_pending(ev):
                last = self._free_fences[-1] if self._free_fences else None
                if last is not None and last[2] is ev and last[0] + last[1] == offset:  # one swap's adjacent ranges
                    self._free_fences[-1] = (last[0], last[1] + size, ev)
                else:
                    self._free_fences.append((offset, size, ev))
        if len(self._free_fences) > self._prune_at:
            self._prune_free_fences()

    def fence(self, t: SlabTensor, event: Any) -> None:
        """Record that an in-flight copy touches ``t`` until ``event`` completes (compaction will wait for it)."""
        if not isinstance(t, SlabTensor) or t._slab is not self or t._freed:
            raise UnknownAllocation(f"{t!r} is not a live allocation of this slab")
        if event is None:
            return
        fences = self._alloc_fences.setdefault(t.alloc_id, [])
        fences[:] = [e for e in fences if event_pending(e)]
        fences.append(event)

    def tensors(self) -> list[SlabTensor]:
        """Live handles, in allocation order."""
        return list(self._handles.values())

    # -- compaction --------------------------------------------------------------------------------------------------
    def _current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def _wait_free_fences(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Make the current stream wait for every pending fence of a freed range overlapping ``ranges``; those
        fences are consumed for the overlapping bytes (see :meth:`_take_fences`)."""
        for ev in self._take_fences(ranges):
            if event_pending(ev):
                self._current_stream().wait_event(ev)
                self.stream_epoch += 1

    def _take_fences(self, ranges: Iterable[tuple[int, int]]) -> list[Any]:
        """Remove the parts of freed-range fences that overlap ``ranges``; return their events (each once).

        The caller makes the stream that uses those bytes wait for the events, so a fence is needed only once: when
        the bytes are freed again, their new fence is recorded after that stream's use. Without consuming them,
        repeated pause/restore of one session would stack a fence per cycle on the same bytes. No event is queried.
        """
        events: list[Any] = []
        for lo, n in ranges:
            hi = lo + n
            kept: list[tuple[int, int, Any]] = []
            for entry in self._free_fences:
                off, size, ev = entry
                end = off + size
                if off >= hi or lo >= end:  # a plain loop: this runs on a restore's critical path
                    kept.append(entry)
                    continue
                if all(ev is not e for e in events):
                    events.append(ev)
                if off < lo:
                    kept.append((off, lo - off, ev))
                if hi < end:
                    kept.append((hi, end - hi, ev))
            self._free_fences = kept
        return events

    def _prune_free_fences(self) -> None:
        self._free_fences = [f for f in self._free_fences if event_pending(f[2])]
        self._prune_at = max(64, 2 * len(self._free_fences))

    def _execute_moves(self, moves: list[Move]) -> None:
        """Copy each moved allocation to its new offset, in order, on the current stream (after its fences)."""
        for m in moves:  # fences only exist on CUDA (events); on the CPU these loops find none
            for ev in self._alloc_fences.get(m.alloc_id, ()):
                if event_pending(ev):
                    self._current_stream().wait_event(ev)
        if self._free_fences:
            self._wait_free_fences([(m.dst, m.nbytes) for m in moves])
        buf = self._buffer
        for m in moves:
            gap = m.src - m.dst
            if gap >= m.nbytes:  # disjoint ranges: one copy
                buf[m.dst : m.dst + m.nbytes].copy_(buf[m.src : m.src + m.nbytes])
                continue
            # overlapping slide down: chunks through a staging buffer, lowest first. Chunk k's destination ends
            # below chunk k's source end, so it only overwrites source bytes already read into staging.
            step = min(m.nbytes, STAGING_BYTES)
            staging = torch.empty(step, dtype=torch.uint8, device=self.device)
            for k in range(0, m.nbytes, step):
                n = min(step, m.nbytes - k)
                staging[:n].copy_(buf[m.src + k : m.src + k + n])
                buf[m.dst + k : m.dst + k + n].copy_(staging[:n])
        self.generation += 1
        self.stream_epoch += 1
        log.debug("slab compaction: %d moves, %d bytes, generation %d", len(moves),
                  sum(m.nbytes for m in moves), self.generation)
