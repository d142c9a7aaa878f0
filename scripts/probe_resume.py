"""Diagnostic: where a breakpoint restore spends its time, on the host and on the GPU, per layer L.

Runs the resume-latency experiment's restore loop (pause, drain, restore) on the Llama-2-13B architecture with the
runtime's phase tracing on, and prints, per L, the median host and device milliseconds from the restore call to each
phase (room made, head copy issued, layer L ready, KV copies issued) and the head copy's own start and duration on
the in stream. Next to it, the same bytes copied by hand under four conditions, to separate Djinn's overhead from the
machine's state:

* ``manual``: a fresh pinned buffer copied in a tight loop (the experiment's baseline);
* ``manual_after_pause``: the same copy, each time right after the session's pause (its D2H traffic) drained;
* ``pool_after_pause``: the head's own host-pool block copied by hand right after the pause;
* ``pool_hot``: that block copied in a tight loop.

    PYTHONPATH=. python3 scripts/probe_resume.py [--layers 1 10 20 30 40] [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from djinn_core.runtime import HEAD, BreakpointRuntime
from djinn_core.memory.host_pool import HostPool
from djinn_core.models import build_model
from djinn_core.memory.slab import Slab
from djinn_core.bench.timing import time_cuda

WARMUP = 3


def _timed(fn) -> float:
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e)


def _started(stream, fn) -> tuple[torch.cuda.Event, float]:
    """Record a start event on ``stream``, run ``fn``; return the event and ``fn``'s host milliseconds."""
    e0 = torch.cuda.Event(enable_timing=True)
    e0.record(stream)
    t0 = time.perf_counter()
    fn()
    return e0, (time.perf_counter() - t0) * 1e3


