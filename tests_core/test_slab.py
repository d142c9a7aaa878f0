"""slab.py: the bookkeeper alone (pure offsets, property-tested), then the byte owner on CPU tensors."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from djinn_core.memory import slab as slab_mod
from djinn_core.errors import ConfigError, DeviceUnavailable, DoubleFree, SlabExhausted, UnknownAllocation
from djinn_core.memory.slab import Admission, FreeList, Move, Slab, SlabBookkeeper, SlabTensor

pytestmark = pytest.mark.cpu

A = 256  # default alignment


class FakeEvent:
    """Stands in for a torch.cuda.Event: pending until ``done`` is set."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


class FakeStream:
    def __init__(self) -> None:
        self.waited: list[FakeEvent] = []

    def wait_event(self, ev: FakeEvent) -> None:
        self.waited.append(ev)


# ---- bookkeeper ---------------------------------------------------------------------------------------------------


def test_allocations_are_aligned_and_accounted():
    b = SlabBookkeeper(10 * A)
    i1, o1, m1 = b.allocate(1)
    i2, o2, m2 = b.allocate(A + 1)
    assert (o1, o2) == (0, A) and m1 == m2 == []
    assert b.size(i1) == A and b.size(i2) == 2 * A
    s = b.stats
    assert (s.capacity, s.used, s.free, s.largest_free, s.allocations) == (10 * A, 3 * A, 7 * A, 7 * A, 2)
    b.free(i1)
    assert b.stats.used == 2 * A and b.stats.high_water == 3 * A
    b.check_invariants()


def test_zero_byte_allocation_takes_one_alignment_unit():
    b = SlabBookkeeper(4 * A)
    i, o, _ = b.allocate(0)
    j, p, _ = b.allocate(0)
    assert o != p and b.stats.used == 2 * A


def test_capacity_is_rounded_down_to_alignment():
    assert SlabBookkeeper(3 * A + 17).capacity == 3 * A


@pytest.mark.parametrize("cap,align", [(-1, A), (1.5, A), (True, A), (1024, 0), (1024, 3), (1024, "x")])
def test_bad_construction_is_a_config_error(cap, align):
    with pytest.raises(ConfigError):
        SlabBookkeeper(cap, align)


def test_double_free_and_unknown_ids_are_told_apart():
    b = SlabBookkeeper(4 * A)
    i, _, _ = b.allocate(10)
    b.free(i)
    with pytest.raises(DoubleFree):
        b.free(i)
    for bad in (0, -3, 99, "1", None, 1.0):
        with pytest.raises(UnknownAllocation):
            b.free(bad)
    with pytest.raises(ValueError):  # DoubleFree is a ValueError too
        b.free(i)
    b.check_invariants()


def test_exhaustion_carries_the_sizes_and_changes_nothing():
    b = SlabBookkeeper(4 * A)
    b.allocate(3 * A)
    before = b.stats
    with pytest.raises(SlabExhausted) as e:
        b.allocate(A + 1)
    assert (e.value.requested, e.value.free, e.value.capacity) == (2 * A, A, 4 * A)
    assert b.stats == before
    assert isinstance(e.value, MemoryError)


def test_admission_is_three_way():
    b = SlabBookkeeper(8 * A)
    b.allocate(6 * A)
    assert b.admit(2 * A) is Admission.OK
    assert b.admit(3 * A) is Admission.LATER
    assert b.admit(8 * A) is Admission.LATER
    assert b.admit(8 * A + 1) is Admission.NEVER


def test_compaction_slides_down_only_what_blocks_the_hole():
    b = SlabBookkeeper(8 * A)
    ids = [b.allocate(A)[0] for _ in range(8)]
    for k in (1, 3, 5):  # holes at 1, 3, 5 (one unit each); 7 stays live
        b.free(ids[k])
    assert b.stats.largest_free == A
    new, off, moves = b.allocate(2 * A)
    # ids[2] slides 2->1, which merges holes 2..3 into one of two units at offset 2
    assert moves == [Move(ids[2], 2 * A, A, A)]
    assert off == 2 * A
    assert b.offset(ids[0]) == 0 and b.offset(ids[2]) == A and b.offset(ids[4]) == 4 * A
    assert b.compactions == 1 and b.moved_bytes == A
    b.check_invariants()


