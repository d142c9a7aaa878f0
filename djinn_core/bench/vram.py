"""VRAM sampler: a background thread that records GPU memory use over time.

Every ``period_s`` (default 10 ms, at most 20 ms) it reads NVML's used memory for the device (what the driver sees:
every process, every allocator) and the torch caching allocator's allocated and reserved bytes (this process). With
``pcie=True`` a second thread reads NVML's PCIe TX/RX throughput counters (each read integrates over ~20 ms inside
the driver, so it cannot share the memory thread's period). ``mark(label)`` stamps events (spawn, swap, ...) on the
same clock so a plot can show them against the timeline.

Without CUDA or NVML there is nothing honest to sample: the constructor raises :class:`DeviceUnavailable`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import torch

from djinn_core.errors import ConfigError, DeviceUnavailable
from djinn_core.validation import check_number

log = logging.getLogger(__name__)

Probe = Callable[[], dict[str, float]]


def nvml_index(index: int, visible: str | None = None) -> int | str:
    """The NVML device (its index, or its UUID) behind CUDA device ``index`` of this process.

    NVML numbers every GPU of the host in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``; CUDA numbers only the
    visible ones. ``visible`` defaults to ``$CUDA_VISIBLE_DEVICES``: unset or empty, the numbers agree; a list of
    integers names NVML indices (exact when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which ``scripts/gpu_suite.sh --gpu``
    sets); ``GPU-...`` entries are UUIDs. Without this a lane on the second GPU would sample the first one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    if not entries:
        return index
    if index >= len(entries):
        raise DeviceUnavailable(f"CUDA device {index} is not among CUDA_VISIBLE_DEVICES={visible!r}")
    entry = entries[index]
    return int(entry) if entry.isdigit() else entry


def nvml_handle(index: int = 0):
    """``(pynvml, handle)`` of the NVML device behind CUDA device ``index`` (:func:`nvml_index`); needs no CUDA
    context. :class:`DeviceUnavailable` without nvidia-ml-py or NVML."""
    try:
        import pynvml
    except ImportError as e:  # nvidia-ml-py is a dependency, but say what is missing
        raise DeviceUnavailable("VRAM sampling needs nvidia-ml-py (the pynvml module)") from e
    which = nvml_index(index)
    try:
        pynvml.nvmlInit()
        if isinstance(which, str):
            return pynvml, pynvml.nvmlDeviceGetHandleByUUID(which)
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(which)
    except pynvml.NVMLError as e:
        raise DeviceUnavailable(f"NVML is not available on this machine: {e}") from e




def default_memory_probe(device: int = 0) -> Probe:
    """A probe reading NVML used bytes and torch allocated/reserved bytes for CUDA device ``device``."""
    if not torch.cuda.is_available():
        raise DeviceUnavailable("VRAM sampling needs a CUDA GPU; this machine has none")
    pynvml, handle = nvml_handle(device)

    def probe() -> dict[str, float]:
        return {
            "nvml_used": float(pynvml.nvmlDeviceGetMemoryInfo(handle).used),
            "torch_allocated": float(torch.cuda.memory_allocated(device)),
            "torch_reserved": float(torch.cuda.memory_reserved(device)),
        }

    return probe


def default_pcie_probe(device: int = 0) -> Probe:
    """A probe reading NVML PCIe TX and RX throughput (KB/s over the driver's ~20 ms window)."""
    pynvml, handle = nvml_handle(device)

    def probe() -> dict[str, float]:
        return {
            "pcie_tx_KBps": float(pynvml.nvmlDeviceGetPcieThroughput(handle, pynvml.NVML_PCIE_UTIL_TX_BYTES)),
            "pcie_rx_KBps": float(pynvml.nvmlDeviceGetPcieThroughput(handle, pynvml.NVML_PCIE_UTIL_RX_BYTES)),
        }

    return probe


