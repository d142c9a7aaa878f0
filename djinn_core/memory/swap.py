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

Link brackets (measurement, ``bracket``): a callable the engine calls on the copying stream right before the first
copy of every ``swap_out`` and ``swap_in`` and right after its last, ``bracket(direction, stream, nbytes) -> Span |
None`` (it chooses by size; ``swap_in_now`` on the GPU and ``swap_in_into`` do not offer it); a bench sets it to
issue a reference copy of its own buffers there, so each swap is timed against what the link gave just around it
(:class:`djinn_core.bench.ceilings.LinkBracket`). The two spans go in the swap's timing record (``data["bracket"]``)
and :func:`swap_timeline` reports the rate they measured. Off (``None``) in normal use.

On a CPU slab, copies are synchronous, events are ``None`` and waits are no-ops; the bookkeeping is identical.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

import torch

from djinn_core.errors import CheckpointStateError, ConfigError, HostPoolExhausted, SlabExhausted, UnknownAllocation
from djinn_core.memory.cuda_driver import DriverCopier, driver_copier
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.slab import Slab, SlabTensor
from djinn_core.memory.swap_items import (ItemKey, Key, ResidentState, SwappedItem, SwappedState, SwapStats, checksum,
                                          swap_timeline)
from djinn_core.trace import Mark, Span, Tracer, make_mark

log = logging.getLogger(__name__)

# bracket(direction, stream, nbytes) -> Span | None: a reference copy issued on ``stream`` (None on the CPU) next to a
# swap of ``nbytes`` in ``direction`` ("out" or "in"); None when it chose not to copy
Bracket = Callable[[str, Any, int], "Span | None"]

