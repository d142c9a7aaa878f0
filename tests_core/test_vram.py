import time

import pytest
import torch

from djinn_core.errors import ConfigError, DeviceUnavailable
from djinn_core.bench.vram import VramSampler

pytestmark = pytest.mark.cpu


def test_sampler_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceUnavailable):
        VramSampler()


def test_sampler_records_a_timeline_marks_and_peaks_from_its_probe():
    level = {"v": 1.0}

    def probe():
        return {"nvml_used": level["v"], "torch_allocated": level["v"] / 2, "torch_reserved": level["v"]}

    with VramSampler(period_s=0.005, memory_probe=probe) as s:
        time.sleep(0.05)
        level["v"] = 5.0
        s.mark("spawn", session=3)
        time.sleep(0.05)
        level["v"] = 2.0
        time.sleep(0.03)
    assert len(s.timeline) >= 10
    assert s.peak_nvml_used() == 5.0 and s.peak_torch_allocated() == 2.5
    assert [m["label"] for m in s.marks] == ["start", "spawn", "stop"]
    assert s.marks[1]["session"] == 3
    assert s.max_gap_s() < 0.05
    d = s.to_dict()
    assert d["timeline"] and d["pcie"] == []


def test_sampler_rejects_a_period_too_coarse_for_the_claims():
    with pytest.raises(ConfigError):
        VramSampler(period_s=0.05, memory_probe=lambda: {})


@pytest.mark.cpu
def test_nvml_index_follows_cuda_visible_devices():
    """A lane pinned to the second GPU (CUDA_VISIBLE_DEVICES=1) samples NVML's device 1, not device 0."""
    from djinn_core.bench.vram import nvml_index

    assert nvml_index(0, visible="") == 0 and nvml_index(1, visible="") == 1
    assert nvml_index(0, visible="1") == 1
    assert nvml_index(1, visible="3, 2") == 2
    assert nvml_index(0, visible="GPU-8f2c") == "GPU-8f2c"
    with pytest.raises(DeviceUnavailable, match="not among"):
        nvml_index(1, visible="1")
