"""What the host and the GPU were doing around a measurement, to attribute a dip in a copy's rate.

A pinned host-to-device copy's rate wanders (docs/notes/bench.md). Taken before and after a run, a snapshot says
whether anything that can slow the link moved in between: on the GPU (NVML) its temperature, clocks, power, the
reasons the driver gives for holding clocks down, the PCIe link's current generation and width, and its replay counter
(transfers the link had to resend); on the host (``/proc``) CPU time stolen by the hypervisor and spent waiting on
I/O, pressure stall totals, reclaim and compaction counters, and available memory. :func:`delta` keeps the
counters' differences and both readings of everything else; :class:`HealthSampler` takes snapshots through a run,
on the clock of swap records' host marks. Readings a machine does not offer are left out, never guessed. Importing
this module imports no torch.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

# /proc/stat's first line: cpu user nice system idle iowait irq softirq steal ... (USER_HZ jiffies)
_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_VMSTAT = ("pgscan_kswapd", "pgscan_direct", "compact_stall", "compact_fail", "thp_fault_alloc", "pgmajfault")
_MEMINFO = {"MemAvailable": "mem_available_bytes", "MemFree": "mem_free_bytes", "Mlocked": "mlocked_bytes"}
# keys whose difference means something (monotonic counters); the rest are gauges, kept as (before, after)
COUNTERS = frozenset({f"cpu_{f}_jiffies" for f in _STAT_FIELDS} | set(_VMSTAT)
                     | {f"psi_{r}_some_total_us" for r in ("cpu", "memory", "io")} | {"pcie_replays"})


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def host_snapshot(proc: Path | str = "/proc") -> dict[str, float]:
    """The host's readings from ``proc`` (a ``/proc``-like folder); files it lacks add nothing."""
    proc = Path(proc)
    out: dict[str, float] = {}
    stat = _read(proc / "stat")
    if stat:
        first = stat.splitlines()[0].split()
        if first and first[0] == "cpu":
            for name, value in zip(_STAT_FIELDS, first[1:]):
                out[f"cpu_{name}_jiffies"] = float(value)
    for resource in ("cpu", "memory", "io"):
        text = _read(proc / "pressure" / resource)
        for line in (text or "").splitlines():
            parts = line.split()
            if parts and parts[0] == "some":
                fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
                if "total" in fields:
                    out[f"psi_{resource}_some_total_us"] = float(fields["total"])
                if "avg10" in fields:
                    out[f"psi_{resource}_some_avg10"] = float(fields["avg10"])
    vmstat = _read(proc / "vmstat")
    for line in (vmstat or "").splitlines():
        key, _, value = line.partition(" ")
        if key in _VMSTAT:
            out[key] = float(value)
    meminfo = _read(proc / "meminfo")
    for line in (meminfo or "").splitlines():
        key, _, rest = line.partition(":")
        if key in _MEMINFO:
            words = rest.split()
            out[_MEMINFO[key]] = float(words[0]) * (1024 if len(words) > 1 and words[1] == "kB" else 1)
    return out


def gpu_snapshot(pynvml: Any, handle: Any) -> dict[str, float]:
    """The GPU's readings through NVML (``pynvml`` the module, ``handle`` the device's); a reading the device or
    driver does not support is left out."""
    reads = {
        "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
        "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
        "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        "clocks_event_reasons": lambda: _clock_reasons(pynvml, handle),
        "pcie_replays": lambda: pynvml.nvmlDeviceGetPcieReplayCounter(handle),
        "pcie_link_gen": lambda: pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle),
        "pcie_link_width": lambda: pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle),
    }
    out: dict[str, float] = {}
    for key, read in reads.items():
        try:
            out[key] = float(read())
        except (pynvml.NVMLError, AttributeError) as e:  # not supported here, or an older nvidia-ml-py
            log.debug("NVML reading %s unavailable: %s", key, e)
    return out


def _clock_reasons(pynvml: Any, handle: Any) -> int:
    """The bitmask of reasons the driver holds the clocks down (named "clocks event reasons" since driver 535)."""
    fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return int(fn(handle))


def reader(device: int | None = None, *, proc: Path | str = "/proc") -> Callable[[], dict[str, float]]:
    """A function taking snapshots: host readings, plus the GPU's when ``device`` (a CUDA device index) is given and
    NVML answers (its handle found once, here)."""
    nvml = None
    if device is not None:
        from djinn_core.bench.vram import nvml_handle  # imports torch
        from djinn_core.errors import DeviceUnavailable

        try:
            nvml = nvml_handle(device)
        except DeviceUnavailable as e:
            log.warning("no GPU readings for the link-health snapshots: %s", e)

    def read() -> dict[str, float]:
        out = host_snapshot(proc)
        if nvml is not None:
            out.update(gpu_snapshot(*nvml))
        return out

    return read


def snapshot(device: int | None = None, *, proc: Path | str = "/proc") -> dict[str, float]:
    """One snapshot (:func:`reader`)."""
    return reader(device, proc=proc)()


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Counters (:data:`COUNTERS`) as ``after - before``; every other reading as ``[before, after]``; keys present
    in both only."""
    out: dict[str, Any] = {}
    for key in sorted(set(before) & set(after)):
        out[key] = after[key] - before[key] if key in COUNTERS else [before[key], after[key]]
    return out


class HealthSampler:
    """Snapshots (``read``, default :func:`reader` of ``device``) every ``period_s`` on a background thread while in
    use, each stamped with the host's ``time.perf_counter()`` (``t``), the clock of swap records' host marks, so a
    slow copy can be set beside what the GPU and the host were doing then (:meth:`around`)."""

    def __init__(self, device: int | None = None, period_s: float = 1.0, *, read=None):
        from djinn_core.validation import check_number

        check_number("period_s", period_s, 0.0, strict_minimum=True)
        self.period_s = period_s
        self._read = read if read is not None else reader(device)
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        sample = self._read()
        sample["t"] = time.perf_counter()
        self.samples.append(sample)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> "HealthSampler":
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="djinn-link-health", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()

    def around(self, t: float) -> dict[str, Any]:
        """The samples just before and just after host time ``t`` (``None`` where there is none) and the counters'
        change between them (:func:`delta`)."""
        before = max((s for s in self.samples if s["t"] <= t), key=lambda s: s["t"], default=None)
        after = min((s for s in self.samples if s["t"] > t), key=lambda s: s["t"], default=None)
        out: dict[str, Any] = {"before": before, "after": after}
        if before is not None and after is not None:
            out["delta"] = delta(before, after)
        return out
