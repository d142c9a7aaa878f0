"""The GPU ring buffer of whole-layer slots and the copy stream that fills it from the host pack.

The ring is ``slots`` slots of ``layout.stride`` bytes, allocated once on the device (on the current stream, written
by the copy stream). :meth:`WeightRing.copy_async` issues one layer's copy into the next slot, in ring order, on the
copy stream: it waits ``slot_free[slot]`` (recorded by the consumer after the slot's previous layer was computed),
copies the layer in chunks and records one event per chunk in ``chunk_events[slot]``. The consumer waits those
events on the compute stream before it reads the slot, then records ``slot_free[slot]`` after. Nothing here
synchronizes the host, except :meth:`WeightRing.release` (teardown).

Without CUDA the same code runs with CPU tensors, synchronous copies and no-op events.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from djinn_core.streaming.layout import LayerLayout
from djinn_core.trace import Mark, make_mark


class NoEvent:
    """CPU stand-in for a CUDA event: CPU copies are synchronous, so there is nothing to record or wait for."""

    __slots__ = ()

    def record(self, stream: Any = None) -> None:
        pass


class RingBase:
    """What the rings share (:class:`WeightRing` here, the partitioned one in
    :mod:`djinn_core.distributed.partitioned`): their events, their size and how a copy claims its slot. Subclasses
    set ``cuda``, ``buffer``, ``slots``, ``next_slot``, ``slot_free``, ``copy_stream`` and ``_ready_event``."""

    cuda: bool
    buffer: torch.Tensor | None

    def _event(self) -> Any:
        return torch.cuda.Event() if self.cuda else NoEvent()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() if self.buffer is not None else 0

    def _take_slot(self) -> int:
        """The next slot, round robin. On CUDA, called with the copy stream current: it waits for the host pack's
        fill (once) and for the slot's previous occupant's compute before any copy into it."""
        s = self.next_slot
        self.next_slot = (s + 1) % self.slots
        if self.cuda:
            if self._ready_event is not None:
                self.copy_stream.wait_event(self._ready_event)
                self._ready_event = None
            self.copy_stream.wait_event(self.slot_free[s])  # the previous occupant's compute is done
        return s


class WeightRing(RingBase):
    """``slots`` whole-layer slots on ``device`` and the side stream that copies layers into them.

    Args:
        layout: the layer layout every streamed layer shares (slot stride, parameter views).
        slots: number of slots (>= 1; overlap of copy and compute needs >= 2).
        chunks: byte ranges ``[start, stop)`` of one layer, one copy and one event each
            (:meth:`LayerLayout.chunks`, bounded by :meth:`StreamingPolicy.chunks_per_layer`).
        device: where the ring lives (a CUDA device with its index, or the CPU).
        ready_event: a CUDA event the copy stream waits on before its first copy (the host pack's fill), or None.

    Attributes read by the consumer on its hot path: ``slot_views[s]`` (typed views of each parameter in slot ``s``),
    ``chunk_events[s]`` (to wait on before reading slot ``s``), ``slot_free[s]`` (to record after computing it).
    """

    def __init__(self, layout: LayerLayout, slots: int, chunks: tuple[tuple[int, int], ...], *,
                 device: torch.device, ready_event: Any = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.slots = slots
        self.chunks = chunks
        self.buffer: torch.Tensor | None = torch.empty(slots * layout.stride, dtype=torch.uint8, device=device)
        slot_bufs = [self.buffer[s * layout.stride:(s + 1) * layout.stride] for s in range(slots)]
        self.slot_views = [layout.views(b) for b in slot_bufs]
        self._slot_chunks = [[b[a:z] for a, z in chunks] for b in slot_bufs]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        if self.cuda:
            self.buffer.record_stream(self.copy_stream)
        self.chunk_events = [[self._event() for _ in chunks] for _ in range(slots)]
        self.slot_free = [self._event() for _ in range(slots)]
        self._ready_event = ready_event
        self.next_slot = 0
        self.copy_marks: tuple[Mark, Mark] | None = None  # of the last copy issued with ``timed=True``

    def copy_async(self, host: torch.Tensor, timed: bool = False) -> int:
        """Issue the copy of one layer's packed bytes ``host`` into the next slot, on the copy stream (non-blocking
        from pinned memory); return the slot. With ``timed``, ``copy_marks`` holds marks recorded on the copy stream
        before the first chunk and after the last."""
        copy_stream = self.copy_stream
        with torch.cuda.stream(copy_stream) if self.cuda else nullcontext():
            s = self._take_slot()
            if timed:
                start = make_mark("copy_start", copy_stream, self.device)
            for (a, z), dst, ev in zip(self.chunks, self._slot_chunks[s], self.chunk_events[s]):
                dst.copy_(host[a:z], non_blocking=self.cuda)
                ev.record(copy_stream)
            if timed:
                self.copy_marks = (start, make_mark("copy_end", copy_stream, self.device))
        return s

    def release(self) -> None:
        """Wait for the copy stream (no copy writes the ring or reads the pack afterwards) and free the ring."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self.slot_views = []
        self._slot_chunks = []
        self.buffer = None


__all__ = ["WeightRing"]
