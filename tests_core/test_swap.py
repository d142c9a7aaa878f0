"""swap.py: round trips between the slab and the host pool (CPU: synchronous; GPU: side streams and events)."""

from __future__ import annotations

import pytest
import torch

from djinn_core.memory.cuda_driver import driver_copier
from djinn_core.errors import (ChecksumMismatch, CheckpointStateError, ConfigError, HostPoolExhausted, SlabExhausted,
                               UnknownAllocation)
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.slab import Slab
from djinn_core.memory.swap import SwapEngine, SwappedState, checksum
from djinn_core.trace import Tracer

KiB = 1024


def _engine(device: str = "cpu", slab_bytes: int = 64 * KiB, pool_bytes: int = 64 * KiB, checksums: bool = True,
            segment_bytes: int = 16 * KiB) -> SwapEngine:
    pin = device != "cpu"
    return SwapEngine(Slab(slab_bytes, device), HostPool(pool_bytes, segment_bytes=segment_bytes, pin=pin),
                      checksums=checksums)


def _random_like(shape, dtype, seed, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).view(shape).to(device)


def _put(eng: SwapEngine, items: dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int = 0):
    handles, ref = {}, {}
    for k, (name, (shape, dtype)) in enumerate(items.items()):
        t = eng.slab.allocate(shape, dtype, tag=name)
        ref[name] = _random_like(shape, dtype, seed + k, eng.device)
        t.view().copy_(ref[name])
        handles[name] = t
    return handles, ref


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


ITEMS = {
    "hidden": ((1, 7, 16), torch.float16),
    "kv.0": ((1, 2, 9, 8), torch.bfloat16),
    "kv.1": ((1, 2, 9, 8), torch.bfloat16),
    "mask": ((13,), torch.bool),
    "pos": ((5,), torch.int64),
    "empty": ((0, 4), torch.float32),
}


# ---- CPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.cpu
def test_round_trip_keeps_every_byte_of_every_dtype():
    eng = _engine()
    handles, ref = _put(eng, ITEMS)
    state = eng.swap_out(handles)
    assert eng.slab.stats.used == 0 and all(not t.alive for t in handles.values())
    assert eng.host_pool.stats.allocations == len(ITEMS)
    res = eng.swap_in(state)
    res.wait_all()
    for name, t in res.tensors.items():
        assert t.tag == name and _same_bytes(t.view(), ref[name])
    assert not len(state) and res.pending is None
    assert eng.host_pool.stats.used == 0
    s = eng.stats
    assert (s.items_out, s.items_in, s.swaps_out, s.swaps_in) == (6, 6, 1, 1) and s.bytes_in == s.bytes_out


@pytest.mark.cpu
def test_swap_in_follows_the_order_and_can_bring_back_a_subset_first():
    eng = _engine()
    handles, ref = _put(eng, ITEMS)
    state = eng.swap_out(handles)
    first = eng.swap_in(state, order=["kv.0", "hidden"], names=["hidden", "kv.0"])
    assert first.names == ["kv.0", "hidden"]
    assert first.pending is state and set(state.names) == set(ITEMS) - {"hidden", "kv.0"}
    first.wait("kv.0")
    assert _same_bytes(first.tensors["kv.0"].view(), ref["kv.0"])
    rest = eng.swap_in(state, order=["pos"])
    assert rest.names[0] == "pos" and set(rest.names) == set(ITEMS) - {"hidden", "kv.0"}
    rest.wait_all()
    for name in rest.names:
        assert _same_bytes(rest.tensors[name].view(), ref[name])
    with pytest.raises(CheckpointStateError):
        eng.swap_in(state)


@pytest.mark.cpu
def test_a_host_tracer_marks_each_step_of_a_swap_in_and_nothing_without_one():
    eng = _engine()
    handles, _ = _put(eng, ITEMS)
    state = eng.swap_out(handles)
    eng.swap_in(state, names=["hidden"]).wait_all()  # no tracer: nothing to mark
    eng.host_tracer = Tracer(enabled=True)
    eng.swap_in(state).wait_all()
    assert [m.label for m in eng.host_tracer.marks] == [f"in.allocated_{len(ITEMS) - 1}", "in.copies_issued",
                                                        "in.accounted"]


