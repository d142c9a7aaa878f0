"""Hardware ceilings: pinned and pageable copies in each direction and both at once, against the PCIe link's raw
rate. These are the physical sanity checks behind every bandwidth claim: they catch a broken timer or a copy that did
not happen (:mod:`djinn_core.bench.ceilings` measures one ceiling)."""

from __future__ import annotations

import torch

from djinn_core.bench.ceilings import CopyCeiling, measure_copy_ceiling
from djinn_core.bench.provenance import gpu_facts, pcie_link_GBps
from djinn_core.errors import DeviceUnavailable

MiB = 2**20


def link_rate_GBps() -> float:
    """The raw one-direction data rate of GPU 0's current PCIe link (GB/s); :class:`DeviceUnavailable` when NVML
    gives no link facts."""
    facts = gpu_facts()
    if "pcie_link_gen" not in facts:
        raise DeviceUnavailable(f"NVML gave no PCIe link facts: {facts.get('nvml_error', 'no CUDA GPU')}")
    return pcie_link_GBps(int(facts["pcie_link_gen"]), int(facts["pcie_link_width"]))


def pinned_and_pageable(nbytes: int, direction: str, device: torch.device) -> tuple[CopyCeiling, CopyCeiling]:
    """The same copy from pinned host memory (10 repeats), then from pageable memory (5 repeats)."""
    return (measure_copy_ceiling(nbytes, direction, pinned=True, device=device),
            measure_copy_ceiling(nbytes, direction, pinned=False, device=device, repeats=5))


def each_direction_and_both(nbytes: int, device: torch.device) -> tuple[CopyCeiling, CopyCeiling, CopyCeiling]:
    """Pinned ceilings host-to-device, device-to-host, and both at once (``bidir``), in that order."""
    h2d, d2h, bidir = (measure_copy_ceiling(nbytes, d, device=device) for d in ("h2d", "d2h", "bidir"))
    return h2d, d2h, bidir