def test_free_list_merges_neighbours():
    fl = FreeList(10)
    assert fl.take(3) == 0 and fl.take(3) == 3 and fl.take(3) == 6
    fl.release(3, 3)
    fl.release(0, 3)
    assert fl.holes() == [(0, 6), (9, 1)]
    fl.release(6, 3)
    assert fl.holes() == [(0, 10)] and fl.total == 10
    with pytest.raises(AssertionError):
        fl.release(2, 2)


@settings(max_examples=150, deadline=None)
@given(
    capacity_units=st.integers(1, 64),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 24 * A), st.integers(0, 10**6)), max_size=120),
)
def test_bookkeeper_never_fails_what_fits_and_always_tiles(capacity_units, ops):
    """Random allocate/free: an allocation fails iff its aligned size exceeds the free total; moves only slide down
    into free space; allocations and holes always tile the capacity."""
    b = SlabBookkeeper(capacity_units * A)
    live: dict[int, int] = {}  # id -> aligned size
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not live:
            size = b.aligned_size(nbytes)
            free = b.stats.free
            before = b.live()
            if size > free:
                with pytest.raises(SlabExhausted):
                    b.allocate(nbytes)
                assert b.live() == before
                continue
            i, off, moves = b.allocate(nbytes)
            for m in moves:
                assert m.dst < m.src and before[m.alloc_id] == (m.src, m.nbytes)
            assert i not in before and off % A == 0 and off + size <= b.capacity
            live[i] = size
        else:
            i = sorted(live)[pick % len(live)]
            b.free(i)
            del live[i]
        b.check_invariants()
        assert b.stats.used == sum(live.values())
        assert {k: v[1] for k, v in b.live().items()} == live


# ---- slab bytes (CPU tensors) ---------------------------------------------------------------------------------------


