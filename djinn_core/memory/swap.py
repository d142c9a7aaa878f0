"""Swap engine: moves a session's named slab tensors to the host pool and back, asynchronously, item by item.

Streams (CUDA): one side stream per direction -- ``out_stream`` for device-to-host (D2H), ``in_stream`` for
host-to-device (H2D) -- so a swap-out can overlap a swap-in and both overlap compute. Every item is issued as *one*
copy (a per-layer K or V tensor is tens of MiB, enough to run PCIe at its peak) and gets its own CUDA event.

Ordering, all by events and ``wait_event`` / ``wait_stream`` (never a device-wide synchronize):

* swap-out: the host blocks are checked to fit first (all or nothing). The out stream waits for the current (compute)
  stream, so it copies finished data, and for any fence on the host blocks it writes. The source slab range is then
  freed with ``after=event`` (or fenced, with ``free_source=False``), so the slab hands it out again only to streams
  that waited for the copy. With driver copies each item also gets its swap-in event here (``in_event``).
* swap-in: the total is checked against the slab's free bytes first (with compaction every allocation then succeeds,
  so a swap-in is all or nothing). Destinations are allocated first; an allocation may queue compaction moves on the
  current stream, and whenever the slab queued such work (``Slab.stream_epoch``) the in stream ``wait_stream``s the
  current stream. The fences of the freed ranges a destination reuses are handed over (``Slab.allocate(fences=)``),
  not queried: the in stream waits for each of them and for the item's swap-out event, then copies. Each destination
  is fenced with its event (a later compaction waits for it) and each host block is freed with ``after=event``.
  A consumer calls :meth:`ResidentState.wait` ``(name)`` to make the *current* stream wait for that item only, so
  layer 0 can be used while later layers are still in flight.
* one item for the current stream's next work (``swap_in_now``, a restore's packed head): the allocation hands its
  fences to the caller instead of querying them, the in stream waits for each distinct one and the item's D2H event
  (one event when the item was the last of its swap-out), and for the whole current stream only when the allocation
  queued work there or slab memory was freed without a fence since it last did (``Slab.unfenced_frees``); then the
  copy, and the current stream waits for it. The fewest host calls before the copy.
* one item into a buffer prepared beforehand (``swap_in_into``, the runtime's spare head): the current stream waits
  for the buffer's handed-over fences and the item's D2H event, then copies. Where the CUDA driver can be called
  (``driver``, :mod:`djinn_core.memory.cuda_driver`), those waits, the copy and the ready event's record are driver calls on
  the raw handles, which cost the host a fraction of ``Tensor.copy_``; the stream order is the same.
* Slab and host memory are owned by long-lived buffers (the slab buffer, the pinned chunks), so no caching-allocator
  block crosses streams; lifetimes of reused ranges are governed by the fences above.

Checksums (debug mode, ``checksums=True``): a position-weighted int64 checksum of each item's bytes is computed on the
device on the copying stream before the D2H copy and after the H2D copy; :meth:`ResidentState.wait` (and
:meth:`ResidentState.verify`) then block the host on that item's events and raise
:class:`~djinn_core.errors.ChecksumMismatch` on a difference. Off by default: it costs host syncs.

On a CPU slab, copies are synchronous, events are ``None`` and waits are no-ops; the bookkeeping is identical.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from djinn_core.memory.cuda_driver import DriverCopier, driver_copier
from djinn_core.errors import (ChecksumMismatch, CheckpointStateError, ConfigError, DeviceUnavailable, HostPoolExhausted,
                     SlabExhausted, UnknownAllocation)
from djinn_core.memory.host_pool import HostBlock, HostPool
from djinn_core.memory.slab import Slab, SlabTensor

log = logging.getLogger(__name__)

_CHECKSUM_MODULUS = 65521  # largest prime < 2**16: position weights 1..65521


def checksum(t: torch.Tensor) -> torch.Tensor:
    """Position-weighted checksum of a contiguous tensor's bytes: an int64 tensor ``[sum(w), sum(w * (i % M + 1))]``.

    Words are int32 when the byte count allows (uint8 otherwise); sums wrap modulo 2**64, which is associative, so the
    result does not depend on reduction order or device. Runs on the current stream of ``t``'s device.
    """
    b = t.reshape(-1).view(torch.uint8)
    w = (b.view(torch.int32) if b.numel() % 4 == 0 else b).to(torch.int64)
    pos = torch.arange(w.numel(), dtype=torch.int64, device=w.device).remainder_(_CHECKSUM_MODULUS).add_(1)
    return torch.stack([w.sum(), (w * pos).sum()])


@dataclass
class SwappedItem:
    """One item in the host pool. ``event``: recorded on the out stream after its D2H copy (None on the CPU)."""

    name: str
    block: HostBlock
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    tag: str | None
    event: Any = None
    checksum: torch.Tensor | None = None  # on the device, written on the out stream before ``event``
    # with driver copies: an event whose driver object exists already (made at swap-out), recorded by the swap-in
    # through the driver after the item's H2D copy -- no event creation on the restore's path
    in_event: Any = None


class SwappedState:
    """A set of named items living in the host pool (the result of :meth:`SwapEngine.swap_out`).

    ``items`` keeps insertion order. :meth:`SwapEngine.swap_in` removes the items it brings back; once empty the
    state is consumed. :meth:`SwapEngine.release` discards it.
    """

    def __init__(self, engine: "SwapEngine", items: dict[str, SwappedItem]):
        self._engine = engine
        self.items = items

    @property
    def names(self) -> list[str]:
        return list(self.items)

    @property
    def nbytes(self) -> int:
        """Requested bytes of all items (unaligned)."""
        return sum(it.nbytes for it in self.items.values())

    def slab_bytes(self, names: Iterable[str] | None = None) -> int:
        """Aligned slab bytes the items (all, or ``names``) need when swapped back in."""
        names = self.items if names is None else names
        return sum(self._engine.slab.aligned_size(self.items[n].nbytes) for n in names)

    def __contains__(self, name: object) -> bool:
        return name in self.items

    def __len__(self) -> int:
        return len(self.items)

    def wait(self, name: str | None = None) -> None:
        """Make the current stream wait for the D2H copy of ``name`` (all items when None). Non-blocking."""
        for it in self._select(name):
            if it.event is not None:
                torch.cuda.current_stream(self._engine.device).wait_event(it.event)

    def wait_host(self, name: str | None = None) -> None:
        """Block the host until the D2H copy of ``name`` (all when None) is done, e.g. before reading ``host_view``."""
        for it in self._select(name):
            if it.event is not None:
                it.event.synchronize()

    def host_view(self, name: str) -> torch.Tensor:
        """The host copy of ``name`` (a CPU tensor; call :meth:`wait_host` before reading it)."""
        return self._select(name)[0].block.view()

    def is_complete(self) -> bool:
        """True when every D2H copy has finished (non-blocking query)."""
        return all(it.event is None or it.event.query() for it in self.items.values())

    def absorb(self, other: "SwappedState") -> None:
        """Move every item of ``other`` (same engine, disjoint names) into this state; ``other`` becomes empty."""
        if not isinstance(other, SwappedState) or other._engine is not self._engine:
            raise ConfigError("can only absorb a swapped state of the same engine")
        clash = set(self.items) & set(other.items)
        if clash:
            raise ConfigError(f"swapped states share item names {sorted(clash)}")
        self.items.update(other.items)
        other.items = {}

    def _select(self, name: str | None) -> list[SwappedItem]:
        if name is None:
            return list(self.items.values())
        if name not in self.items:
            raise UnknownAllocation(f"no item {name!r} in this swapped state (has {self.names})")
        return [self.items[name]]

    def __repr__(self) -> str:
        return f"SwappedState({len(self.items)} items, {self.nbytes} B)"


@dataclass
class ResidentState:
    """Items brought back into the slab by :meth:`SwapEngine.swap_in`.

    ``tensors[name]`` is the slab handle; ``events[name]`` is recorded on the in stream after its H2D copy (None when
    nothing is in flight). ``pending`` is the rest of the swapped state when only some items were swapped in.
    """

    tensors: dict[str, SlabTensor]
    events: dict[str, Any] = field(default_factory=dict)
    pending: SwappedState | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # name -> (checksum before swap-out, its event, checksum after swap-in, its event); debug mode only
    _checks: dict[str, tuple[torch.Tensor, Any, torch.Tensor, Any]] = field(default_factory=dict, repr=False)
    # the engine's driver copier: waits go through the driver (a decode step waits once per restored layer)
    _driver: DriverCopier | None = field(default=None, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def wait(self, name: str) -> None:
        """Make the current stream wait until ``name`` has arrived (non-blocking, except in checksum mode)."""
        if name not in self.tensors:
            raise UnknownAllocation(f"no item {name!r} in this resident state (has {self.names})")
        ev = self.events.get(name)
        if ev is not None:
            drv = self._driver
            if drv is not None:
                drv.wait(drv.current_stream(), ev.cuda_event)
            else:
                torch.cuda.current_stream(self.device).wait_event(ev)
        if name in self._checks:
            self.verify([name])

    def wait_all(self) -> None:
        """:meth:`wait` for every item."""
        for name in self.tensors:
            self.wait(name)

    def is_ready(self, name: str) -> bool:
        """Whether ``name``'s copy has finished (non-blocking query)."""
        ev = self.events.get(name)
        return ev is None or bool(ev.query())

    def verify(self, names: Sequence[str] | None = None) -> None:
        """Debug mode: block on the items' events and compare checksums; raise :class:`ChecksumMismatch`."""
        for name in list(self._checks if names is None else names):
            check = self._checks.pop(name, None)
            if check is None:
                continue
            before, ev_before, after, ev_after = check
            for ev in (ev_before, ev_after):
                if ev is not None:
                    ev.synchronize()
            b, a = before.cpu().tolist(), after.cpu().tolist()
            if b != a:
                raise ChecksumMismatch(f"item {name!r}: checksum {b} before swap-out, {a} after swap-in")


