"""host_pool.py on ordinary memory (pin=False): the same sub-allocation logic as the pinned pool."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from djinn_core.errors import (ConfigError, DeviceUnavailable, DoubleFree, HostPoolExhausted, InsufficientHostMemory,
                               UnknownAllocation)
from djinn_core.memory.host_pool import HostBlock, HostPool

pytestmark = pytest.mark.cpu

A = 256
KiB = 1024


class FakeEvent:
    def __init__(self) -> None:
        self.done = False
        self.synchronized = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.synchronized += 1
        self.done = True


def test_pool_is_split_into_segments_and_hands_out_typed_views():
    p = HostPool(10 * KiB, segment_bytes=4 * KiB, pin=False)
    s = p.stats
    assert (s.capacity, s.segments, s.segment_bytes, s.pinned, s.used) == (10 * KiB, 3, 4 * KiB, False, 0)
    b = p.allocate((3, 5), torch.float16)
    v = b.view()
    assert v.shape == (3, 5) and v.dtype == torch.float16 and v.device.type == "cpu" and v.is_contiguous()
    v.fill_(1.5)
    assert p.stats.used == A and p.stats.allocations == 1
    p.free(b)
    assert p.stats.used == 0 and p.stats.high_water == A
    p.check_invariants()


def test_data_ptr_is_the_views_address_without_making_a_view():
    p = HostPool(10 * KiB, segment_bytes=4 * KiB, pin=False)
    blocks = [p.allocate((100 * (i + 1),), torch.uint8) for i in range(5)]
    for b in blocks:
        ptr = b.data_ptr()
        assert b._view is None  # no view was made for it
        assert ptr == b.view().data_ptr()
    p.free(blocks[0])
    with pytest.raises(UnknownAllocation):
        blocks[0].data_ptr()


def test_blocks_never_span_segments():
    p = HostPool(8 * KiB, segment_bytes=4 * KiB, pin=False)
    a = p.allocate((3 * KiB,), torch.uint8)
    b = p.allocate((3 * KiB,), torch.uint8)  # does not fit the rest of segment 0: goes to segment 1
    assert (a.segment, b.segment) == (0, 1)
    c = p.allocate((KiB,), torch.uint8)  # fits the rest of segment 0
    assert c.segment == 0 and c.offset == 3 * KiB
    with pytest.raises(HostPoolExhausted) as e:
        p.allocate((2 * KiB,), torch.uint8)  # only 1 KiB left, at the end of segment 1
    assert e.value.requested == 2 * KiB and e.value.capacity == 8 * KiB
    p.check_invariants()


def test_a_block_larger_than_a_segment_is_a_config_error():
    p = HostPool(8 * KiB, segment_bytes=4 * KiB, pin=False)
    with pytest.raises(ConfigError, match="segment_bytes"):
        p.allocate((4 * KiB + 1,), torch.uint8)
    assert p.stats.used == 0


def test_blocks_do_not_alias():
    p = HostPool(16 * KiB, segment_bytes=8 * KiB, pin=False)
    blocks = [p.allocate((100,), torch.int32) for _ in range(10)]
    for i, b in enumerate(blocks):
        b.view().fill_(i)
    for i, b in enumerate(blocks):
        assert torch.all(b.view() == i)


def test_double_free_and_foreign_blocks():
    p = HostPool(4 * KiB, segment_bytes=4 * KiB, pin=False)
    q = HostPool(4 * KiB, segment_bytes=4 * KiB, pin=False)
    b = p.allocate((8,), torch.float32)
    p.free(b)
    with pytest.raises(DoubleFree):
        p.free(b)
    with pytest.raises(UnknownAllocation):
        b.view()
    c = q.allocate((8,), torch.float32)
    with pytest.raises(UnknownAllocation):
        p.free(c)
    with pytest.raises(UnknownAllocation):
        p.free(None)
    assert q.stats.allocations == 1 and p.stats.allocations == 0


def test_capacity_beyond_available_ram_fails_before_pinning():
    with pytest.raises(InsufficientHostMemory, match="nothing was pinned"):
        HostPool(1 << 60, segment_bytes=1 << 30, pin=False)
    with pytest.raises(InsufficientHostMemory):
        HostPool(8 * KiB, pin=False, min_free_host_bytes=1 << 60)


@pytest.mark.parametrize("kw", [dict(capacity_bytes=-1), dict(capacity_bytes=4 * KiB, segment_bytes=0),
                                dict(capacity_bytes=4 * KiB, segment_bytes=1000),
                                dict(capacity_bytes=4 * KiB, alignment=3), dict(capacity_bytes=4 * KiB, pin="yes"),
                                dict(capacity_bytes=4 * KiB, min_free_host_bytes=-1)])
def test_bad_arguments_are_config_errors(kw):
    cap = kw.pop("capacity_bytes")
    kw.setdefault("pin", False)
    with pytest.raises(ConfigError):
        HostPool(cap, **kw)


def test_pinning_without_cuda_is_device_unavailable():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceUnavailable):
        HostPool(4 * KiB, pin=True)
    assert HostPool(4 * KiB).pinned is False  # default follows CUDA availability


def test_creation_time_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="djinn_core.memory.host_pool"):
        p = HostPool(8 * KiB, segment_bytes=4 * KiB, pin=False)
    assert "2 segment(s)" in caplog.text and "ms/GiB" in caplog.text
    assert p.stats.pin_ms >= 0.0


def test_fits_predicts_allocate_without_changing_anything():
    p = HostPool(8 * KiB, segment_bytes=4 * KiB, pin=False)
    p.allocate((3 * KiB,), torch.uint8)
    before = p.stats
    assert p.fits([4 * KiB, KiB])
    assert not p.fits([4 * KiB, 2 * KiB])
    assert not p.fits([5 * KiB])
    assert p.stats == before


def test_a_reused_range_carries_the_fences_of_in_flight_copies():
    p = HostPool(4 * KiB, segment_bytes=4 * KiB, pin=False)
    b = p.allocate((KiB,), torch.uint8)
    ev = FakeEvent()
    p.free(b, after=ev)  # an H2D still reads b
    c = p.allocate((2 * KiB,), torch.uint8)  # overlaps b's range
    assert c.fences == [ev]
    c.wait_host()
    assert ev.synchronized == 1 and c.fences == []
    p.free(c)
    d = p.allocate((KiB,), torch.uint8)
    assert d.fences == []  # completed events are dropped


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 3 * KiB), st.integers(0, 1000)), max_size=80))
def test_random_allocate_free_keeps_the_accounting_balanced(ops):
    p = HostPool(8 * KiB, segment_bytes=4 * KiB, pin=False)
    live: list[HostBlock] = []
    for is_alloc, n, pick in ops:
        if is_alloc or not live:
            if p.fits([n]):
                b = p.allocate((n,), torch.uint8)
                b.view().fill_(len(live) % 251)
                live.append(b)
            else:
                with pytest.raises(HostPoolExhausted):
                    p.allocate((n,), torch.uint8)
        else:
            p.free(live.pop(pick % len(live)))
        p.check_invariants()
        assert p.stats.allocations == len(live)


def test_raw_bytes_reads_a_segment_and_refuses_outside_it():
    p = HostPool(8 * KiB, segment_bytes=4 * KiB, pin=False)
    assert p.raw_bytes(1, KiB, 2 * KiB).numel() == 2 * KiB
    for args in [(2, 0, 1), (-1, 0, 1), (True, 0, 1), (0, 3 * KiB, 2 * KiB)]:
        with pytest.raises(ConfigError, match="segment"):
            p.raw_bytes(*args)
