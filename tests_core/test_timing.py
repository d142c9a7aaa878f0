import math

import pytest
import torch

from djinn_core.errors import ConfigError, DeviceUnavailable
from djinn_core.bench.timing import GCMeter, TimingStats, time_cuda, time_host

pytestmark = pytest.mark.cpu


def test_stats_median_and_quantiles_come_from_the_samples():
    t = TimingStats((5.0, 1.0, 3.0, 2.0, 4.0))
    assert t.median_ms == 3.0
    assert t.min_ms == 1.0 and t.max_ms == 5.0
    assert t.p10_ms == pytest.approx(1.4)
    assert t.p90_ms == pytest.approx(4.6)
    assert TimingStats.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("samples", [(), (-1.0,), (math.nan,)])
def test_stats_reject_empty_negative_or_nan_samples(samples):
    with pytest.raises(ConfigError):
        TimingStats(samples)


def test_quantile_outside_unit_interval_is_an_error():
    with pytest.raises(ConfigError):
        TimingStats((1.0,)).quantile_ms(1.5)


def test_host_timer_runs_warmup_then_repeats_and_calls_before_each_time():
    calls = []
    t = time_host(lambda: calls.append("fn"), warmup=2, repeats=3, before=lambda: calls.append("before"))
    assert t.n == 3 and t.clock == "host"
    assert calls == ["before", "fn"] * 5


@pytest.mark.parametrize("warmup,repeats", [(-1, 3), (0, 0), (1, 2.5)])
def test_timers_reject_bad_counts(warmup, repeats):
    with pytest.raises(ConfigError):
        time_host(lambda: None, warmup=warmup, repeats=repeats)


def test_cuda_timer_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceUnavailable, match="CUDA GPU"):
        time_cuda(lambda: None)


def test_gc_meter_counts_collections_inside_and_removes_its_callback():
    import gc

    n = len(gc.callbacks)
    with GCMeter() as gm:
        gc.collect(0)
        gc.collect(2)
    assert gm.collections[0] >= 1 and gm.collections[2] >= 1 and gm.ms >= 0.0
    assert len(gc.callbacks) == n
    before = list(gm.collections)
    gc.collect()
    assert gm.collections == before  # no callback left behind