@dataclass(frozen=True)
class SwapStats:
    """Bytes (requested, unaligned) and item counts moved since creation."""

    bytes_out: int
    bytes_in: int
    items_out: int
    items_in: int
    swaps_out: int
    swaps_in: int


@dataclass
class SwapRecord:
    """One swap's copies on its side stream, for per-event latency: ``start`` is recorded on the stream right before
    its first copy, ``end`` after its last (CUDA events with timing; None on the CPU)."""

    direction: str  # "out" (device to host) or "in"
    nbytes: int
    items: int
    start: Any
    end: Any
    issue_ms: float | None = None  # host time from recording ``start`` to recording ``end`` (the copies' issue)

    def elapsed_ms(self) -> float:
        """Milliseconds between the two events; waits (host) for ``end``: call it after the run, not inside one."""
        if self.start is None or self.end is None:
            raise DeviceUnavailable("swap timing needs CUDA events; this swap ran on the CPU")
        self.end.synchronize()
        return float(self.start.elapsed_time(self.end))


def swap_timeline(records: Sequence[SwapRecord]) -> list[dict[str, Any]]:
    """Each swap of ``records`` as ``{direction, nbytes, ms, start_ms, overlap_ms, host_issue_ms}``: ``start_ms`` from
    the first record's start, ``overlap_ms`` the time it shared the link with swaps of the other direction (a copy
    that overlaps one the other way runs slower: both directions at once reach about 85 GB/s on the lent H100, not
    2 x 55), ``host_issue_ms`` how long the host took to issue its copies (a swap issued slower than its copies run
    leaves the link idle inside its window). Waits for the last record's events: call it after the run."""
    if not records:
        return []
    origin = records[0].start
    spans = [(r.direction, r.nbytes, origin.elapsed_time(r.start), r.elapsed_ms()) for r in records]
    out = []
    for r, (d, n, t0, ms) in zip(records, spans):
        t1 = t0 + ms
        shared = sum(max(0.0, min(t1, u0 + ums) - max(t0, u0)) for e, _, u0, ums in spans if e != d)
        out.append({"direction": d, "nbytes": n, "ms": ms, "start_ms": t0, "overlap_ms": shared,
                    "host_issue_ms": r.issue_ms})
    return out


