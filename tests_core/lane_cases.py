"""Two claim tests for ``test_lanes.py`` to run under pytest-xdist with ``--djinn-gpu-per-worker`` (collected only
when named on the command line: the file name does not match ``test_*.py``)."""

from __future__ import annotations

import os

import pytest


@pytest.mark.cpu
@pytest.mark.parametrize("n", [1, 2])
def test_a_lane_measures(claim, n):
    got = claim.measure(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    claim.info(cuda_visible_devices=got)
    claim.precondition("ran", value=n, op=">", bound=0, unit="runs", what="the case ran")