@pytest.mark.cpu
def test_a_corrupted_host_copy_is_caught_by_the_checksum():
    eng = _engine()
    handles, _ = _put(eng, {"kv.0": ((64,), torch.float16), "kv.1": ((64,), torch.float16)})
    state = eng.swap_out(handles)
    state.wait_host("kv.1")
    h = state.host_view("kv.1").view(torch.uint8)
    h[3] ^= 1
    res = eng.swap_in(state)
    res.wait("kv.0")
    with pytest.raises(ChecksumMismatch, match="kv.1"):
        res.wait("kv.1")


@pytest.mark.cpu
def test_the_checksum_sees_swapped_positions():
    x = torch.arange(16, dtype=torch.int32)
    y = x.clone()
    y[[2, 5]] = y[[5, 2]]
    assert checksum(x)[0] == checksum(y)[0]
    assert checksum(x)[1] != checksum(y)[1]
    assert checksum(torch.zeros(3, dtype=torch.uint8)).tolist() == [0, 0]


@pytest.mark.cpu
def test_without_free_source_the_slab_tensors_stay():
    eng = _engine()
    handles, ref = _put(eng, {"h": ((32,), torch.float32)})
    state = eng.swap_out(handles, free_source=False)
    state.wait("h")
    assert handles["h"].alive and _same_bytes(handles["h"].view(), ref["h"])
    state.wait_host()
    assert _same_bytes(state.host_view("h"), ref["h"])
    assert state.is_complete()


@pytest.mark.cpu
def test_a_full_host_pool_changes_nothing():
    eng = _engine(pool_bytes=4 * KiB, segment_bytes=4 * KiB)
    handles, ref = _put(eng, {"a": ((3 * KiB,), torch.uint8), "b": ((3 * KiB,), torch.uint8)})
    with pytest.raises(HostPoolExhausted):
        eng.swap_out(handles)
    assert all(t.alive for t in handles.values())
    assert eng.host_pool.stats.used == 0
    for name, t in handles.items():
        assert _same_bytes(t.view(), ref[name])
    state = eng.swap_out({"a": handles["a"]})  # the engine keeps working
    eng.swap_in(state).wait_all()


@pytest.mark.cpu
def test_a_full_slab_on_swap_in_changes_nothing():
    eng = _engine(slab_bytes=8 * KiB)
    handles, ref = _put(eng, {"a": ((3 * KiB,), torch.uint8), "b": ((3 * KiB,), torch.uint8)})
    state = eng.swap_out(handles)
    blocker = eng.slab.allocate((4 * KiB,), torch.uint8)
    with pytest.raises(SlabExhausted):
        eng.swap_in(state)
    assert set(state.names) == {"a", "b"} and eng.slab.stats.allocations == 1
    eng.slab.free(blocker)
    res = eng.swap_in(state)
    res.wait_all()
    assert all(_same_bytes(res.tensors[n].view(), ref[n]) for n in ref)


@pytest.mark.cpu
def test_release_frees_the_host_blocks():
    eng = _engine()
    handles, _ = _put(eng, ITEMS)
    state = eng.swap_out(handles)
    eng.release(state, ["hidden"])
    assert "hidden" not in state and len(state) == len(ITEMS) - 1
    eng.release(state)
    assert len(state) == 0 and eng.host_pool.stats.used == 0


@pytest.mark.cpu
def test_bad_inputs_are_typed_errors_and_change_nothing():
    eng = _engine()
    other = _engine()
    handles, _ = _put(eng, {"a": ((8,), torch.float32)})
    foreign = other.slab.allocate((8,), torch.float32)
    with pytest.raises(UnknownAllocation):
        eng.swap_out({"x": foreign})
    with pytest.raises(ConfigError):
        eng.swap_out({"a": handles["a"], "b": handles["a"]})
    with pytest.raises(ConfigError):
        eng.swap_out({1: handles["a"]})
    with pytest.raises(ConfigError):
        eng.swap_out([handles["a"]])
    state = eng.swap_out(handles)
    with pytest.raises(UnknownAllocation):
        eng.swap_out(handles)  # freed by the first swap-out
    with pytest.raises(UnknownAllocation):
        eng.swap_in(state, names=["nope"])
    with pytest.raises(ConfigError):
        eng.swap_in(state, names="a")
    with pytest.raises(ConfigError):
        eng.swap_in(state, names=["a"], order=["a", "a"])
    with pytest.raises(ConfigError):
        other.swap_in(state)
    with pytest.raises(UnknownAllocation):
        state.wait("nope")
    assert state.names == ["a"] and eng.slab.stats.allocations == 0
    res = eng.swap_in(state)
    with pytest.raises(UnknownAllocation):
        res.wait("nope")
    with pytest.raises(ConfigError):
        SwapEngine(eng.slab, "pool")


