"""Why a restore's head copy is slower after a deeper pause, and where restore() spends its time after the head.

Part 1, buffers only: each repeat drains a device-to-host copy of ``S`` bytes (the KV of ``L`` layers of the
Llama-2-13B architecture at 2048 tokens, L in ``--layers``) into pinned memory, then times on the GPU one 20 MiB
host-to-device copy (the head), from the start event, median of ``--repeats``. The 20 MiB come from: ``cold``, a
pinned buffer the D2H did not touch; ``first``, a region the D2H wrote before the KV (the default pause order: the head
is the first item out); ``last``, a region it wrote after the KV; ``tight``, the cold buffer in a tight loop, no D2H
before it. If ``last`` stays flat over L while ``first`` and ``cold`` grow, the order of the pause's copies sets the
restore's depth dependence (recently written host lines are still in the host's cache, or their translations in the
IOMMU's).

Part 2 (``--runtime``): the resume-latency claim's runtime (8 GiB slab, 4 GiB host pool) on the Llama-2-13B
architecture, twice: pausing with the head first (the default) and last (``head_out="last"``). Per L, the claim's own
timing of each (``time_restore_against_manual``) and the claim's max/min over L for each order. Then, head first, each
repeat pauses, drains and calls ``restore()``: the host time of the call, the device time to ``ready_event`` (what the
claim times) and to an event recorded right after the call returned (the claim's ``djinn_host_return_ms``), and the
restore's own tracer marks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from djinn_core.bench.timing import event_ms
from djinn_core.trace import timing_event

DEVICE = "cuda"

HEAD_BYTES = 20 << 20
KV_BYTES_PER_LAYER = 2 * 2048 * 5120 * 2  # K and V, 2048 tokens, hidden 5120, fp16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, nargs="+", default=[1, 10, 20, 30, 40])
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per condition (after 3 warm-ups)")
    p.add_argument("--runtime", action="store_true", help="also part 2: the claim's restore with each head order on the 13B runtime, and restore() itself")


def _buffers_part(layers: list[int], repeats: int) -> None:
    stream = torch.cuda.current_stream()
    kv_max = max(layers) * KV_BYTES_PER_LAYER
    dev = torch.empty(kv_max + HEAD_BYTES, dtype=torch.uint8, device="cuda")
    # one pinned pool: [head written first | KV | head written last]
    pool = torch.empty(HEAD_BYTES + kv_max + HEAD_BYTES, dtype=torch.uint8, pin_memory=True)
    cold = torch.empty(HEAD_BYTES, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(HEAD_BYTES, dtype=torch.uint8, device="cuda")
    first, last = pool[:HEAD_BYTES], pool[HEAD_BYTES + kv_max:]
    sources = {"cold": cold, "first": first, "last": last}

    def offload(kv: int, order: str) -> None:
        kv_dst, kv_src = pool[HEAD_BYTES:HEAD_BYTES + kv], dev[HEAD_BYTES:HEAD_BYTES + kv]
        if order == "first":
            first.copy_(dev[:HEAD_BYTES], non_blocking=True)
        kv_dst.copy_(kv_src, non_blocking=True)
        if order == "last":
            last.copy_(dev[:HEAD_BYTES], non_blocking=True)
        stream.synchronize()

    def head_copy(src: torch.Tensor) -> tuple[float, float]:
        t0 = time.perf_counter()
        start = timing_event(stream)
        target.copy_(src, non_blocking=True)
        t1 = time.perf_counter()
        end = timing_event(stream)
        return event_ms(start, end), (t1 - t0) * 1e6

    tight = []
    for i in range(repeats + 3):
        gpu, _ = head_copy(cold)
        if i >= 3:
            tight.append(gpu)
    print(f"tight loop, cold buffer: {statistics.median(tight):.3f} ms (median of {repeats})")
    print(f"{'L':>3s} {'offload_MB':>10s} " + " ".join(f"{c + '_ms':>9s} {c + '_us':>8s}" for c in sources))
    per: dict[str, list[float]] = {c: [] for c in sources}
    for L in layers:
        kv = L * KV_BYTES_PER_LAYER
        row = []
        for name, src in sources.items():
            gpu, host = [], []
            for i in range(repeats + 3):
                offload(kv, "last" if name == "last" else "first")
                g, h = head_copy(src)
                if i >= 3:
                    gpu.append(g)
                    host.append(h)
            per[name].append(statistics.median(gpu))
            row.append(f"{statistics.median(gpu):9.3f} {statistics.median(host):8.1f}")
        print(f"{L:3d} {kv / 1e6:10.0f} " + " ".join(row), flush=True)
    print("max/min over L: " + ", ".join(f"{c} {max(v) / min(v):.3f}" for c, v in per.items()))


def _runtime_part(layers: list[int], repeats: int) -> None:
    from djinn_core.bench.experiments.resume_latency import time_restore_against_manual
    from djinn_core.bench.probes._setup import llama2_13b_runtime
    from djinn_core.memory.host_pool import HostPool
    from djinn_core.memory.slab import Slab
    from djinn_core.runtime import BreakpointRuntime

    model, first, ids = llama2_13b_runtime(slab_bytes=8 << 30, host_pool_bytes=4 << 30)
    last = BreakpointRuntime(model, slab=Slab(8 << 30, ids.device), host_pool=HostPool(4 << 30), head_out="last")
    stream = torch.cuda.current_stream()
    print("\nthe claim's timing (time_restore_against_manual, medians): djinn = restore until layer L may run, "
          "manual = the hidden state copied back by hand after the same offload")
    print(f"{'L':>3s} {'head_out':>8s} {'djinn_ms':>9s} {'manual_ms':>9s} {'returned_ms':>11s}")
    per: dict[str, list[float]] = {"first": [], "last": []}
    for L in layers:
        for rt in (first, last):
            s = rt.open(ids, max_new_tokens=1)
            hidden = s.run_to(L).hidden.clone()
            t = time_restore_against_manual(s, hidden, repeats=repeats)
            s.close()
            per[rt.head_out].append(t["djinn"].median_ms)
            print(f"{L:3d} {rt.head_out:>8s} {t['djinn'].median_ms:9.3f} {t['manual'].median_ms:9.3f} "
                  f"{t['djinn_host'].median_ms:11.3f}", flush=True)
    print("djinn max/min over L (the claim, bound 1.3): " +
          ", ".join(f"head {k} {max(v) / min(v):.3f}" for k, v in per.items()))

    print(f"\nrestore() itself (head first): {'L':>3s} {'traced':>6s} {'host_call_ms':>12s} {'ready_ms':>9s} "
          f"{'returned_ms':>11s}  restore marks (host ms from the call)")
    for L in layers:
        s = first.open(ids, max_new_tokens=1)
        s.run_to(L)
        for traced in (False, True):  # the untraced pass gives the times, the traced one where the host spends them
            first.tracer.enabled = traced
            first.swap.host_tracer = first.tracer if traced else None  # marks inside the swap engine's calls too
            host, ready, returned, marks = [], [], [], {}
            for i in range(repeats + 3):
                s.pause()
                stream.synchronize()
                first.swap.out_stream.synchronize()
                first.tracer.clear()
                t0 = time.perf_counter()
                start = timing_event(stream)
                s.restore()
                t1 = time.perf_counter()
                end = timing_event(stream)
                r, e = event_ms(start, s.ready_event), event_ms(start, end)
                s.cache.wait_ready()
                torch.cuda.synchronize()
                if i >= 3:
                    host.append((t1 - t0) * 1e3)
                    ready.append(r)
                    returned.append(e)
                    for m in first.tracer.marks:
                        marks.setdefault(m.label, []).append((m.host_s - t0) * 1e3)
            mk = " ".join(f"{k}={statistics.median(v):.3f}" for k, v in marks.items())
            print(f"{'':30s} {L:3d} {str(traced):>6s} {statistics.median(host):12.3f} {statistics.median(ready):9.3f} "
                  f"{statistics.median(returned):11.3f}  {mk}", flush=True)
        first.tracer.enabled = False
        first.swap.host_tracer = None
        s.close()


def run(args: argparse.Namespace) -> int:
    _buffers_part(args.layers, args.repeats)
    if args.runtime:
        _runtime_part(args.layers, args.repeats)
    return 0
