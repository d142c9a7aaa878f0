"""One tracing mechanism for every wing: labelled marks, each a host time and (on CUDA) a timing event recorded on a
stream, kept only while a :class:`Tracer` is enabled.

A disabled tracer costs one attribute test per mark. Reading a trace (:meth:`Tracer.rows`, :meth:`Span.ms`) waits for
the events it reads: call it after the work, never inside a timed region.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


def timing_event(stream: Any = None, device: torch.device | None = None) -> Any:
    """A timing-enabled CUDA event recorded on ``stream`` (default: the current stream of ``device``); None when
    there is no CUDA stream to record on (the CPU)."""
    if stream is None:
        if device is None or device.type != "cuda":
            return None
        stream = torch.cuda.current_stream(device)
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(stream)
    return ev


@dataclass
class Mark:
    """One labelled instant: the host's ``perf_counter`` (s) and a device event (None on the CPU). ``data``: what the
    caller attached (layer, bytes, slot...)."""

    label: str
    host_s: float
    event: Any = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Span:
    """Two marks of one piece of work (e.g. a swap's first and last copy on its stream)."""

    label: str
    start: Mark
    end: Mark
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def host_ms(self) -> float:
        """Host milliseconds between the two marks (how long the host took to issue the work between them)."""
        return (self.end.host_s - self.start.host_s) * 1e3

    def ms(self) -> float:
        """Device milliseconds between the two events; waits for ``end``."""
        if self.start.event is None or self.end.event is None:
            raise RuntimeError(f"span {self.label!r} has no device events (recorded on the CPU)")
        self.end.event.synchronize()
        return float(self.start.event.elapsed_time(self.end.event))


class Tracer:
    """Collects :class:`Mark` s and :class:`Span` s while ``enabled``.

    Args:
        enabled: record (False: every call returns at once and records nothing).
        device: where the default stream of :meth:`mark` lives (None or a CPU device: host times only).
    """

    def __init__(self, enabled: bool = False, device: torch.device | str | None = None):
        self.enabled = bool(enabled)
        self.device = torch.device(device) if device is not None else None
        self.marks: list[Mark] = []
        self.spans: list[Span] = []

    def mark(self, label: str, stream: Any = None, **data: Any) -> Mark | None:
        """Record ``label`` now, on ``stream`` (default: the current stream of the tracer's device)."""
        if not self.enabled:
            return None
        m = Mark(label, time.perf_counter(), timing_event(stream, self.device), data)
        self.marks.append(m)
        return m

    def span(self, label: str, start: Mark, end: Mark, **data: Any) -> Span | None:
        """Keep ``start``..``end`` (marks made by :meth:`mark`, or by :func:`make_mark` off the list) as a span."""
        if not self.enabled:
            return None
        s = Span(label, start, end, data)
        self.spans.append(s)
        return s

    def clear(self) -> None:
        self.marks.clear()
        self.spans.clear()

    def rows(self) -> list[dict[str, Any]]:
        """Every mark as ``{label, host_ms, device_ms, **data}``, times from the first mark (device times need CUDA
        events; waits for the last one)."""
        if not self.marks:
            return []
        first = self.marks[0]
        last_event = next((m.event for m in reversed(self.marks) if m.event is not None), None)
        if last_event is not None:
            last_event.synchronize()
        return [{"label": m.label, "host_ms": (m.host_s - first.host_s) * 1e3,
                 "device_ms": (first.event.elapsed_time(m.event)
                               if first.event is not None and m.event is not None else None), **m.data}
                for m in self.marks]


def make_mark(label: str, stream: Any = None, device: torch.device | None = None, **data: Any) -> Mark:
    """A :class:`Mark` not kept by any tracer (for mechanisms that keep their own, e.g. per-swap records)."""
    return Mark(label, time.perf_counter(), timing_event(stream, device), data)
