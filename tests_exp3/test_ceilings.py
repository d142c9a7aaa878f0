"""Hardware ceilings: pinned and pageable copies, both directions and both at once, 1 MiB to 4 GiB.

Every bandwidth claim of the suite divides by a ceiling like these, measured in its own run. The claims asserted here
are the physical sanity checks that catch a broken timer or a copy that did not happen: no copy beats the PCIe link's
raw rate, pinned copies beat pageable ones at sizes where DMA dominates, and both directions at once move more than
either alone (the copy engines overlap).
"""

from __future__ import annotations

import pytest
import torch

from djinn_core.bench import preconditions as pre
from djinn_core.bench.ceilings import CopyCeiling, measure_copy_ceiling
from djinn_core.bench.experiments.ceilings import MiB, each_direction_and_both, link_rate_GBps, pinned_and_pageable
from djinn_core.bench.provenance import pcie_link_GBps
from djinn_core.bench.timing import TimingStats
from djinn_core.errors import ConfigError, DeviceUnavailable

SIZES_MIB = [1, 16, 64, 256, 1024, 4096]


def _link_GBps(claim, params: dict) -> float:
    """The PCIe link's raw rate; a precondition of the claim against it (NVML must name the link: it fails, not
    skips, when it does not)."""
    try:
        link, why = link_rate_GBps(), ""
    except DeviceUnavailable as e:
        link, why = float("nan"), str(e)
    claim.precondition("pcie_link_rate_known", value=link, op=">", bound=0, unit="GB/s", params=params,
                       what=f"the PCIe link's raw rate from NVML{' (' + why + ')' if why else ''}")
    return link


@pytest.mark.h100
@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
@pytest.mark.parametrize("size_mib", SIZES_MIB)
def test_copy_ceiling_stays_below_the_pcie_link_rate(claim, cuda_device, size_mib, direction, pinned):
    params = {"size_mib": size_mib, "direction": direction, "pinned": pinned}
    link = _link_GBps(claim, params)
    repeats = 10 if pinned or size_mib < 1024 else 5
    c = claim.measure(lambda: measure_copy_ceiling(size_mib * MiB, direction, pinned=pinned, device=cuda_device,
                                                   repeats=repeats))
    claim.info(ceiling=c.to_dict(), link_GBps=link)
    claim.ratio("copy_below_link_rate", what="pinned or pageable copy bandwidth against the PCIe link's raw rate",
                method="ceiling", measured=c.GBps, reference=link, bound=1.0, op="<=",
                unit="GB/s", reference_method="pcie_link_raw_rate", params=params)


@pytest.mark.h100
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
@pytest.mark.parametrize("size_mib", [64, 256, 1024])
def test_pinned_copies_beat_pageable_ones(claim, cuda_device, size_mib, direction):
    pinned, pageable = claim.measure(lambda: pinned_and_pageable(size_mib * MiB, direction, cuda_device))
    claim.info(pinned=pinned.to_dict(), pageable=pageable.to_dict())
    pre.peer_ran(claim, peer="pageable copy", timing=pageable.timing, params={"size_mib": size_mib,
                                                                             "direction": direction})
    claim.ratio("pinned_beats_pageable", what="pinned copy bandwidth against pageable copy bandwidth of the same size",
                method="ceiling", measured=pinned.GBps, reference=pageable.GBps,
                bound=1.0, op=">=", unit="GB/s", reference_method="pageable",
                params={"size_mib": size_mib, "direction": direction})


@pytest.mark.h100
@pytest.mark.parametrize("size_mib", [64, 256, 1024])
def test_both_directions_at_once_overlap(claim, cuda_device, size_mib):
    h2d, d2h, bidir = claim.measure(lambda: each_direction_and_both(size_mib * MiB, cuda_device))
    claim.info(h2d=h2d.to_dict(), d2h=d2h.to_dict(), bidir=bidir.to_dict())
    for name, c in (("h2d copy", h2d), ("d2h copy", d2h)):
        pre.peer_ran(claim, peer=name, timing=c.timing, params={"size_mib": size_mib})
    claim.ratio("bidirectional_overlaps",
                what="both directions at once (bytes of both) against the faster single direction",
                method="ceiling", measured=bidir.GBps, reference=max(h2d.GBps, d2h.GBps),
                bound=1.0, op=">=", unit="GB/s", reference_method="best_single_direction",
                params={"size_mib": size_mib})


# ---- CPU plumbing: the same code paths without a GPU ------------------------------------------------------------

@pytest.mark.cpu
def test_ceiling_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the no-GPU path is checked on CPU machines")
    with pytest.raises(DeviceUnavailable, match="CUDA"):
        measure_copy_ceiling(MiB, "h2d")


@pytest.mark.cpu
@pytest.mark.parametrize("nbytes,direction", [(0, "h2d"), (-5, "d2h"), (1.5, "h2d"), (MiB, "sideways"), (True, "h2d")])
def test_ceiling_rejects_bad_arguments(nbytes, direction):
    with pytest.raises(ConfigError):
        measure_copy_ceiling(nbytes, direction)


@pytest.mark.cpu
def test_ceiling_arithmetic_counts_both_directions_for_bidir():
    t = TimingStats((2.0, 1.0, 3.0))
    one = CopyCeiling("h2d", 10**9, True, t)
    both = CopyCeiling("bidir", 10**9, True, t)
    assert one.GBps == pytest.approx(500.0)  # 1e9 B in 2 ms
    assert both.GBps == pytest.approx(1000.0)
    assert both.to_dict()["bytes_moved"] == 2 * 10**9


@pytest.mark.cpu
def test_pcie_link_rate_of_gen5_x16():
    assert pcie_link_GBps(5, 16) == pytest.approx(63.0, rel=1e-2)
    with pytest.raises(ConfigError):
        pcie_link_GBps(9, 16)