class SwapEngine:
    """Moves named :class:`SlabTensor` s between ``slab`` and ``host_pool`` on one side stream per direction.

    Not thread-safe (one owner). ``checksums=True`` turns on the debug checksums described in the module docstring.
    """

    def __init__(self, slab: Slab, host_pool: HostPool, *, checksums: bool = False, record_timing: bool = False,
                 driver_copies: bool = True):
        if not isinstance(slab, Slab):
            raise ConfigError(f"slab must be a Slab, got {type(slab).__name__}")
        if not isinstance(host_pool, HostPool):
            raise ConfigError(f"host_pool must be a HostPool, got {type(host_pool).__name__}")
        self.slab = slab
        self.host_pool = host_pool
        self.checksums = bool(checksums)
        self.device = slab.device
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            if not host_pool.pinned:
                log.warning("swap engine over an unpinned host pool: copies will be synchronous and slow")
            self.out_stream: Any = torch.cuda.Stream(device=self.device)
            self.in_stream: Any = torch.cuda.Stream(device=self.device)
        else:
            self.out_stream = self.in_stream = None
        self._bytes_out = self._bytes_in = self._items_out = self._items_in = self._swaps_out = self._swaps_in = 0
        # record_timing: keep a SwapRecord (start/end timing events on the side stream) per swap in `records`
        self.record_timing = bool(record_timing) and self._cuda
        self.records: list[SwapRecord] = []
        self._issue_t0 = 0.0  # host time of the last swap start event (record_timing)
        self._in_saw_unfenced = -1  # slab.unfenced_frees when the in stream last waited for the current stream
        # driver_copies: swap_in_into issues its waits, copy and event through the CUDA driver (pinned pools only)
        self.driver: DriverCopier | None = (driver_copier(self.device)
                                            if driver_copies and self._cuda and host_pool.pinned else None)
        # diagnostics: when a list, swap_in_now appends (label, time.perf_counter()) at each step (host time only)
        self.host_marks: list[tuple[str, float]] | None = None

    @property
    def stats(self) -> SwapStats:
        return SwapStats(self._bytes_out, self._bytes_in, self._items_out, self._items_in, self._swaps_out,
                         self._swaps_in)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _record(self, stream: Any) -> Any:
        if stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def _timing_event(self, stream: Any) -> Any:
        if not self.record_timing or stream is None:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def _timing_start(self, stream: Any) -> Any:
        """A swap's start event (record_timing), noting the host time it was issued (for ``SwapRecord.issue_ms``)."""
        ev = self._timing_event(stream)
        if ev is not None:
            self._issue_t0 = time.perf_counter()
        return ev

    @property
    def _driver_copies(self) -> bool:
        """Whether swap-ins issue their copies through the CUDA driver (timing records keep the torch path)."""
        return self.driver is not None and not self.record_timing

    def _stream_ctx(self, stream: Any) -> Any:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def order_out_after_in(self) -> None:
        """Make the next swap-out's copies start only after every copy already issued on the in stream.

        For an eviction issued behind a restore: the restore is on someone's critical path and the eviction is not,
        so the eviction waits rather than share the link with it (each direction then runs at the one-way pinned
        rate instead of splitting the bidirectional one).
        """
        if self.out_stream is not None:
            self.out_stream.wait_stream(self.in_stream)

    # -- out ---------------------------------------------------------------------------------------------------------
    def swap_out(self, items: Mapping[str, SlabTensor], *, free_source: bool = True) -> SwappedState:
        """Copy ``items`` to the host pool on the out stream; one event per item; returns immediately (CUDA).

        With ``free_source`` the slab tensors are freed at once, fenced by the swap's last copy event (one merged
        fence per swap). Without it they stay
        allocated and fenced; do not write them until ``state.wait(name)`` has been called on the writing stream.
        Raises :class:`~djinn_core.errors.HostPoolExhausted` (nothing copied, nothing freed) when the host blocks do
        not fit.
        """
        if not isinstance(items, Mapping):
            raise ConfigError(f"items must be a mapping name -> SlabTensor, got {type(items).__name__}")
        for name, t in items.items():
            if not isinstance(name, str):
                raise ConfigError(f"item names must be str, got {name!r}")
            if not isinstance(t, SlabTensor) or t.slab is not self.slab:
                raise UnknownAllocation(f"item {name!r}: {t!r} is not a tensor of this engine's slab")
            if not t.alive:
                raise UnknownAllocation(f"item {name!r}: slab tensor {t.alloc_id} was freed")
        if len({t.alloc_id for t in items.values()}) != len(items):
            raise ConfigError("the same slab tensor appears under two names")

        sizes = [t.nbytes for t in items.values()]
        if not self.host_pool.fits(sizes):  # the same first-fit the allocations below will do: all or nothing
            need = sum(self.host_pool.aligned_size(n) for n in sizes)
            pst = self.host_pool.stats
            raise HostPoolExhausted(need, pst.free, pst.capacity)

        out = self.out_stream
        if out is not None:
            out.wait_stream(torch.cuda.current_stream(self.device))  # copy finished data only
        swapped: dict[str, SwappedItem] = {}
        start = None
        with self._stream_ctx(out):
            for name, t in items.items():  # allocate and issue item by item: the first copy starts at once
                block = self.host_pool.allocate(t.shape, t.dtype)
                if out is not None:
                    for ev in block.fences:  # an earlier H2D may still read this host range
                        out.wait_event(ev)
                block.fences = []
                if self.record_timing and start is None:
                    start = self._timing_start(out)
                src = t.view()
                cs = checksum(src) if self.checksums else None
                block.view().copy_(src, non_blocking=out is not None)
                ev = self._record(out)
                swapped[name] = SwappedItem(name, block, t.shape, t.dtype, t.nbytes, t.tag, ev, cs)
                if not free_source:
                    self.slab.fence(t, ev)
        if self._driver_copies and not self.checksums:
            for it in swapped.values():  # after the copies (not delayed by these calls); recorded again at swap-in
                it.in_event = self._record(out)
        if free_source and items:
            # freed behind the swap's last copy: one fence for all its ranges (adjacent ones merge into one entry,
            # so later allocations check a few fences, not one per item)
            for t in items.values():
                self.slab.free(t, after=ev)
        nbytes = sum(t.nbytes for t in items.values())
        self._account("out", nbytes, len(items), start, out)
        log.debug("swap-out: %d items, %d bytes", len(items), nbytes)
        return SwappedState(self, swapped)

    # -- in ----------------------------------------------------------------------------------------------------------
    def swap_in(self, state: SwappedState, *, order: Sequence[str] | None = None,
                names: Iterable[str] | None = None, after: Any = None) -> ResidentState:
        """Copy items of ``state`` back into the slab on the in stream, in ``order``; returns immediately (CUDA).

        ``names``: which items (default all); ``order``: issue order for some or all of them, the rest follow in the
        state's order. The items brought back leave ``state`` (their host blocks are freed, fenced by the copy);
        the rest stay in it and are returned as ``ResidentState.pending``. Call ``ResidentState.wait(name)`` on the
        consuming stream before using ``tensors[name].view()``. Raises :class:`~djinn_core.errors.SlabExhausted`
        (nothing changed) when the items do not fit in the slab.

        Destinations are allocated first (on the current stream), then every copy is issued on the in stream, which
        by default waits for all work queued on the current stream. ``after``: an event on the current stream
        covering every earlier use of the memory being allocated -- the in stream then waits for it instead, so
        work queued after it (a resume's continuation) does not delay the copies; if the allocations themselves
        queue work on the current stream, the in stream still waits for all of it.
        """
        if not isinstance(state, SwappedState) or state._engine is not self:
            raise ConfigError("state was not produced by this swap engine")
        if not state.items:
            raise CheckpointStateError("swapped state is empty (already swapped in or released)")
        selected = self._issue_order(state, order, names)

        need = state.slab_bytes(selected)
        if need > self.slab.free_bytes:  # with compaction, every allocation below succeeds when the total fits
            sst = self.slab.stats
            raise SlabExhausted(need, sst.free, sst.capacity)

        inn = self.in_stream
        cur = torch.cuda.current_stream(self.device) if inn is not None else None
        epoch = self.slab.stream_epoch
        tensors: dict[str, SlabTensor] = {}
        deps: dict[str, list[Any]] = {}
        events: dict[str, Any] = {}
        checks: dict[str, tuple[torch.Tensor, Any, torch.Tensor, Any]] = {}
        # 1. destinations (an allocation may queue compaction moves on the current stream); the fences of the freed
        # ranges they reuse are handed over, not queried: the in stream waits for them before it writes
        try:
            for name in selected:
                it = state.items[name]
                deps[name] = []
                tensors[name] = self.slab.allocate(it.shape, it.dtype, tag=it.tag, fences=deps[name])
        except BaseException:
            for name, t in tensors.items():  # nothing issued yet: give the destinations back, fences and all
                for ev in deps[name]:
                    self.slab.fence(t, ev)
                self.slab.free(t)
            raise
        # 2. the copies, on the in stream, in order. It waits for the current stream's work when the allocations
        # queued some, or when no ``after`` event says which earlier work the destinations depend on.
        if inn is not None:
            if after is None or epoch != self.slab.stream_epoch:
                self._in_waits_for(cur)
            else:
                inn.wait_event(after)
        start = None
        if self._driver_copies and all(state.items[n].checksum is None for n in selected):
            self._issue_driver_copies(state, selected, tensors, deps, events)
        else:
            start = self._issue_torch_copies(state, selected, tensors, deps, events, checks)
        for name in selected:  # bookkeeping after the copies are issued
            it = state.items.pop(name)
            ev = events[name]
            self.slab.fence(tensors[name], ev)  # a compaction issued before the consumer waits must wait for it
            self.host_pool.free(it.block, after=ev)
        nbytes = sum(t.nbytes for t in tensors.values())
        self._account("in", nbytes, len(selected), start, inn)
        log.debug("swap-in: %d items, %d bytes, %d left on host", len(selected), nbytes, len(state.items))
        return ResidentState(tensors, events, state if state.items else None, self.device, checks, self.driver)

    def _issue_torch_copies(self, state: SwappedState, selected: Sequence[str], tensors: dict[str, SlabTensor],
                            deps: dict[str, list[Any]], events: dict[str, Any], checks: dict[str, Any]) -> Any:
        """swap_in's copies with ``Tensor.copy_`` on the in stream (CPU, checksum mode, timing records); returns the
        timing start event (or None)."""
        inn = self.in_stream
        start = None
        with self._stream_ctx(inn):
            for name in selected:
                it = state.items[name]
                if inn is not None:  # its D2H has landed and nothing still reads the range it lands in
                    self._wait_distinct(inn, (*deps[name], it.event))
                if self.record_timing and start is None:
                    start = self._timing_start(inn)
                dst = tensors[name].view()
                dst.copy_(it.block.view(), non_blocking=inn is not None)
                cs = checksum(dst) if it.checksum is not None else None
                ev = self._record(inn)
                events[name] = ev
                if cs is not None:
                    checks[name] = (it.checksum, it.event, cs, ev)
        return start

    def _issue_driver_copies(self, state: SwappedState, selected: Sequence[str], tensors: dict[str, SlabTensor],
                             deps: dict[str, list[Any]], events: dict[str, Any]) -> None:
        """swap_in's copies through the CUDA driver on the in stream: the same waits (the item's D2H and the fences
        handed over by its allocation) and copies, then the item's event -- the one made at swap-out, recorded in
        the same driver call -- so each item costs one call into ``libcuda``'s wrapper and no event creation."""
        drv, inn = self.driver, self.in_stream
        inn_h = inn.cuda_stream
        for name in selected:
            it = state.items[name]
            t = tensors[name]
            ev = it.in_event
            drv.h2d(t.view().data_ptr(), it.block.data_ptr(), t.nbytes, inn_h,
                    self._distinct_handles((*deps[name], it.event)), 0 if ev is None else ev.cuda_event)
            if ev is None:  # swapped out before the driver path was on
                ev = torch.cuda.Event()
                ev.record(inn)
            events[name] = ev

    def swap_in_now(self, state: SwappedState, name: str, *, event: Any = None) -> tuple[SlabTensor, Any]:
        """Bring one item back for the current stream's next work (a restore's packed head); return
        ``(tensor, event)`` with ``event`` recorded on the current stream once the bytes are there.

        Built for the latency from the call to the copy's start, which is all host work: after a large swap-out
        the host's first CUDA calls are several times slower than in a loop, so each call before the copy counts.
        Before the copy the host does one allocation (no event queries) and one in-stream wait per distinct event
        the copy depends on: the item's D2H and the fences of the range it lands in -- one event when the item was
        the last of its swap-out. The in stream waits for the whole current stream only
        when the allocation queued work there or some slab memory was freed without a fence since it last did.
        The current stream's wait and ``event`` follow the copy (they overlap it). The copy runs on the in stream,
        ahead of any copies issued after it, so the current stream never waits for those.

        ``event``: a timing-enabled CUDA event to record (pass one created earlier to keep its creation off this
        path); a new one otherwise. The item leaves ``state``; the rest stays in it. Raises
        :class:`~djinn_core.errors.SlabExhausted` (nothing changed) when it does not fit. In checksum mode, and on
        the CPU, it goes through :meth:`swap_in` (verified before returning).
        """
        it = self._item(state, name)
        if it.checksum is not None or not self._cuda:
            rs = self.swap_in(state, names=(name,))
            rs.wait(name)
            if self._cuda:
                event = event if event is not None else torch.cuda.Event(enable_timing=True)
                event.record(torch.cuda.current_stream(self.device))
            return rs.tensors[name], event
        marks = self.host_marks
        slab, inn = self.slab, self.in_stream
        epoch = slab.stream_epoch
        deps: list[Any] = []
        t = slab.allocate(it.shape, it.dtype, tag=it.tag, fences=deps)
        if marks is not None:
            marks.append(("allocated", time.perf_counter()))
        cur = torch.cuda.current_stream(self.device)
        if epoch != slab.stream_epoch or slab.unfenced_frees != self._in_saw_unfenced:
            self._in_waits_for(cur)
        waited = self._wait_distinct(inn, (*deps, it.event))
        if marks is not None:
            marks.append((f"waited_{waited}", time.perf_counter()))
        dst, src = t.view(), it.block.view()
        with torch.cuda.stream(inn):
            start = self._timing_start(inn)
            dst.copy_(src, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(inn)
        if marks is not None:
            marks.append(("copy_issued", time.perf_counter()))
        cur.wait_event(copied)
        if event is None:
            event = torch.cuda.Event(enable_timing=True)
        event.record(cur)
        if marks is not None:
            marks.append(("event_recorded", time.perf_counter()))
        self._took_one(state, name, t.nbytes, copied, start, inn)
        if marks is not None:
            marks.append(("bookkept", time.perf_counter()))
        return t, event

    def swap_in_into(self, state: SwappedState, name: str, dst: SlabTensor, deps: Sequence[Any] = (), *,
                     event: Any = None) -> Any:
        """Copy item ``name`` into ``dst``, a slab allocation the caller prepared beforehand, on the *current*
        stream; return ``event`` (recorded there after the copy; a new timing-enabled one when None; None on the
        CPU).

        The shortest restore path -- what a hand-made offload into a pre-allocated tensor does: one stream wait per
        distinct event among ``deps`` (the fences ``Slab.allocate(fences=...)`` handed over for ``dst``) and the
        item's D2H, then the copy. ``dst`` must have the item's shape and dtype and must not be in use (ConfigError
        otherwise, and in checksum mode). The item leaves ``state``; ``dst`` belongs to the caller as before.
        """
        it = self._item(state, name)
        if not isinstance(dst, SlabTensor) or dst.slab is not self.slab or not dst.alive:
            raise UnknownAllocation(f"{dst!r} is not a live tensor of this engine's slab")
        if (tuple(dst.shape), dst.dtype) != (tuple(it.shape), it.dtype):
            raise ConfigError(f"destination is {tuple(dst.shape)} {dst.dtype}, item {name!r} is {tuple(it.shape)} "
                              f"{it.dtype}")
        if it.checksum is not None:
            raise ConfigError("swap_in_into does not verify checksums: use swap_in in checksum mode")
        marks = self.host_marks
        if not self._cuda:
            dst.view().copy_(it.block.view())
            event = start = cur = None
        elif self._driver_copies:
            if event is None:
                event = torch.cuda.Event(enable_timing=True)
            drv = self.driver
            waits = self._distinct_handles((*deps, it.event))
            handle = event.cuda_event  # 0 until the event's first record: then recorded through torch below
            drv.h2d(dst.view().data_ptr(), it.block.data_ptr(), dst.nbytes, drv.current_stream(), waits,
                    handle)
            if marks is not None:
                marks.append((f"driver_copy_issued_{len(waits)}", time.perf_counter()))
            if not handle:
                event.record(torch.cuda.current_stream(self.device))
            start = cur = None
        else:
            cur = torch.cuda.current_stream(self.device)
            waited = self._wait_distinct(cur, (*deps, it.event))
            if marks is not None:
                marks.append((f"waited_{waited}", time.perf_counter()))
            start = self._timing_start(cur)
            dst.view().copy_(it.block.view(), non_blocking=True)  # both views are cached (same dtype and shape)
            if marks is not None:
                marks.append(("copy_issued", time.perf_counter()))
            if event is None:
                event = torch.cuda.Event(enable_timing=True)
            event.record(cur)
        self._took_one(state, name, dst.nbytes, event, start, cur)
        return event

    def _item(self, state: SwappedState, name: str) -> SwappedItem:
        if not isinstance(state, SwappedState) or state._engine is not self:
            raise ConfigError("state was not produced by this swap engine")
        it = state.items.get(name)
        if it is None:
            raise UnknownAllocation(f"no item {name!r} in this swapped state (has {state.names})")
        return it

    @staticmethod
    def _wait_distinct(stream: Any, events: Iterable[Any]) -> int:
        """``stream`` waits once for each distinct (by identity) event; returns how many waits were queued."""
        waited: list[Any] = []
        for ev in events:
            if ev is not None and all(ev is not w for w in waited):
                stream.wait_event(ev)
                waited.append(ev)
        return len(waited)

    @staticmethod
    def _distinct_handles(events: Iterable[Any]) -> list[int]:
        """The raw handles of the distinct recorded events among ``events`` (an event never recorded has none, and
        waiting for it is a no-op, as in ``Stream.wait_event``)."""
        handles: list[int] = []
        for ev in events:
            if ev is not None:
                h = ev.cuda_event
                if h and h not in handles:
                    handles.append(h)
        return handles

    def _took_one(self, state: SwappedState, name: str, nbytes: int, copied: Any, start: Any, stream: Any) -> None:
        """Bookkeeping after a one-item swap-in was issued: the item leaves ``state``, its host block is freed
        behind ``copied``, counters and (with ``record_timing``) the swap record."""
        it = state.items.pop(name)
        self.host_pool.free(it.block, after=copied)
        self._account("in", nbytes, 1, start, stream)

    def _account(self, direction: str, nbytes: int, items: int, start: Any, stream: Any) -> None:
        """Count one swap in ``direction`` ("out" or "in"); with ``start`` (record_timing) keep its SwapRecord, ended
        by an event on ``stream`` now."""
        if start is not None:
            issue_ms = (time.perf_counter() - self._issue_t0) * 1e3
            self.records.append(SwapRecord(direction, nbytes, items, start, self._timing_event(stream), issue_ms))
        if direction == "out":
            self._bytes_out += nbytes
            self._items_out += items
            self._swaps_out += 1
        else:
            self._bytes_in += nbytes
            self._items_in += items
            self._swaps_in += 1

    def _in_waits_for(self, cur: Any) -> None:
        """The in stream waits for all work queued on ``cur`` so far (which covers every unfenced free so far)."""
        self.in_stream.wait_stream(cur)
        self._in_saw_unfenced = self.slab.unfenced_frees

    def _issue_order(self, state: SwappedState, order: Sequence[str] | None,
                     names: Iterable[str] | None) -> list[str]:
        if isinstance(names, str) or isinstance(order, str):
            raise ConfigError("names and order must be sequences of item names, not a str")
        chosen = list(state.items) if names is None else list(names)
        if order is None and len(chosen) == 1:  # one item (a restore's packed head): no ordering to do
            if chosen[0] not in state.items:
                raise UnknownAllocation(f"no item {chosen[0]!r} in this swapped state (has {state.names})")
            return chosen
        order = [] if order is None else list(order)
        for n in (*chosen, *order):
            if n not in state.items:
                raise UnknownAllocation(f"no item {n!r} in this swapped state (has {state.names})")
        if len(set(chosen)) != len(chosen) or len(set(order)) != len(order):
            raise ConfigError("duplicate item names in names or order")
        chosen_set = set(chosen)
        stray = [n for n in order if n not in chosen_set]
        if stray:
            raise ConfigError(f"order names items not selected by names: {stray}")
        ordered = set(order)
        return order + [n for n in state.items if n in chosen_set and n not in ordered]

    def release(self, state: SwappedState, names: Iterable[str] | None = None) -> None:
        """Discard items of a swapped state (all when ``names`` is None): free their host blocks, fenced by their D2H
        events. Released items leave ``state``."""
        if not isinstance(state, SwappedState) or state._engine is not self:
            raise ConfigError("state was not produced by this swap engine")
        if isinstance(names, str):
            raise ConfigError("names must be a sequence of item names, not a str")
        chosen = list(state.items) if names is None else list(names)
        for n in chosen:
            if n not in state.items:
                raise UnknownAllocation(f"no item {n!r} in this swapped state (has {state.names})")
        for n in chosen:
            it = state.items.pop(n)
            self.host_pool.free(it.block, after=it.event)

