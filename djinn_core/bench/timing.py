"""Timers: CUDA events for device work, a host clock for CPU plumbing.

:func:`time_cuda` records a start and an end event on one stream around the callable, so the measured region holds
no device-wide synchronize; the host waits on the *end event* of each repeat only after it has been recorded (outside
the region). Warm-up repeats are run and discarded first. The result carries every sample, so a report can recompute
its median from raw data.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from djinn_core.errors import ConfigError, DeviceUnavailable
from djinn_core.validation import check_int, check_number


@dataclass(frozen=True)
class TimingStats:
    """Repeated timings of one region, in milliseconds. ``clock`` is ``"cuda_event"`` or ``"host"``."""

    samples_ms: tuple[float, ...]
    clock: str = "cuda_event"

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ConfigError("TimingStats needs at least one sample")
        if any(not (s >= 0.0) for s in self.samples_ms):  # also rejects NaN
            raise ConfigError(f"negative or NaN timing sample in {self.samples_ms}")

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    def per(self, count: int) -> "TimingStats":
        """Each sample divided by ``count``: the time of one of ``count`` back-to-back operations a sample timed."""
        check_number("count", count, 1)
        return TimingStats(tuple(s / count for s in self.samples_ms), self.clock)

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.samples_ms))

    def quantile_ms(self, q: float) -> float:
        check_number("quantile", q, 0.0, 1.0)
        xs = sorted(self.samples_ms)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def p10_ms(self) -> float:
        return self.quantile_ms(0.10)

    @property
    def p90_ms(self) -> float:
        return self.quantile_ms(0.90)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def max_ms(self) -> float:
        return max(self.samples_ms)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples_ms"] = list(self.samples_ms)
        d.update(n=self.n, median_ms=self.median_ms, p10_ms=self.p10_ms, p90_ms=self.p90_ms,
                 min_ms=self.min_ms, max_ms=self.max_ms)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TimingStats":
        return cls(tuple(float(x) for x in d["samples_ms"]), d.get("clock", "cuda_event"))


def _check_counts(warmup: int, repeats: int) -> None:
    check_int("warmup", warmup, 0)
    check_int("repeats", repeats, 1)


def require_cuda(what: str) -> None:
    """Raise :class:`DeviceUnavailable` naming ``what`` when no CUDA device is present."""
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"{what} needs a CUDA GPU; this machine has none")


def event_ms(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
    """Device milliseconds from ``start`` to ``end`` (two timing events); waits for ``end`` on the host."""
    end.synchronize()
    return start.elapsed_time(end)


def back_to_back(fn: Callable[[], Any], count: int) -> Callable[[], None]:
    """``fn`` ``count`` times in a row, as one region to time (then :meth:`TimingStats.per` gives one call's time):
    a loop of steps as it runs, each queued behind the previous one."""
    check_number("count", count, 1)

    def run() -> None:
        for _ in range(count):
            fn()

    return run


def time_cuda(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    stream: torch.cuda.Stream | None = None,
    before: Callable[[], Any] | None = None,
) -> TimingStats:
    """Time ``fn`` with CUDA events recorded on ``stream`` (default: the current stream).

    ``before`` runs untimed before every repeat (to reset state, e.g. swap a session back out); the host then waits for
    the stream to drain (``stream.synchronize()``, a stream-, not device-wide wait) so the region starts on an idle
    stream. Work that ``fn`` queues on other streams is inside the region only if ``fn`` makes ``stream`` wait for it
    (that is how a consumer would see it, too).
    """
    require_cuda("time_cuda")
    _check_counts(warmup, repeats)
    stream = stream or torch.cuda.current_stream()
    samples: list[float] = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        stream.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        if i >= warmup:
            samples.append(start.elapsed_time(end))
    return TimingStats(tuple(samples), "cuda_event")


def time_host(
    fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, before: Callable[[], Any] | None = None
) -> TimingStats:
    """Time ``fn`` with the host's monotonic clock (CPU work only: peer figures on a CPU, never asserted)."""
    _check_counts(warmup, repeats)
    samples: list[float] = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        dt = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            samples.append(dt)
    return TimingStats(tuple(samples), "host")


class GCMeter:
    """Host time spent in Python's cyclic garbage collector while the meter is open (attribution of host stalls).

    ``with GCMeter() as gm: ...`` then ``gm.ms`` (total milliseconds) and ``gm.collections`` (count per generation).
    Uses ``gc.callbacks``; the callback is removed on exit, also on error.
    """

    def __init__(self) -> None:
        self.ms = 0.0
        self.collections = [0, 0, 0]
        self._t0: float | None = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.ms += (time.perf_counter() - self._t0) * 1e3
            self.collections[min(int(info.get("generation", 0)), 2)] += 1
            self._t0 = None

    def __enter__(self) -> "GCMeter":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._callback)
