"""The streamed model: hooks on a Hugging Face model's decoder layers that stream each layer's weights from a
:class:`~djinn_core.streaming.host_pack.WeightPack` through a :class:`~djinn_core.streaming.ring.WeightRing`.

Per decoder layer ``i`` of a forward:

    load_weights(j)   copy stream:    wait slot_free[s]; copy the layer in chunks host -> slot s, one event per chunk
                      (issued for every j <= i + prefetch_depth not issued yet, in layer i's forward pre-hook)
    compute(i)        compute stream: wait the chunk events of layer i; bind its parameters to views of its slot;
                      run the layer; record slot_free[s] (forward hook)

Between forwards, :meth:`StreamedModel.prefetch` issues the next forward's first loads early (a resume asks for its
layer L before it readies the session's head and KV); the forward that starts there adopts them.

Slots are taken in ring order over the whole sequence of loads (``slot = load_number % slots``), so a slot is reused
by the load ``slots`` loads later, which waits on the ``slot_free`` event recorded after the previous occupant's
compute. A load is issued only after that event has been recorded on the host, hence ``prefetch_depth <= slots - 1``.
Nothing synchronizes the host per layer; only :meth:`StreamedModel.read_timeline` (when asked) and
:meth:`StreamedModel.remove` (teardown) wait.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from djinn_core.errors import ConfigError, StreamingBudgetTooSmall
from djinn_core.models import decoder_layers
from djinn_core.streaming.host_pack import WeightPack
from djinn_core.streaming.layout import LayerLayout, bind_parameters, restore_parameters
from djinn_core.streaming.plan import GiB, MiB, StreamingBudget, StreamingPolicy
from djinn_core.streaming.ring import WeightRing
from djinn_core.trace import Mark, make_mark
from djinn_core.validation import check_device

log = logging.getLogger(__name__)


@dataclass
class _LayerMarks:
    """Timeline marks of one layer (made only with ``record_timeline``)."""

    layer: int
    host_set: int
    slot: int
    copy_start: Mark
    copy_end: Mark
    compute_start: Mark | None = None
    compute_end: Mark | None = None


@dataclass
class _Pass:
    """State of one pass over the layers (one forward): which slot each issued layer occupies."""

    slot_of: dict[int, int] = field(default_factory=dict)
    issued_through: int = -1
    origin: Mark | None = None
    marks: dict[int, _LayerMarks] = field(default_factory=dict)


def _ms(origin: Mark, m: Mark) -> float:
    """Milliseconds from ``origin`` to ``m``: CUDA events where there are (device time), else the host clock."""
    if origin.event is not None and m.event is not None:
        return origin.event.elapsed_time(m.event)
    return (m.host_s - origin.host_s) * 1e3


class StreamedModel:
    """Wraps a Hugging Face decoder model so its layers' weights stream from a :class:`WeightPack` through a ring.

    The model's non-layer modules (embeddings, head, final norm, rotary) must already be on ``device`` (see
    :func:`~djinn_core.streaming.builder.place_resident_`); its decoder layers may be on ``meta``: while wrapped, their
    parameters are Parameters on ``device`` whose ``.data`` is rebound to ring-slot views before each layer runs.
    Layer ``i`` streams host weight set ``layer_sets[i]`` (default ``i``; a set may serve several layers). Call the
    model as usual, or this object. :meth:`remove` takes the hooks off and restores the original parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        pack: WeightPack,
        policy: StreamingPolicy,
        *,
        device: torch.device | str,
        layer_sets: Sequence[int] | None = None,
        budget: StreamingBudget | None = None,
        record_timeline: bool = False,
        owns_pack: bool = False,
    ):
        if not isinstance(policy, StreamingPolicy):
            raise ConfigError(f"policy must be a StreamingPolicy, got {type(policy).__name__}")
        self.device = check_device(device)
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self._cuda and not pack.pinned:
            log.warning("streaming from an unpinned pack: copies are staged by the driver and not asynchronous")
        self.model = model
        self.pack = pack
        self.policy = policy
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        layout = pack.layout
        for i, layer in enumerate(self.layers):
            if LayerLayout.of(layer).signature() != layout.signature():
                raise ConfigError(f"decoder layer {i} does not match the weight pack's layout")
        self.layout = layout
        sets = list(range(self.num_layers)) if layer_sets is None else [int(s) for s in layer_sets]
        if len(sets) != self.num_layers:
            raise ConfigError(f"layer_sets has {len(sets)} entries for {self.num_layers} decoder layers")
        bad = [s for s in sets if not 0 <= s < pack.num_sets]
        if bad:
            raise ConfigError(f"layer_sets name weight sets {bad[:5]} outside the pack's 0..{pack.num_sets - 1}")
        self.layer_sets = tuple(sets)
        self.slots = policy.slots(layout.stride)
        self.depth = policy.depth(self.slots)
        if budget is not None and self.slots * layout.stride > budget.ring_bytes:
            raise StreamingBudgetTooSmall(
                f"a ring of {self.slots} slots ({self.slots * layout.stride / GiB:.2f} GiB) exceeds the budget's ring "
                f"allowance of {budget.ring_bytes / GiB:.2f} GiB ({budget.slots} slots)")
        policy.chunks_per_layer(layout.used_bytes, self.slots)
        if self.slots < 2:
            log.warning("one ring slot: every layer's copy waits for the previous layer's compute (no overlap)")
        self.chunks = layout.chunks(policy.chunk_bytes)
        self.budget = budget
        self.record_timeline = bool(record_timeline)
        self._owns_pack = owns_pack

        self.ring: WeightRing | None = self._make_ring()
        # the ring's per-slot lists, read on the hot path without going through the ring
        self._slot_views = self.ring.slot_views
        self._chunk_events = self.ring.chunk_events
        self._slot_free = self.ring.slot_free
        self._expect = 0
        self._last_load = self.num_layers - 1  # the last layer a pass may load (see loads_before)
        self._pass = _Pass()
        self._last_marks: dict[int, _LayerMarks] | None = None
        self._last_origin: Mark | None = None
        self.bytes_streamed = 0  # bytes of copies issued (host -> ring), counted on the host
        self.layers_streamed = 0
        self.passes = 0
        self._pending: tuple[int, _Pass] | None = None  # a prefetched pass: (its first layer, its loads)
        self.prefetches = 0
        self.bytes_dropped = 0  # bytes of prefetched loads no forward used

        # the layers' parameters become device Parameters bound to slot views; the originals are kept to restore
        self._originals: list[dict[str, nn.Parameter]] = []
        self._params: list[list[nn.Parameter]] = []
        self._hooks = []
        for i, layer in enumerate(self.layers):
            self._originals.append(bind_parameters(layer, self._slot_views[i % self.slots]))
            self._params.append([p for _, p in layer.named_parameters()])
            self._hooks.append(layer.register_forward_pre_hook(partial(self._before_layer, i)))
            self._hooks.append(layer.register_forward_hook(partial(self._after_layer, i), always_call=True))
        log.info("streaming %d layers (%d weight sets, %.3f GiB each) through %d slots (%.2f GiB), %d chunks of <= "
                 "%.0f MiB per layer, prefetch depth %d", self.num_layers, pack.num_sets, layout.stride / GiB,
                 self.slots, self.ring_bytes / GiB, len(self.chunks), policy.chunk_bytes / MiB, self.depth)

    def _make_ring(self) -> WeightRing:
        """The ring this model streams through, built once here. A seam: a subclass may return another object with
        the ring's attributes (:class:`~djinn_core.distributed.partitioned.ShardedWeightRing` fills each slot from a
        shard per process and an all-gather)."""
        return WeightRing(self.layout, self.slots, self.chunks, device=self.device, ready_event=self.pack.ready_event)

    def _compute_stream(self) -> Any:
        return torch.cuda.current_stream(self.device) if self._cuda else None

    @property
    def ring_bytes(self) -> int:
        """Device bytes of the ring (0 after :meth:`remove`)."""
        return self.ring.nbytes if self.ring is not None else 0

    @property
    def bytes_per_pass(self) -> int:
        """Weight bytes (without padding) streamed by one full forward: layers x layer parameter bytes."""
        return self.num_layers * self.layout.param_bytes

    # -- the per-layer steps ---------------------------------------------------------------------------------------
    def _begin_pass(self, i: int) -> None:
        self._pass = _Pass(issued_through=i - 1)
        self.passes += 1
        if self.record_timeline:
            self._pass.origin = make_mark("forward", self._compute_stream(), self.device)

    def _issue_through(self, p: _Pass, last: int) -> None:
        """load_weights(j) for every j <= ``last`` that ``p`` has not issued: layer j's copy on the copy stream. A
        prefetched pass that is not ``p`` is dropped first: these loads take the ring's next slots, which may be its."""
        if p.issued_through < last and self._pending is not None and p is not self._pending[1]:
            self._drop_pending()
        while p.issued_through < last:
            j = p.issued_through + 1
            s = self.ring.copy_async(self.pack.layer(self.layer_sets[j]), self.record_timeline)
            p.slot_of[j] = s
            p.issued_through = j
            if self.record_timeline:
                p.marks[j] = _LayerMarks(j, self.layer_sets[j], s, *self.ring.copy_marks)
            self.bytes_streamed += self.layout.used_bytes
            self.layers_streamed += 1

    def prefetch(self, start: int) -> None:
        """Between forwards: issue now the loads the next forward's first decoder layer would issue, that forward
        starting at layer ``start`` (layers ``start .. start + prefetch_depth``, within :meth:`loads_before`'s stop),
        so that the copies run while the host prepares that forward. Where the last pass stopped before ``start`` (a
        breakpoint capture) the loads continue that pass; otherwise a forward whose first layer is ``start`` adopts
        them. A forward that begins at another layer drops them: their copies were made for nothing
        (``bytes_dropped``; they count in ``bytes_streamed`` too)."""
        if not 0 <= start < self.num_layers:
            raise ConfigError(f"prefetch start {start} outside 0..{self.num_layers - 1}")
        last = min(start + self.depth, self._last_load)
        if start != 0 and start == self._expect and self._pass.issued_through >= start - 1:
            self._issue_through(self._pass, last)  # the stopped pass continues at start
            return
        self._drop_pending()
        p = _Pass(issued_through=start - 1)
        if self.record_timeline:
            p.origin = make_mark("forward", self._compute_stream(), self.device)
        self._issue_through(p, last)
        self._pending = (start, p)
        self.prefetches += 1

    def _drop_pending(self) -> None:
        if self._pending is not None:
            _, p = self._pending
            self.bytes_dropped += len(p.slot_of) * self.layout.used_bytes
            self._pending = None

    def _before_layer(self, i: int, module: nn.Module, args: Any) -> None:
        if i == 0 or i != self._expect:
            if self._pending is not None and self._pending[0] == i:  # the prefetched pass: its loads are in flight
                self._pass, self._pending = self._pending[1], None
                self.passes += 1
            else:
                self._drop_pending()
                self._begin_pass(i)
        self._expect = i + 1
        p = self._pass
        self._issue_through(p, min(i + self.depth, self._last_load))
        slot = p.slot_of[i]
        stream = self._compute_stream()
        if stream is not None:
            for ev in self._chunk_events[slot]:
                stream.wait_event(ev)
        marks = p.marks.get(i)
        if marks is not None:
            marks.compute_start = make_mark("compute_start", stream, self.device)
        for param, view in zip(self._params[i], self._slot_views[slot]):
            param.data = view

    def _after_layer(self, i: int, module: nn.Module, args: Any, output: Any) -> None:
        slot = self._pass.slot_of.get(i)
        if slot is None:
            return
        stream = self._compute_stream()
        self._slot_free[slot].record(stream)
        marks = self._pass.marks.get(i)
        if marks is not None:
            marks.compute_end = make_mark("compute_end", stream, self.device)
        if i == self.num_layers - 1:
            self._last_marks, self._last_origin = self._pass.marks, self._pass.origin

    # -- public ----------------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def loads_before(self, stop: int) -> Iterator[None]:
        """Within this context a forward loads no layer at or after ``stop``: for a forward that a hook aborts
        before decoder layer ``stop`` runs (a breakpoint capture), so layers ``0..stop-1`` stream and nothing is
        prefetched past them. A later call of layer ``stop`` continues the same pass (:meth:`_before_layer`)."""
        self._last_load = min(max(stop, 0), self.num_layers) - 1
        try:
            yield
        finally:
            self._last_load = self.num_layers - 1

    def read_timeline(self) -> list[dict[str, Any]]:
        """Per-layer copy and compute intervals of the last complete forward, in ms from its start on the compute
        stream (needs ``record_timeline=True``; CUDA event times on a GPU, the host clock on a CPU). Blocks until
        that forward's last event has completed."""
        if not self.record_timeline:
            raise ConfigError("construct the StreamedModel with record_timeline=True to read a timeline")
        if not self._last_marks:
            raise ConfigError("no complete forward has been recorded yet")
        marks = [self._last_marks[i] for i in sorted(self._last_marks)]
        for m in marks:  # copy_end follows the last chunk event that compute waited on: wait for each too
            for mark in (m.copy_end, m.compute_end):
                if mark is not None and mark.event is not None:
                    mark.event.synchronize()
        origin = self._last_origin
        rows = []
        for m in marks:
            row = {"layer": m.layer, "host_set": m.host_set, "slot": m.slot,
                   "copy_start_ms": _ms(origin, m.copy_start), "copy_end_ms": _ms(origin, m.copy_end),
                   "compute_start_ms": None, "compute_end_ms": None}
            if m.compute_end is not None:
                row["compute_start_ms"] = _ms(origin, m.compute_start)
                row["compute_end_ms"] = _ms(origin, m.compute_end)
            rows.append(row)
        return rows

    def stats(self) -> dict[str, Any]:
        """Layout, ring and byte counters (bytes), and the budget plan when there is one."""
        return {"layers": self.num_layers, "weight_sets": self.pack.num_sets, "layer_bytes": self.layout.stride,
                "layer_param_bytes": self.layout.param_bytes, "slots": self.slots, "ring_bytes": self.ring_bytes,
                "chunk_bytes": self.policy.chunk_bytes, "chunks_per_layer": len(self.chunks),
                "prefetch_depth": self.depth, "bytes_streamed": self.bytes_streamed,
                "layers_streamed": self.layers_streamed, "passes": self.passes, "prefetches": self.prefetches,
                "bytes_dropped": self.bytes_dropped,
                "budget": self.budget.to_dict() if self.budget else None}

    def remove(self) -> nn.Module:
        """Take the hooks off, restore the layers' original parameters and free the ring; returns the model.

        Teardown only: waits for the copy stream, so no copy still writes the ring or reads the pack afterwards.
        """
        if self.ring is None:
            return self.model
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for layer, originals in zip(self.layers, self._originals):
            restore_parameters(layer, originals)
        self.ring.release()
        self._params = []
        self._slot_views = []
        self.ring = None
        if self._owns_pack:
            self.pack.release()
        return self.model

    def __enter__(self) -> "StreamedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


__all__ = ["StreamedModel"]