class VramSampler:
    """Context manager sampling memory (and optionally PCIe throughput) on background threads.

    ``timeline``: list of ``{"t_s", "nvml_used", "torch_allocated", "torch_reserved"}``; ``pcie``: list of
    ``{"t_s", "pcie_tx_KBps", "pcie_rx_KBps"}``; ``marks``: list of ``{"t_s", "label"}``; times in seconds from
    start. TX is device-to-host traffic as NVML names it from the GPU's side, RX host-to-device.
    """

    def __init__(
        self,
        device: int = 0,
        period_s: float = 0.01,
        pcie: bool = False,
        *,
        memory_probe: Probe | None = None,
        pcie_probe: Probe | None = None,
    ):
        check_number("period_s", period_s, 0.0, 0.02, strict_minimum=True)
        self.period_s = period_s
        self._mem_probe = memory_probe or default_memory_probe(device)
        self._pcie_probe = (pcie_probe or default_pcie_probe(device)) if pcie else None
        self.timeline: list[dict[str, float]] = []
        self.pcie: list[dict[str, float]] = []
        self.marks: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0
        self._lock = threading.Lock()

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _mem_loop(self) -> None:
        next_t = time.perf_counter()
        while not self._stop.is_set():
            sample = self._mem_probe()
            sample["t_s"] = self._now()
            with self._lock:
                self.timeline.append(sample)
            next_t += self.period_s
            delay = next_t - time.perf_counter()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_t = time.perf_counter()

    def _pcie_loop(self) -> None:
        assert self._pcie_probe is not None
        while not self._stop.is_set():
            sample = self._pcie_probe()
            sample["t_s"] = self._now()
            with self._lock:
                self.pcie.append(sample)

    def start(self) -> "VramSampler":
        if self._threads:
            raise ConfigError("sampler already started")
        self._t0 = time.perf_counter()
        self._stop.clear()
        loops = [self._mem_loop] + ([self._pcie_loop] if self._pcie_probe else [])
        for loop in loops:
            t = threading.Thread(target=loop, name=f"djinn-{loop.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        self.mark("start")
        return self

    def stop(self) -> None:
        self.mark("stop")
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads = []
        # one last sample so a short run still has its end state
        sample = self._mem_probe()
        sample["t_s"] = self._now()
        self.timeline.append(sample)

    def __enter__(self) -> "VramSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def mark(self, label: str, **data: Any) -> None:
        with self._lock:
            self.marks.append({"t_s": self._now(), "label": str(label), **data})

    def _peak(self, key: str) -> float:
        with self._lock:
            vals = [s[key] for s in self.timeline if key in s]
        if not vals:
            raise ConfigError(f"no samples of {key} yet")
        return max(vals)

    def peak_nvml_used(self) -> float:
        return self._peak("nvml_used")

    def peak_torch_reserved(self) -> float:
        return self._peak("torch_reserved")

    def peak_torch_allocated(self) -> float:
        return self._peak("torch_allocated")

    def peaks(self, budget_bytes: int | None = None) -> dict[str, float | None]:
        """Peak NVML used (the whole device: every process, every allocator), torch reserved and torch allocated
        (this process's caching allocator) in bytes, and each over ``budget_bytes`` when given."""
        out: dict[str, float | None] = {}
        for key in ("nvml_used", "torch_reserved", "torch_allocated"):
            with self._lock:
                vals = [s[key] for s in self.timeline if key in s]
            out[f"{key}_peak_bytes"] = max(vals) if vals else None
            if budget_bytes:
                out[f"{key}_peak_over_budget"] = max(vals) / budget_bytes if vals else None
        return out

    def max_gap_s(self) -> float:
        """Largest interval between consecutive memory samples (the sampling period actually achieved)."""
        ts = [s["t_s"] for s in self.timeline]
        return max((b - a for a, b in zip(ts, ts[1:])), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"period_s": self.period_s, "timeline": list(self.timeline), "pcie": list(self.pcie),
                    "marks": list(self.marks)}