def _fill(t: SlabTensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = t.view()
    data = torch.randint(0, 256, (t.nbytes,), dtype=torch.uint8, generator=g)
    v.view(-1).view(torch.uint8).copy_(data)
    return data


def _bytes(t: SlabTensor) -> torch.Tensor:
    return t.view().reshape(-1).view(torch.uint8).clone()


def test_views_have_the_requested_shape_dtype_and_device():
    s = Slab(64 * A, "cpu")
    for shape, dtype in [((2, 3, 4), torch.float16), ((5,), torch.float32), ((), torch.int64), ((0, 7), torch.bfloat16),
                         (3, torch.bool)]:
        t = s.allocate(shape, dtype, tag="x")
        v = t.view()
        assert v.dtype == dtype and v.device.type == "cpu" and v.is_contiguous()
        assert tuple(v.shape) == ((shape,) if isinstance(shape, int) else shape)
        assert t.offset % A == 0 and (v.numel() == 0 or v.data_ptr() - s._buffer.data_ptr() == t.offset)
    s.bookkeeper.check_invariants()


@pytest.mark.parametrize("shape,dtype", [((-1,), torch.float16), ((2.0,), torch.float16), ("ab", torch.float16),
                                         ((2,), "float16"), ((2,), None), (None, torch.float16)])
def test_bad_shape_or_dtype_is_a_config_error(shape, dtype):
    s = Slab(4 * A, "cpu")
    with pytest.raises(ConfigError):
        s.allocate(shape, dtype)
    assert s.stats.allocations == 0


def test_allocations_do_not_alias():
    s = Slab(32 * A, "cpu")
    ts = [s.allocate((100,), torch.float32) for _ in range(8)]
    data = [_fill(t, i) for i, t in enumerate(ts)]
    for t, d in zip(ts, data):
        assert torch.equal(_bytes(t), d)


@pytest.mark.parametrize("staging", [slab_mod.STAGING_BYTES, 3 * A])
def test_compaction_preserves_every_byte_and_bumps_the_generation(monkeypatch, staging):
    monkeypatch.setattr(slab_mod, "STAGING_BYTES", staging)  # small staging: overlapping moves in many chunks
    s = Slab(40 * A, "cpu")
    ts = [s.allocate((A * 4 - 8,), torch.uint8, tag=str(i)) for i in range(10)]  # 4 units each
    data = {t.alloc_id: _fill(t, t.alloc_id) for t in ts}
    for t in ts[::2]:
        s.free(t)
        del data[t.alloc_id]
    keep = ts[1::2]
    gen = s.generation
    big = s.allocate((18 * A,), torch.uint8)  # 5 holes of 4 units: only compaction fits 18
    assert s.generation == gen + 1 and s.stats.compactions == 1
    for t in keep:
        assert torch.equal(_bytes(t), data[t.alloc_id]), t
    big_data = _fill(big, 99)
    for t in keep:
        assert torch.equal(_bytes(t), data[t.alloc_id])
    assert torch.equal(_bytes(big), big_data)
    s.bookkeeper.check_invariants()


def test_an_overlapping_move_copies_correctly(monkeypatch):
    """One allocation slides down by less than its own size (overlapping source and destination)."""
    monkeypatch.setattr(slab_mod, "STAGING_BYTES", A)
    s = Slab(12 * A, "cpu")
    a = s.allocate((A,), torch.uint8)
    b = s.allocate((8 * A,), torch.uint8)
    d = _fill(b, 5)
    s.free(a)
    c = s.allocate((4 * A,), torch.uint8)  # 3 units free at the top, 1 at the bottom: b slides by one unit
    assert b.offset == 0 and c.offset == 8 * A
    assert torch.equal(_bytes(b), d)


def test_freed_handles_refuse_use_and_second_free():
    s = Slab(4 * A, "cpu")
    t = s.allocate((4,), torch.float32)
    s.free(t)
    assert not t.alive
    with pytest.raises(UnknownAllocation):
        t.view()
    with pytest.raises(DoubleFree):
        s.free(t)
    other = Slab(4 * A, "cpu")
    u = other.allocate((4,), torch.float32)
    with pytest.raises(UnknownAllocation):
        s.free(u)
    with pytest.raises(UnknownAllocation):
        s.free("not a handle")
    assert other.stats.allocations == 1 and s.stats.allocations == 0


def test_exhausted_slab_raises_and_keeps_working():
    s = Slab(8 * A, "cpu")
    t = s.allocate((4 * A,), torch.uint8)
    d = _fill(t, 1)
    with pytest.raises(SlabExhausted):
        s.allocate((5 * A,), torch.uint8)
    assert torch.equal(_bytes(t), d)
    u = s.allocate((4 * A,), torch.uint8)
    assert s.stats.free == 0 and u.alive


def test_admission_on_the_slab():
    s = Slab(8 * A, "cpu")
    s.allocate((6 * A,), torch.uint8)
    assert s.admit_tensor((A,), torch.float16) is Admission.OK
    assert s.admit_tensor((2 * A,), torch.float16) is Admission.LATER
    assert s.admit(9 * A) is Admission.NEVER


def test_from_free_memory_on_the_cpu_respects_fraction_and_headroom():
    s = Slab.from_free_memory(1e-6, 0, "cpu")
    assert 0 < s.capacity and s.capacity % A == 0
    with pytest.raises(ConfigError):
        Slab.from_free_memory(0.5, 1 << 62, "cpu")
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(ConfigError):
            Slab.from_free_memory(bad, 0, "cpu")


def test_cuda_slab_without_cuda_is_device_unavailable():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceUnavailable):
        Slab(4 * A, "cuda")
    with pytest.raises(ConfigError):
        Slab(4 * A, "meta")