@pytest.mark.cpu
def test_absorb_merges_states_of_one_engine():
    eng = _engine()
    h1, ref1 = _put(eng, {"a": ((8,), torch.float32)}, seed=1)
    h2, ref2 = _put(eng, {"b": ((8,), torch.float32)}, seed=2)
    s1, s2 = eng.swap_out(h1), eng.swap_out(h2)
    s1.absorb(s2)
    assert s1.names == ["a", "b"] and len(s2) == 0
    with pytest.raises(ConfigError):
        s1.absorb(s1)
    res = eng.swap_in(s1)
    res.wait_all()
    assert _same_bytes(res.tensors["b"].view(), ref2["b"])


@pytest.mark.cpu
def test_swap_in_survives_compaction_of_its_own_destinations():
    """Destinations are allocated before any copy; a later allocation of the same swap-in may compact earlier ones."""
    eng = _engine(slab_bytes=8 * KiB, checksums=True)
    handles, ref = _put(eng, {"a": ((2 * KiB,), torch.uint8), "b": ((2 * KiB,), torch.uint8)})
    state = eng.swap_out(handles)
    pads = [eng.slab.allocate((KiB,), torch.uint8) for _ in range(8)]
    for p in pads[::2]:
        eng.slab.free(p)  # four 1 KiB holes: "a" fits nowhere without compaction
    gen = eng.slab.generation
    res = eng.swap_in(state)
    res.wait_all()
    assert eng.slab.generation > gen
    assert all(_same_bytes(res.tensors[n].view(), ref[n]) for n in ref)