__all__ = ["ItemKey", "Key", "ResidentState", "SwapEngine", "SwapStats", "SwappedItem", "SwappedState", "checksum",
           "swap_timeline"]

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
        # record_timing: keep a Span (marks on the side stream before the first copy and after the last, labelled
        # with the direction; data: nbytes, items) per swap in `records`
        self.record_timing = bool(record_timing) and self._cuda
        self.records: list[Span] = []
        self._in_saw_unfenced = -1  # slab.unfenced_frees when the in stream last waited for the current stream
        # driver_copies: swap_in_into issues its waits, copy and event through the CUDA driver (pinned pools only)
        self.driver: DriverCopier | None = (driver_copier(self.device)
                                            if driver_copies and self._cuda and host_pool.pinned else None)
        # diagnostics: an enabled host-time Tracer here gets a mark at each step of swap_in, swap_in_now and
        # swap_in_into
        self.host_tracer: Tracer | None = None
        # measurement: reference copies right around each swap_out / swap_in (module docstring: link brackets)
        self.bracket: Bracket | None = None

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

    def _timing_start(self, stream: Any) -> Mark | None:
        """A swap's start mark on ``stream`` (record_timing): a timing event and the host time it was issued."""
        if not self.record_timing or stream is None:
            return None
        return make_mark("start", stream)

    @property
    def _driver_copies(self) -> bool:
        """Whether swap-ins issue their copies through the CUDA driver (timing records and brackets keep the torch
        path)."""
        return self.driver is not None and not self.record_timing and self.bracket is None

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
    def swap_out(self, items: Mapping[Key, SlabTensor], *, free_source: bool = True,
                 keep: Collection[Key] = ()) -> SwappedState:
        """Copy ``items`` to the host pool on the out stream; one event per item; returns immediately (CUDA).

        With ``free_source`` the slab tensors (except those named in ``keep``) are freed at once, fenced by the
        swap's last copy event (one merged fence per swap). The others stay allocated and fenced by their copy; do
        not write them until ``state.wait(name)`` has been called on the writing stream.
        Raises :class:`~djinn_core.errors.HostPoolExhausted` (nothing copied, nothing freed) when the host blocks do
        not fit.
        """
        if not isinstance(items, Mapping):
            raise ConfigError(f"items must be a mapping name -> SlabTensor, got {type(items).__name__}")
        for name, t in items.items():
            if not isinstance(name, (str, ItemKey)):
                raise ConfigError(f"item names must be str or ItemKey, got {name!r}")
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
        first = True
        pre = None
        with self._stream_ctx(out):
            for name, t in items.items():  # allocate and issue item by item: the first copy starts at once
                block = self.host_pool.allocate(t.shape, t.dtype)
                if out is not None:
                    for ev in block.fences:  # an earlier H2D may still read this host range
                        out.wait_event(ev)
                block.fences = []
                if first:
                    first = False
                    pre, start = self._before_first_copy("out", out, sum(sizes))
                src = t.view()
                cs = checksum(src) if self.checksums else None
                block.view().copy_(src, non_blocking=out is not None)
                ev = self._record(out)
                swapped[name] = SwappedItem(name, block, t.shape, t.dtype, t.nbytes, t.tag, ev, cs)
                if not free_source or (keep and name in keep):
                    self.slab.fence(t, ev)
        if self._driver_copies and not self.checksums:
            for it in swapped.values():  # after the copies (not delayed by these calls); recorded again at swap-in
                it.in_event = self._record(out)
        if free_source and items:
            # freed behind the swap's last copy: one fence for all its ranges (adjacent ones merge into one entry,
            # so later allocations check a few fences, not one per item)
            for name, t in items.items():
                if not (keep and name in keep):
                    self.slab.free(t, after=ev)
        nbytes = sum(t.nbytes for t in items.values())
        segments = {it.block.segment for it in swapped.values()} if start is not None else ()  # for the record only
        self._account("out", nbytes, len(items), start, out, pre, bracketed=bool(items), segments=segments)
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
        if not isinstance(state, SwappedState) or state.engine is not self:
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
        marks = self.host_tracer
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
        if marks is not None:
            marks.mark(f"in.allocated_{len(selected)}{'_compacted' if epoch != self.slab.stream_epoch else ''}")
        # 2. the copies, on the in stream, in order. It waits for the current stream's work when the allocations
        # queued some, or when no ``after`` event says which earlier work the destinations depend on.
        if inn is not None:
            if after is None or epoch != self.slab.stream_epoch:
                self._in_waits_for(cur)
            else:
                inn.wait_event(after)
        start = pre = None
        torch_path = not (self._driver_copies and all(state.items[n].checksum is None for n in selected))
        if torch_path:
            start, pre = self._issue_torch_copies(state, selected, tensors, deps, events, checks)
        else:
            self._issue_driver_copies(state, selected, tensors, deps, events)
        if marks is not None:
            marks.mark("in.copies_issued")
        segments = {state.items[n].block.segment for n in selected} if start is not None else ()  # for the record
        for name in selected:  # bookkeeping after the copies are issued
            it = state.items.pop(name)
            ev = events[name]
            self.slab.fence(tensors[name], ev)  # a compaction issued before the consumer waits must wait for it
            self.host_pool.free(it.block, after=ev)
        nbytes = sum(t.nbytes for t in tensors.values())
        self._account("in", nbytes, len(selected), start, inn, pre, bracketed=torch_path, segments=segments)
        if marks is not None:
            marks.mark("in.accounted")
        log.debug("swap-in: %d items, %d bytes, %d left on host", len(selected), nbytes, len(state.items))
        return ResidentState(tensors, events, state if state.items else None, self.device, checks, self.driver)

    def _issue_torch_copies(self, state: SwappedState, selected: Sequence[str], tensors: dict[str, SlabTensor],
                            deps: dict[str, list[Any]], events: dict[str, Any], checks: dict[str, Any]) -> Any:
        """swap_in's copies with ``Tensor.copy_`` on the in stream (CPU, checksum mode, timing records); returns the
        timing start mark and the bracket before the first copy (each None when not taken)."""
        inn = self.in_stream
        start = pre = None
        first = True
        with self._stream_ctx(inn):
            for name in selected:
                it = state.items[name]
                if inn is not None:  # its D2H has landed and nothing still reads the range it lands in
                    self._wait_distinct(inn, (*deps[name], it.event))
                if first:
                    first = False
                    pre, start = self._before_first_copy("in", inn, sum(tensors[n].nbytes for n in selected))
                dst = tensors[name].view()
                dst.copy_(it.block.view(), non_blocking=inn is not None)
                cs = checksum(dst) if it.checksum is not None else None
                ev = self._record(inn)
                events[name] = ev
                if cs is not None:
                    checks[name] = (it.checksum, it.event, cs, ev)
        return start, pre

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

        Built for the latency from the call to the copy's start, which is all host work, so each call before the
        copy counts (see ``docs/notes/runtime.md``). Before the copy the host does one allocation (no event
        queries) and one in-stream wait per distinct event the copy depends on: the item's D2H and the fences of the
        range it lands in -- one event when the item was the last of its swap-out. The in stream waits for the whole current stream only
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
        marks = self.host_tracer
        slab, inn = self.slab, self.in_stream
        epoch = slab.stream_epoch
        deps: list[Any] = []
        t = slab.allocate(it.shape, it.dtype, tag=it.tag, fences=deps)
        if marks is not None:
            marks.mark("allocated")
        cur = torch.cuda.current_stream(self.device)
        if epoch != slab.stream_epoch or slab.unfenced_frees != self._in_saw_unfenced:
            self._in_waits_for(cur)
        waited = self._wait_distinct(inn, (*deps, it.event))
        if marks is not None:
            marks.mark(f"waited_{waited}")
        dst, src = t.view(), it.block.view()
        with torch.cuda.stream(inn):
            start = self._timing_start(inn)
            dst.copy_(src, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(inn)
        if marks is not None:
            marks.mark("copy_issued")
        cur.wait_event(copied)
        if event is None:
            event = torch.cuda.Event(enable_timing=True)
        event.record(cur)
        if marks is not None:
            marks.mark("event_recorded")
        self._took_one(state, name, t.nbytes, copied, start, inn)
        if marks is not None:
            marks.mark("bookkept")
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
        marks = self.host_tracer
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
                marks.mark(f"driver_copy_issued_{len(waits)}")
            if not handle:
                event.record(torch.cuda.current_stream(self.device))
            start = cur = None
        else:
            cur = torch.cuda.current_stream(self.device)
            waited = self._wait_distinct(cur, (*deps, it.event))
            if marks is not None:
                marks.mark(f"waited_{waited}")
            start = self._timing_start(cur)
            dst.view().copy_(it.block.view(), non_blocking=True)  # both views are cached (same dtype and shape)
            if marks is not None:
                marks.mark("copy_issued")
            if event is None:
                event = torch.cuda.Event(enable_timing=True)
            event.record(cur)
        self._took_one(state, name, dst.nbytes, event, start, cur)
        return event

    def _item(self, state: SwappedState, name: str) -> SwappedItem:
        if not isinstance(state, SwappedState) or state.engine is not self:
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
        self._account("in", nbytes, 1, start, stream, segments=(it.block.segment,))

    def _before_first_copy(self, direction: str, stream: Any, nbytes: int) -> tuple[Span | None, Mark | None]:
        """Right before a swap's first copy, on its stream: the bracket's copy, then the timing start mark (each None
        when not taken)."""
        return self._bracket(direction, stream, nbytes), self._timing_start(stream)

    def _bracket(self, direction: str, stream: Any, nbytes: int) -> Span | None:
        """The bracket's reference copy on ``stream`` next to a swap of ``nbytes`` (None without a bracket)."""
        if self.bracket is None:
            return None
        with self._stream_ctx(stream):
            return self.bracket(direction, stream, nbytes)

    def _account(self, direction: str, nbytes: int, items: int, start: Any, stream: Any, pre: Span | None = None,
                 *, bracketed: bool = False, segments: Collection[int] = ()) -> None:
        """Count one swap in ``direction`` ("out" or "in"); with ``start`` (record_timing) keep its Span, ended
        by an event on ``stream`` now, with the host pool segments its blocks lie in. ``bracketed``: the swap's
        copies went through a path that took the bracket before them (``pre``), so the bracket is taken again after
        them and both go in the record."""
        end = make_mark("end", stream) if start is not None else None
        post = self._bracket(direction, stream, nbytes) if bracketed else None
        if start is not None:
            data: dict[str, Any] = {"nbytes": nbytes, "items": items, "segments": sorted(segments)}
            if pre is not None and post is not None:
                data["bracket"] = (pre, post)
            self.records.append(Span(direction, start, end, data))
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
        if not isinstance(state, SwappedState) or state.engine is not self:
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

