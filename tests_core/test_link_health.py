"""Link-health snapshots read what a machine offers and leave out what it does not; deltas keep counters' differences
and both readings of gauges."""

import pytest

from djinn_core.bench import link_health as lh
from djinn_core.errors import ConfigError

pytestmark = pytest.mark.cpu


def _fake_proc(root, *, pressure=True):
    (root / "stat").write_text("cpu  100 0 50 900 7 0 3 12 0 0\ncpu0 1 2 3\n")
    (root / "vmstat").write_text("nr_free_pages 5\npgscan_kswapd 40\ncompact_stall 2\npgmajfault 9\n")
    (root / "meminfo").write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 400 kB\nMlocked: 8 kB\n")
    if pressure:
        (root / "pressure").mkdir()
        (root / "pressure" / "memory").write_text("some avg10=1.50 avg60=0.00 avg300=0.00 total=1234\n"
                                                  "full avg10=0.00 avg60=0.00 avg300=0.00 total=99\n")
    return root


def test_host_snapshot_reads_stat_pressure_vmstat_and_meminfo(tmp_path):
    snap = lh.host_snapshot(_fake_proc(tmp_path))
    assert snap["cpu_steal_jiffies"] == 12 and snap["cpu_iowait_jiffies"] == 7
    assert snap["psi_memory_some_total_us"] == 1234 and snap["psi_memory_some_avg10"] == 1.5
    assert snap["pgscan_kswapd"] == 40 and snap["compact_stall"] == 2 and "nr_free_pages" not in snap
    assert snap["mem_available_bytes"] == 400 * 1024 and snap["mlocked_bytes"] == 8 * 1024
    assert "psi_cpu_some_total_us" not in snap  # a file this machine lacks adds nothing


def test_host_snapshot_of_a_machine_without_pressure_files_or_proc(tmp_path):
    snap = lh.host_snapshot(_fake_proc(tmp_path, pressure=False))
    assert not any(k.startswith("psi_") for k in snap) and "cpu_user_jiffies" in snap
    assert lh.host_snapshot(tmp_path / "missing") == {}


class _NVMLError(Exception):
    pass


class _FakeNVML:
    NVMLError = _NVMLError
    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM = 0, 1, 2

    def nvmlDeviceGetTemperature(self, h, which):
        return 41

    def nvmlDeviceGetClockInfo(self, h, which):
        return {1: 1980, 2: 3201}[which]

    def nvmlDeviceGetPowerUsage(self, h):
        return 123_500

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 4

    def nvmlDeviceGetPcieReplayCounter(self, h):
        raise _NVMLError("Not Supported")

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return 16


def test_gpu_snapshot_leaves_out_what_the_driver_does_not_support():
    snap = lh.gpu_snapshot(_FakeNVML(), object())
    assert snap == {"temperature_c": 41.0, "sm_clock_mhz": 1980.0, "mem_clock_mhz": 3201.0, "power_w": 123.5,
                    "clocks_event_reasons": 4.0, "pcie_link_gen": 5.0, "pcie_link_width": 16.0}


def test_delta_differences_counters_and_keeps_both_readings_of_gauges():
    before = {"cpu_steal_jiffies": 10.0, "pcie_replays": 3.0, "temperature_c": 40.0, "only_before": 1.0}
    after = {"cpu_steal_jiffies": 25.0, "pcie_replays": 3.0, "temperature_c": 55.0}
    assert lh.delta(before, after) == {"cpu_steal_jiffies": 15.0, "pcie_replays": 0.0, "temperature_c": [40.0, 55.0]}


def test_snapshot_without_a_device_reads_the_host_only(tmp_path):
    assert lh.snapshot(proc=_fake_proc(tmp_path)) == lh.host_snapshot(tmp_path)


def test_health_sampler_stamps_samples_on_the_host_clock_and_finds_those_around_a_moment():
    import time

    reads = iter(range(100))
    with lh.HealthSampler(period_s=0.01, read=lambda: {"cpu_steal_jiffies": float(next(reads))}) as hs:
        time.sleep(0.06)
        t = time.perf_counter()
        time.sleep(0.03)
    assert len(hs.samples) >= 4 and [s["cpu_steal_jiffies"] for s in hs.samples] == sorted(
        s["cpu_steal_jiffies"] for s in hs.samples)
    near = hs.around(t)
    assert near["before"]["t"] <= t < near["after"]["t"]
    assert near["delta"]["cpu_steal_jiffies"] == near["after"]["cpu_steal_jiffies"] - near["before"]["cpu_steal_jiffies"]
    assert hs.around(0.0)["before"] is None and "delta" not in hs.around(0.0)
    with pytest.raises(ConfigError, match="period_s"):
        lh.HealthSampler(period_s=0)