# ---- GPU: streams, events, fences -----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_round_trip_of_data_just_written_by_the_compute_stream(cuda_device):
    eng = _engine(str(cuda_device), slab_bytes=256 << 20, pool_bytes=256 << 20, segment_bytes=64 << 20)
    n = 16 << 20  # bytes per item
    handles = {f"kv.{i}": eng.slab.allocate((n // 2,), torch.float16) for i in range(4)}
    refs = {}
    for i, (name, t) in enumerate(handles.items()):
        src = torch.full((n // 2,), float(i + 1), dtype=torch.float16, device=cuda_device)
        t.view().copy_(src.sin() * src.cos())  # queued on the compute stream right before the swap-out
        refs[name] = (src.sin() * src.cos()).cpu()
    state = eng.swap_out(handles)
    # reuse the freed range at once and scribble on it: the allocation must wait for the D2H copies
    scribble = eng.slab.allocate((4 * n,), torch.uint8)
    scribble.view().fill_(0xAB)
    eng.slab.free(scribble)
    res = eng.swap_in(state, order=["kv.3", "kv.0"])
    for name in ["kv.3", "kv.0", "kv.1", "kv.2"]:
        res.wait(name)
        assert torch.equal(res.tensors[name].view().cpu(), refs[name]), name


@pytest.mark.gpu
def test_gpu_compaction_waits_for_an_in_flight_swap_in(cuda_device):
    eng = _engine(str(cuda_device), slab_bytes=192 << 20, pool_bytes=128 << 20, segment_bytes=64 << 20)
    pad = eng.slab.allocate((32 << 20,), torch.uint8)
    a = eng.slab.allocate((32 << 20,), torch.uint8)
    a.view().copy_(torch.arange(32 << 20, device=cuda_device, dtype=torch.int64).remainder(251).to(torch.uint8))
    ref = a.view().cpu()
    state = eng.swap_out({"a": a})
    res = eng.swap_in(state)  # lands above the pad (first fit after the pad)
    eng.slab.free(pad)
    big = eng.slab.allocate((150 << 20,), torch.uint8)  # compaction slides "a" down while its H2D may be in flight
    assert big.alive and eng.slab.stats.compactions >= 1
    res.wait("a")
    assert torch.equal(res.tensors["a"].view().cpu(), ref)


@pytest.mark.gpu
def test_gpu_concurrent_swap_out_and_swap_in_keep_their_bytes(cuda_device):
    eng = _engine(str(cuda_device), slab_bytes=512 << 20, pool_bytes=512 << 20, segment_bytes=128 << 20)
    h1, r1 = _put(eng, {f"a.{i}": ((8 << 20,), torch.float16) for i in range(4)}, seed=10)
    h2, r2 = _put(eng, {f"b.{i}": ((8 << 20,), torch.float16) for i in range(4)}, seed=20)
    s1 = eng.swap_out(h1)
    s1.wait()
    res1 = eng.swap_in(s1)
    s2 = eng.swap_out(h2)  # overlaps the swap-in on the other stream
    res1.wait_all()
    res2 = eng.swap_in(s2)
    res2.wait_all()
    for name, ref in {**r1, **r2}.items():
        t = (res1.tensors.get(name) or res2.tensors[name]).view()
        assert _same_bytes(t, ref), name


@pytest.mark.gpu
@pytest.mark.parametrize("driver", [True, False], ids=["driver", "torch"])
def test_gpu_one_item_swap_ins_keep_their_bytes_while_the_rest_is_in_flight(cuda_device, driver):
    """swap_in_now (in stream, fences handed over) and swap_in_into (a prepared buffer, current stream; through the
    CUDA driver or through torch), each issued right behind the swap-out that wrote the item (no host wait), the rest
    of the state following. swap_in_into runs once with a new ready event and once with one recorded beforehand."""
    eng = _engine(str(cuda_device), slab_bytes=512 << 20, pool_bytes=512 << 20, segment_bytes=128 << 20,
                  checksums=False)
    if driver:
        assert eng.driver is not None, "libcuda could not be used: restores would take the slower torch path"
    else:
        eng.driver = None
    handles, ref = _put(eng, {"head": ((20 << 20,), torch.uint8),
                              **{f"kv.{i}": ((8 << 20,), torch.float16) for i in range(4)}}, seed=30)
    for cycle in range(4):
        state = eng.swap_out(handles)  # frees every source behind its copies
        if cycle % 2 == 0:
            head, ev = eng.swap_in_now(state, "head")
        else:
            deps: list = []
            head = eng.slab.allocate((20 << 20,), torch.uint8, fences=deps)
            ready = None
            if cycle == 3:
                ready = torch.cuda.Event(enable_timing=True)
                ready.record(eng.out_stream)
            ev = eng.swap_in_into(state, "head", head, deps, event=ready)
            assert ready is None or ev is ready
        rest = eng.swap_in(state)
        torch.cuda.current_stream().wait_event(ev)
        assert _same_bytes(head.view(), ref["head"]), cycle
        rest.wait_all()
        handles = {"head": head, **rest.tensors}
        for name, t in rest.tensors.items():
            assert _same_bytes(t.view(), ref[name]), (cycle, name)


@pytest.mark.gpu
def test_gpu_driver_copier_names_driver_errors(cuda_device):
    drv = driver_copier(cuda_device)
    assert drv is not None
    assert drv.error_name(1) == "CUDA_ERROR_INVALID_VALUE"
    assert drv.current_stream() == torch.cuda.current_stream(cuda_device).cuda_stream


@pytest.mark.cpu
def test_no_driver_copier_off_cuda():
    assert driver_copier(torch.device("cpu")) is None
    assert _engine().driver is None


@pytest.mark.gpu
def test_gpu_checksum_catches_corruption(cuda_device):
    eng = _engine(str(cuda_device), slab_bytes=8 << 20, pool_bytes=8 << 20, segment_bytes=8 << 20)
    handles, _ = _put(eng, {"x": ((1 << 20,), torch.float16)})
    state = eng.swap_out(handles)
    state.wait_host()
    state.host_view("x").view(torch.uint8)[12345] ^= 0x10
    res = eng.swap_in(state)
    with pytest.raises(ChecksumMismatch):
        res.wait("x")


@pytest.mark.cpu
def test_swapped_state_reports_sizes():
    eng = _engine()
    handles, _ = _put(eng, {"a": ((10,), torch.float16), "b": ((300,), torch.uint8)})
    state = eng.swap_out(handles)
    assert isinstance(state, SwappedState)
    assert state.nbytes == 320 and state.slab_bytes() == 256 + 512 and state.slab_bytes(["a"]) == 256


@pytest.mark.cpu
def test_swap_timing_records_need_cuda_events():
    from djinn_core.errors import DeviceUnavailable
    from djinn_core.memory.swap import swap_timeline
    from djinn_core.trace import Mark, Span

    rec = Span("out", Mark("start", 0.0), Mark("end", 0.001), {"nbytes": 10, "items": 1})
    with pytest.raises(DeviceUnavailable):
        swap_timeline([rec])
    cpu = SwapEngine(Slab(KiB, "cpu"), HostPool(KiB, segment_bytes=KiB, pin=False), record_timing=True)
    assert not cpu.record_timing  # a CPU engine keeps no timing records


@pytest.mark.cpu
def test_swap_in_into_a_prepared_buffer_keeps_the_bytes_and_rejects_a_mismatch():
    eng = _engine(checksums=False)
    handles, originals = _put(eng, {"head": ((1000,), torch.uint8), "kv": ((4, 8), torch.float16)})
    state = eng.swap_out(handles, free_source=True)
    wrong = eng.slab.allocate((999,), torch.uint8)
    with pytest.raises(ConfigError):
        eng.swap_in_into(state, "head", wrong)
    assert "head" in state  # nothing taken
    eng.slab.free(wrong)
    dst = eng.slab.allocate((1000,), torch.uint8)
    assert eng.swap_in_into(state, "head", dst, []) is None  # CPU: no event
    assert _same_bytes(dst.view(), originals["head"]) and state.names == ["kv"]
    assert eng.stats.items_in == 1
    with pytest.raises(UnknownAllocation):
        eng.swap_in_into(state, "head", dst)  # already taken


@pytest.mark.cpu
def test_swap_in_into_refuses_checksum_mode():
    eng = _engine(checksums=True)
    handles, _ = _put(eng, {"head": ((64,), torch.uint8)})
    state = eng.swap_out(handles, free_source=True)
    dst = eng.slab.allocate((64,), torch.uint8)
    with pytest.raises(ConfigError):
        eng.swap_in_into(state, "head", dst)


class _FakeEvent:
    """An event at a fixed time (ms) with torch.cuda.Event's elapsed_time / synchronize."""

    def __init__(self, t_ms: float):
        self.t = t_ms

    def elapsed_time(self, other: "_FakeEvent") -> float:
        return other.t - self.t

    def synchronize(self) -> None:
        pass


@pytest.mark.cpu
def test_swap_timeline_measures_overlap_with_the_other_direction():
    from djinn_core.memory.swap import swap_timeline
    from djinn_core.trace import Mark, Span

    def rec(d, t0, t1):  # issued in t0 / 10 ms of host time
        return Span(d, Mark("start", 0.0, _FakeEvent(t0)), Mark("end", t0 / 1e4, _FakeEvent(t1)),
                    {"nbytes": 100, "items": 1})

    records = [rec("out", 10.0, 20.0), rec("in", 15.0, 30.0), rec("in", 30.0, 35.0), rec("out", 32.0, 40.0)]
    tl = swap_timeline(records)
    assert [t["start_ms"] for t in tl] == [0.0, 5.0, 20.0, 22.0]
    assert [t["ms"] for t in tl] == [10.0, 15.0, 5.0, 8.0]
    # in [15, 30] shares 15..20 with the first out; in [30, 35] shares 32..35 with the second; outs likewise
    assert [t["overlap_ms"] for t in tl] == [5.0, 5.0, 3.0, 3.0]
    assert [t["host_issue_ms"] for t in tl] == pytest.approx([1.0, 1.5, 3.0, 3.2])
    assert swap_timeline([]) == []


def _offset(t) -> int:
    return t.slab._book.offset(t.alloc_id)


@pytest.mark.gpu
@pytest.mark.parametrize("driver", [True, False], ids=["driver", "torch"])
def test_gpu_swap_in_waits_for_the_fence_of_the_range_it_reuses(cuda_device, driver):
    """y goes out first and x second; both ranges are freed behind x's copy. y swapped back in at once lands where x
    was, while x's D2H may still be reading there: the in stream must wait for that fence (handed over by the
    allocation), not only for y's own, earlier D2H. y's bytes and x's host copy (checked by swapping x back) must both
    be intact."""
    eng = _engine(str(cuda_device), slab_bytes=256 << 20, pool_bytes=256 << 20, segment_bytes=128 << 20,
                  checksums=False)
    if not driver:
        eng.driver = None
    for cycle in range(4):
        handles, ref = _put(eng, {"x": ((64 << 20,), torch.uint8), "y": ((64 << 20,), torch.uint8)}, seed=40 + cycle)
        x_at = _offset(handles["x"])
        state = eng.swap_out({"y": handles["y"], "x": handles["x"]})
        first = eng.swap_in(state, names=["y"])
        assert _offset(first.tensors["y"]) == x_at  # the hazard this test is about
        first.wait_all()
        second = eng.swap_in(first.pending)
        second.wait_all()
        assert _same_bytes(first.tensors["y"].view(), ref["y"]), cycle
        assert _same_bytes(second.tensors["x"].view(), ref["x"]), cycle
        eng.slab.free(first.tensors["y"], after=first.events["y"])
        eng.slab.free(second.tensors["x"], after=second.events["x"])
        torch.cuda.synchronize()


@pytest.mark.cpu
def test_a_swap_in_lands_in_the_range_freed_last_first_fit():
    """The layout the GPU fence test relies on: y, swapped out before x, comes back at x's offset."""
    eng = _engine(slab_bytes=8 * KiB, pool_bytes=8 * KiB, segment_bytes=8 * KiB, checksums=False)
    handles, ref = _put(eng, {"x": ((1 * KiB,), torch.uint8), "y": ((1 * KiB,), torch.uint8)})
    x_at = _offset(handles["x"])
    state = eng.swap_out({"y": handles["y"], "x": handles["x"]})
    first = eng.swap_in(state, names=["y"])
    assert _offset(first.tensors["y"]) == x_at
    second = eng.swap_in(first.pending)
    assert _same_bytes(first.tensors["y"].view(), ref["y"]) and _same_bytes(second.tensors["x"].view(), ref["x"])


@pytest.mark.cpu
def test_typed_item_keys_and_kept_items():
    """Items may be named by interned ItemKeys; ``keep`` copies an item out but leaves its slab range allocated (a KV
    block another session still reads), fenced by its copy."""
    from djinn_core.memory.swap import ItemKey

    head, kv0 = ItemKey("head"), ItemKey("kv", 0)
    assert ItemKey("kv", 0) is kv0 and repr(kv0) == "kv.0" and kv0.index == 0 and head.index is None
    ItemKey("kv", 1)  # interned first: True or 1.0 must not find it
    for bad in (("", 1), ("kv", -1), ("kv", True), ("kv", 1.0), (3, None)):
        with pytest.raises(ConfigError):
            ItemKey(*bad)
    with pytest.raises(AttributeError):
        kv0.index = 1
    eng = _engine()
    handles, ref = _put(eng, {"a": ((64,), torch.float32), "b": ((32,), torch.float16)})
    items = {head: handles["a"], kv0: handles["b"]}
    state = eng.swap_out(items, keep=[kv0])
    assert not handles["a"].alive and handles["b"].alive
    assert eng.slab.stats.allocations == 1 and state.names == [head, kv0]
    assert _same_bytes(handles["b"].view(), ref["b"])
    res = eng.swap_in(state, order=[kv0, head])
    res.wait_all()
    assert res.names == [kv0, head] and _same_bytes(res.tensors[kv0].view(), ref["b"])
    assert _same_bytes(res.tensors[head].view(), ref["a"])


# ---- link brackets (measurement): reference copies right around each bulk swap ------------------------------------


class _CallLog:
    """A bracket that records its calls and copies nothing."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def __call__(self, direction, stream, nbytes):
        self.calls.append((direction, nbytes))
        return None


@pytest.mark.cpu
def test_a_bracket_is_taken_before_and_after_each_bulk_swap_and_changes_no_byte():
    eng = _engine(checksums=False)
    eng.bracket = log = _CallLog()
    handles, ref = _put(eng, {"a": ((100,), torch.float16), "b": ((300,), torch.uint8), "head": ((64,), torch.uint8)})
    state = eng.swap_out(handles)
    assert log.calls == [("out", 564), ("out", 564)]
    head = eng.slab.allocate((64,), torch.uint8)
    eng.swap_in_into(state, "head", head)  # into a prepared buffer: not offered to the bracket
    res = eng.swap_in(state)
    assert log.calls[2:] == [("in", 500), ("in", 500)]
    assert _same_bytes(head.view(), ref["head"]) and all(_same_bytes(res.tensors[n].view(), ref[n]) for n in "ab")
    eng.bracket = None
    eng.swap_out({"a": res.tensors["a"]})
    assert len(log.calls) == 4


@pytest.mark.cpu
def test_link_bracket_copies_up_to_its_buffer_for_large_swaps_only():
    from djinn_core.bench.ceilings import LinkBracket

    b = LinkBracket(4 * KiB, "cpu", min_swap_bytes=2 * KiB)
    assert b(direction="in", stream=None, nbytes=KiB) is None and b.copies == 0
    b.host.fill_(5)
    span = b("in", None, 16 * KiB)
    assert span.label == "bracket-in" and span.data == {"nbytes": 4 * KiB} and int(b.dev.sum()) == 5 * 4 * KiB
    b.dev.fill_(9)
    assert b("out", None, 3 * KiB).data == {"nbytes": 3 * KiB} and int(b.host[:3 * KiB].sum()) == 9 * 3 * KiB
    assert b.copies == 2
    with pytest.raises(ConfigError):
        b("h2d", None, 16 * KiB)
    with pytest.raises(ConfigError):
        LinkBracket(0, "cpu")


@pytest.mark.cpu
def test_swap_timeline_rates_each_bracketed_swap_against_its_brackets():
    from djinn_core.memory.swap import swap_timeline
    from djinn_core.trace import Mark, Span

    def span(label, t0, t1, n):
        return Span(label, Mark("start", 0.0, _FakeEvent(t0)), Mark("end", 0.0, _FakeEvent(t1)), {"nbytes": n})

    swap_in = span("in", 10.0, 40.0, 3_000_000)  # 30 ms: 0.1 GB/s
    swap_in.data["bracket"] = (span("bracket-in", 0.0, 10.0, 1_000_000), span("bracket-in", 40.0, 50.0, 1_000_000))
    swap_out = span("out", 45.0, 55.0, 500_000)  # shares 45..50 with the bracket after the swap-in
    tl = swap_timeline([swap_in, swap_out])
    row = tl[0]
    assert row["GBps"] == pytest.approx(0.1) and row["bracket_ms"] == [10.0, 10.0]
    assert row["bracket_nbytes"] == 2_000_000 and row["bracket_GBps"] == pytest.approx(0.1)
    assert row["over_bracket"] == pytest.approx(1.0)
    assert row["overlap_ms"] == 0.0 and row["bracket_overlap_ms"] == 5.0
    assert tl[1]["overlap_ms"] == 5.0 and "bracket_GBps" not in tl[1]  # the other way's bracket is link traffic too


@pytest.mark.gpu
def test_gpu_brackets_sit_right_around_their_swap_on_its_stream(cuda_device):
    from djinn_core.bench.ceilings import LinkBracket
    from djinn_core.memory.swap import swap_timeline

    eng = _engine(str(cuda_device), slab_bytes=256 << 20, pool_bytes=256 << 20, segment_bytes=64 << 20,
                  checksums=False)
    eng.record_timing = True
    eng.bracket = LinkBracket(32 << 20, cuda_device, min_swap_bytes=1 << 20)
    handles, ref = _put(eng, {f"kv.{i}": ((8 << 20,), torch.float16) for i in range(4)})
    state = eng.swap_out(handles)
    res = eng.swap_in(state)
    res.wait_all()
    assert all(_same_bytes(res.tensors[n].view(), r) for n, r in ref.items())
    assert eng.bracket.copies == 4
    for rec in eng.records:
        pre, post = rec.data["bracket"]
        assert pre.end.event.elapsed_time(rec.start.event) >= 0 and rec.end.event.elapsed_time(post.start.event) >= 0
    tl = swap_timeline(eng.records)
    assert [r["direction"] for r in tl] == ["out", "in"]
    assert all(r["bracket_nbytes"] == 2 * (32 << 20) and r["over_bracket"] > 0 for r in tl)
    assert all(r["segments"] and set(r["segments"]) <= set(range(4)) for r in tl)  # 256 MiB in 64 MiB segments
