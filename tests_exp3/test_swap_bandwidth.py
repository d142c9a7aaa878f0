"""Swapping one Llama-2-13B session's KV cache (2048 tokens, 1.5625 GiB) runs at the PCIe link's pinned ceiling.

Each claim divides by a ceiling measured in the same run on the very bytes the swap moves (the slab's and the pinned
host pool's own memory), interleaved with the swaps repeat by repeat (ceiling, swap, ceiling, swap, ...), so a link
that wanders during the test moves both numbers together. The swap is timed with CUDA events on the compute stream,
which waits for the swap's per-item events: that is when a consumer could use the data.

Layout: two sessions ("a", "b"), 40 items each (``kv.<i>``: K and V of one layer, (2, 1, 40, 2048, 128) fp16,
40 MiB), the layout the breakpoint sessions use. Before every repeat the sessions are put back in place, untimed:
"a" in the slab's lower half, "b" in the upper half, each session's host blocks in one pinned segment.

The ceiling copies run on the sessions' own bytes and overwrite them: these benchmarks do not check contents
(tests_core/test_swap.py does, on the GPU too). The ``cpu`` tests run the same plumbing at a tiny size (two layers,
16 tokens) with host timers, no ceilings and no claims, and check that every byte survives.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from djinn_core.bench import preconditions as pre
from djinn_core.bench.ceilings import CopyCeiling, copy_ceiling_on
from djinn_core.bench.experiments.swap_bandwidth import (MODEL, REPEATS, SESSIONS, TOKENS, SwapBench, cuda_ceiling,
                                                         interleaved)
from djinn_core.bench.timing import time_cuda, time_host
from djinn_core.memory.slab import Slab


@pytest.fixture(scope="module")
def bench_13b(cuda_device) -> SwapBench:
    return SwapBench(cuda_device)


def _params(b: SwapBench) -> dict[str, Any]:
    return {"model": MODEL, "tokens": TOKENS, "layers": b.layers, "item_bytes": b.item_bytes,
            "kv_bytes": b.kv_bytes, "repeats": REPEATS}


def _swaps_happened(claim, b: SwapBench, before, swap_t, directions: tuple[str, ...]) -> None:
    """Preconditions of a swap-bandwidth claim: the swaps were timed, and the engine moved bytes each way."""
    after = b.engine.stats
    for d in directions:
        pre.swaps_measured(claim, direction=d, swaps=swap_t.n, params=_params(b))
        moved = getattr(after, f"bytes_{d}") - getattr(before, f"bytes_{d}")
        pre.bytes_moved(claim, nbytes=moved, what=f"bytes the swap engine moved {d} during the run",
                        params=_params(b))


# ---- H100 claims -------------------------------------------------------------------------------------------------


@pytest.mark.h100
def test_swap_out_of_one_13b_session_runs_at_the_pinned_ceiling(claim, bench_13b):
    b = bench_13b

    def run() -> None:
        b.swap_out("a").wait()

    def measure():
        # "a" lives in the slab's lower half; its host copy lands in segment 0 (both segments are free when it goes out)
        return interleaved(cuda_ceiling("d2h", b.host_segment(0), b.slab_half(0)), run,
                           lambda: b.place({"a"}), time_cuda)

    before = b.engine.stats
    ceiling_t, swap_t = claim.measure(measure)
    _swaps_happened(claim, b, before, swap_t, ("out",))
    ceiling = CopyCeiling("d2h", b.kv_bytes, True, ceiling_t)
    claim.info(ceiling=ceiling.to_dict(), swap_timing=swap_t.to_dict(), slab=b.slab.stats.__dict__)
    claim.bandwidth("swap_out_at_pinned_ceiling", what="one session's KV swapped out (slab to pinned host pool)",
                    method="swap_engine_d2h", timing=swap_t, bytes_moved=b.kv_bytes,
                    ceiling_GBps=ceiling.GBps, ceiling=ceiling, bound=0.90, params=_params(b))


@pytest.mark.h100
def test_swap_in_of_one_13b_session_runs_at_the_pinned_ceiling(claim, bench_13b):
    b = bench_13b

    def run() -> None:
        b.swap_in("a").wait_all()

    def measure():
        return interleaved(cuda_ceiling("h2d", b.host_segment(0), b.slab_half(0)), run,
                           lambda: b.place(set()), time_cuda)

    before = b.engine.stats
    ceiling_t, swap_t = claim.measure(measure)
    _swaps_happened(claim, b, before, swap_t, ("in",))
    ceiling = CopyCeiling("h2d", b.kv_bytes, True, ceiling_t)
    claim.info(ceiling=ceiling.to_dict(), swap_timing=swap_t.to_dict())
    claim.bandwidth("swap_in_at_pinned_ceiling", what="one session's KV swapped in (pinned host pool to slab)",
                    method="swap_engine_h2d", timing=swap_t, bytes_moved=b.kv_bytes,
                    ceiling_GBps=ceiling.GBps, ceiling=ceiling, bound=0.90, params=_params(b))


@pytest.mark.h100
def test_swap_out_concurrent_with_swap_in_runs_at_the_bidirectional_ceiling(claim, bench_13b):
    """Session "b" goes out (upper slab half -> segment 1) while "a" comes in (segment 0 -> lower slab half)."""
    b = bench_13b

    def run() -> None:
        out = b.swap_out("b")
        res = b.swap_in("a")
        out.wait()
        res.wait_all()

    def measure():
        ceiling = cuda_ceiling("bidir", b.host_segment(0), b.slab_half(0), host2=b.host_segment(1), dev2=b.slab_half(1))
        return interleaved(ceiling, run, lambda: b.place({"b"}), time_cuda)

    before = b.engine.stats
    ceiling_t, swap_t = claim.measure(measure)
    _swaps_happened(claim, b, before, swap_t, ("out", "in"))
    ceiling = CopyCeiling("bidir", b.kv_bytes, True, ceiling_t)
    claim.info(ceiling=ceiling.to_dict(), swap_timing=swap_t.to_dict())
    claim.bandwidth("concurrent_swap_at_bidirectional_ceiling",
                    what="one session swapped out while another is swapped in",
                    method="swap_engine_bidir", timing=swap_t,
                    bytes_moved=2 * b.kv_bytes, ceiling_GBps=ceiling.GBps, ceiling=ceiling, bound=0.85,
                    params=_params(b))


@pytest.mark.h100
def test_slab_allocate_and_free_take_microseconds(claim, bench_13b):
    """Median host time of one allocate + free of a layer's KV (10,000 operations) on a slab holding 40 other
    allocations, against the time the same-run pinned ceiling needs to copy that one item: allocation must never be
    what a resume waits for (bound: a tenth of one item's copy)."""
    b = bench_13b
    b.place({"a", "b"})
    slab = Slab(b.item_bytes * 48, b.device)
    keep = [slab.allocate(b.item_shape, b.dtype) for _ in range(40)]
    for t in keep[::4]:
        slab.free(t)  # a few holes: first fit walks a real free list

    def alloc_free() -> None:
        slab.free(slab.allocate(b.item_shape, b.dtype))

    def measure():
        return (time_host(alloc_free, warmup=100, repeats=10_000),
                copy_ceiling_on(b.host_segment(0)[: b.item_bytes], b.slab_half(0)[: b.item_bytes], "h2d"))

    lat, ceiling = claim.measure(measure)
    item_copy_ms = b.item_bytes / (ceiling.GBps * 1e9) * 1e3
    claim.info(alloc_free_median_us=lat.median_ms * 1e3, alloc_free_p10_us=lat.p10_ms * 1e3,
               alloc_free_p90_us=lat.p90_ms * 1e3, operations=lat.n, item_copy_ms=item_copy_ms,
               ceiling=ceiling.to_dict())
    claim.ratio("slab_alloc_free_small_next_to_one_item_copy",
                what="median slab allocate + free against one layer's KV copy at the pinned ceiling",
                method="host_perf_counter",
                measured=lat.median_ms, reference=item_copy_ms, bound=0.1, op="<=", unit="ms",
                reference_method="one_item_at_pinned_h2d_ceiling",
                params={"operations": lat.n, "item_bytes": b.item_bytes, "live_allocations": 30})


# ---- CPU plumbing: the same code at a tiny size, no speed asserted ---------------------------------------------------


@pytest.fixture
def bench_tiny() -> SwapBench:
    return SwapBench(torch.device("cpu"), num_layers=2, tokens=16, checksums=True)


@pytest.mark.cpu
def test_tiny_bench_has_the_model_geometry(bench_tiny):
    b = bench_tiny
    assert b.item_shape == (2, 1, 40, 16, 128) and b.layers == 2
    assert b.kv_bytes == 2 * b.item_bytes and b.pool.stats.segments == 2


@pytest.mark.cpu
@pytest.mark.parametrize("direction", ["out", "in", "bidir"])
def test_tiny_bench_plumbing_keeps_every_byte(bench_tiny, direction):
    b = bench_tiny
    ref = {sid: {n: t.view().clone() for n, t in b.resident[sid].items()} for sid in SESSIONS}
    if direction == "out":
        run, before, on_slab = (lambda: b.swap_out("a").wait()), (lambda: b.place({"a"})), {"a"}
    elif direction == "in":
        run, before, on_slab = (lambda: b.swap_in("a").wait_all()), (lambda: b.place(set())), set()
    else:
        def run() -> None:
            out = b.swap_out("b")
            res = b.swap_in("a")
            out.wait()
            res.wait_all()
        before, on_slab = (lambda: b.place({"b"})), {"b"}
    # no-op "ceiling": on the GPU the ceiling copies overwrite the sessions' bytes; here the bytes are checked
    c, r = interleaved(lambda: time_host(lambda: None, warmup=0, repeats=1), run, before, time_host, repeats=3)
    assert c.n == r.n == 3 and r.clock == "host"
    b.place(on_slab)
    if direction == "bidir":  # the layout the GPU claim relies on: "a" low, "b" high, one segment per session
        assert b.resident["b"]["kv.0"].offset >= b.kv_bytes
        assert {blk.segment for blk in (it.block for it in b.swapped["a"].items.values())} == {0}
    b.place(set(SESSIONS))
    for sid in SESSIONS:
        for n, t in b.resident[sid].items():
            assert torch.equal(t.view(), ref[sid][n]), (sid, n)
    b.slab.bookkeeper.check_invariants()
    b.pool.check_invariants()
    assert b.pool.stats.used == 0 and b.slab.stats.used == 2 * b.kv_bytes