def test_slab_logs_its_size(caplog):
    with caplog.at_level(logging.INFO, logger="djinn_core.memory.slab"):
        Slab(4 * A, "cpu")
    assert "slab:" in caplog.text


# ---- fences (fake events stand in for CUDA events; the logic is the same) ------------------------------------------


def test_reusing_a_fenced_freed_range_waits_on_its_event(monkeypatch):
    s = Slab(4 * A, "cpu")
    stream = FakeStream()
    monkeypatch.setattr(s, "_current_stream", lambda: stream)
    t = s.allocate((A,), torch.uint8)
    ev = FakeEvent()
    s.free(t, after=ev)  # an async read of t is still in flight
    u = s.allocate((A,), torch.uint8)  # same range
    assert u.offset == 0 and stream.waited == [ev]
    ev.done = True
    s.free(u)
    s.allocate((A,), torch.uint8)
    assert stream.waited == [ev]  # completed fences are dropped, not waited again


def test_allocate_can_hand_the_fences_to_the_caller_instead_of_waiting(monkeypatch):
    s = Slab(8 * A, "cpu")
    stream = FakeStream()
    monkeypatch.setattr(s, "_current_stream", lambda: stream)
    t, far = s.allocate((2 * A,), torch.uint8), s.allocate((A,), torch.uint8)
    ev, ev_far = FakeEvent(), FakeEvent()
    s.free(t, after=ev)
    s.free(far, after=ev_far)
    queried: list[FakeEvent] = []
    monkeypatch.setattr(FakeEvent, "query", lambda self: queried.append(self) or self.done)
    deps: list[FakeEvent] = []
    u = s.allocate((A,), torch.uint8, fences=deps)  # lands in t's old range only
    assert u.offset == 0 and deps == [ev]
    assert stream.waited == [] and queried == []  # no wait queued, no event queried: the caller waits
    deps2: list[FakeEvent] = []
    s.allocate((2 * A,), torch.uint8, fences=deps2)  # spans t's rest and far's range
    assert deps2 == [ev, ev_far]


def test_a_fence_is_consumed_by_the_allocation_that_waits_for_it(monkeypatch):
    """Pause/restore cycles free and re-take the same bytes: each cycle's allocation depends on that cycle's fence
    only, not on every fence the range ever had."""
    s = Slab(8 * A, "cpu")
    stream = FakeStream()
    monkeypatch.setattr(s, "_current_stream", lambda: stream)
    t = s.allocate((3 * A,), torch.uint8)
    for cycle in range(50):
        ev = FakeEvent()
        s.free(t, after=ev)
        deps: list[FakeEvent] = []
        t = s.allocate((3 * A,), torch.uint8, fences=deps)
        assert deps == [ev], cycle
        assert s._free_fences == []
    ev = FakeEvent()
    s.free(t, after=ev)
    s.allocate((A,), torch.uint8)  # the default path waits, and keeps the fence of the bytes it did not take
    assert stream.waited == [ev] and s._free_fences == [(A, 2 * A, ev)]


def test_compaction_waits_for_fences_of_moved_allocations(monkeypatch):
    s = Slab(4 * A, "cpu")
    stream = FakeStream()
    monkeypatch.setattr(s, "_current_stream", lambda: stream)
    a = s.allocate((A,), torch.uint8)
    b = s.allocate((A,), torch.uint8)
    ev_b = FakeEvent()
    s.fence(b, ev_b)  # e.g. an H2D still writing b
    s.free(a)
    s.allocate((3 * A,), torch.uint8)  # b must slide down: wait for its copy first
    assert stream.waited == [ev_b]


def test_fence_on_a_freed_handle_is_rejected():
    s = Slab(4 * A, "cpu")
    t = s.allocate((A,), torch.uint8)
    s.free(t)
    with pytest.raises(UnknownAllocation):
        s.fence(t, FakeEvent())