def _spin_us(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def probe_layer(rt, s, repeats: int, ab_only: bool = False) -> dict[str, float]:
    stream = torch.cuda.current_stream()
    phases: dict[str, list[float]] = {}

    def add(k, v):
        phases.setdefault(k, []).append(v)

    def paused():
        s.pause()
        stream.synchronize()
        rt.swap.out_stream.synchronize()

    def back():
        s.restore()
        s.cache.wait_ready()
        stream.synchronize()
        rt.swap.in_stream.synchronize()

    # the test's restore timing, the head's copy issued through the CUDA driver or through torch, alternated
    drv, trace = rt.swap.driver, rt.trace
    rt.trace = False
    for i in range(repeats + WARMUP):
        for label, d in (("restore_driver", drv), ("restore_torch", None)):
            rt.swap.driver = d
            paused()
            e0, host = _started(stream, s.restore)
            s.ready_event.synchronize()
            if i >= WARMUP:
                add(label, e0.elapsed_time(s.ready_event))
                add(f"{label}_host", host)
            s.cache.wait_ready()
            stream.synchronize()
            rt.swap.in_stream.synchronize()
    rt.swap.driver, rt.trace = drv, trace
    if ab_only:
        return {k: statistics.median(v) for k, v in phases.items()} | {"head_bytes": s._head.buf.nbytes}

    rt.swap.record_timing = True
    for i in range(repeats + WARMUP):
        paused()
        rt.trace_log.clear()
        rt.swap.records.clear()
        s.restore()
        s.cache.wait_ready()
        stream.synchronize()
        rt.swap.in_stream.synchronize()
        (_, h0, e0), rest = rt.trace_log[0], rt.trace_log[1:]
        if i < WARMUP:
            continue
        for label, h, e in rest:
            add(f"{label.split('.')[1]}_host", (h - h0) * 1e3)
            add(f"{label.split('.')[1]}_gpu", e0.elapsed_time(e))
        head = rt.swap.records[0]  # the restore's first swap-in: the packed head alone
        add("head_copy_start", e0.elapsed_time(head.start))
        add("head_copy", head.start.elapsed_time(head.end))
    rt.swap.record_timing = False

    # the head alone (no KV copies issued behind it, no trace events), host marks inside the swap engine
    rt.trace = False
    for i in range(repeats + WARMUP):
        paused()
        rt.swap.record_timing = True
        rt.swap.records.clear()
        rt.swap.host_marks = []
        t0 = time.perf_counter()
        e0, host = _started(stream, s._restore_head)
        s.ready_event.synchronize()
        rt.swap.record_timing = False
        if i >= WARMUP:
            add("headonly_ready", e0.elapsed_time(s.ready_event))
            add("headonly_host", host)
            for label, t in rt.swap.host_marks:
                add(f"mark_{label}", (t - t0) * 1e3)
        rt.swap.host_marks = None
        s._restore_kv()
        s.cache.wait_ready()
        stream.synchronize()
        rt.swap.in_stream.synchronize()
    rt.trace = True

    # host costs right after a drained pause: an event record, the room check, one allocation and free
    for i in range(repeats + WARMUP):
        paused()
        t0 = time.perf_counter()
        torch.cuda.Event(enable_timing=True).record(stream)
        t1 = time.perf_counter()
        rt._make_room(s.id, s._swapped.slab_bytes())
        t2 = time.perf_counter()
        t = rt.slab.allocate((s._swapped.items[HEAD].nbytes,), torch.uint8)
        t3 = time.perf_counter()
        rt.slab.free(t)
        if i >= WARMUP:
            add("host_event_record", (t1 - t0) * 1e3)
            add("host_make_room", (t2 - t1) * 1e3)
            add("host_allocate", (t3 - t2) * 1e3)
        back()

    nbytes = s._head.buf.nbytes
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    copy = lambda src: target.copy_(src, non_blocking=True)  # noqa: E731
    phases["manual"] = list(time_cuda(lambda: copy(pinned), warmup=WARMUP, repeats=repeats).samples_ms)
    # each variant as the first thing after a drained pause: (source, destination) of the same bytes
    def slab_dst():
        return rt.slab.allocate((nbytes,), torch.uint8)

    for variant in ("fresh_to_tensor", "pool_to_tensor", "fresh_to_slab", "pool_to_slab"):
        for i in range(repeats + WARMUP):
            paused()
            src = pinned if variant.startswith("fresh") else \
                s._swapped.items[HEAD].block.view().view(torch.uint8).reshape(-1)
            dst_h = slab_dst() if variant.endswith("slab") else None
            dst = target if dst_h is None else dst_h.view()
            a, b, c = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            a.record(stream)
            b.record(stream)
            dst.copy_(src, non_blocking=True)
            c.record(stream)
            c.synchronize()
            if dst_h is not None:
                rt.slab.free(dst_h)
            if i >= WARMUP:
                add(f"first_{variant}", a.elapsed_time(c))
                add(f"first_{variant}_copy", b.elapsed_time(c))
            back()
    paused()
    src = s._swapped.items[HEAD].block.view().view(torch.uint8).reshape(-1)
    phases["pool_hot"] = list(time_cuda(lambda: copy(src), warmup=WARMUP, repeats=repeats).samples_ms)
    back()
    out = {k: statistics.median(v) for k, v in phases.items()}
    out["head_bytes"] = nbytes
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama2-13b")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 10, 20, 30, 40])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", help="write the medians per L here")
    p.add_argument("--ab-only", action="store_true", help="only the driver-vs-torch restore comparison")
    args = p.parse_args()
    model = build_model(args.arch, device="cuda", dtype=torch.float16, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    rt = BreakpointRuntime(model, slab=Slab(8 << 30, "cuda"), host_pool=HostPool(4 << 30), trace=True)
    results = {}
    for layer in args.layers:
        s = rt.open(ids, max_new_tokens=64)
        s.run_to(layer)
        r = results[layer] = probe_layer(rt, s, args.repeats, args.ab_only)
        s.close()
        print(f"L={layer:2d} " + " ".join(f"{k}={v:.3f}" for k, v in r.items() if k != "head_bytes")
              + f" head_MiB={r['head_bytes'] / 2**20:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
