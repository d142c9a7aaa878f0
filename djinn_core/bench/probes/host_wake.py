"""How slow the host's first CUDA calls are after it waited for the GPU, and why.

After a wait of ``ms`` milliseconds for (a) a GPU sleep kernel or (b) a device-to-host copy of pinned memory (DMA
writes into host memory), drained with (s) ``stream.synchronize()``, (q) a Python loop on ``event.query()``, or
(w) ``synchronize()`` then 1 ms of pure-Python busy work, it times on the host one event create+record and one
20 MiB pinned H2D ``copy_`` submission, and on the GPU that copy from the start event (medians).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

DEVICE = "cuda"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per condition (after 3 warm-ups)")


def run(args: argparse.Namespace) -> int:
    stream = torch.cuda.current_stream()
    n = 20 << 20
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    big_host = torch.empty(2 << 30, dtype=torch.uint8, pin_memory=True)
    big_dev = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    # cycles per ms for torch.cuda._sleep
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    torch.cuda._sleep(1_000_000)
    e.record()
    e.synchronize()
    cyc_per_ms = 1_000_000 / s.elapsed_time(e)

    def wait_work(kind: str, ms: float) -> None:
        if kind == "sleep":
            torch.cuda._sleep(int(cyc_per_ms * ms))
        else:  # D2H at ~55 GB/s
            nbytes = min(int(ms * 55e6) // 4096 * 4096, big_host.numel())
            big_host[:nbytes].copy_(big_dev[:nbytes], non_blocking=True)

    def drain(how: str) -> None:
        if how == "sync":
            stream.synchronize()
        elif how == "query":
            ev = torch.cuda.Event()
            ev.record()
            while not ev.query():
                pass
        else:
            stream.synchronize()
            end = time.perf_counter() + 1e-3
            x = 0
            while time.perf_counter() < end:
                x += 1

    print(f"{'work':6s} {'ms':>4s} {'drain':6s} {'event_us':>9s} {'copy_submit_us':>15s} {'gpu_copy_ms':>12s}")
    for kind in ("sleep", "d2h"):
        for ms in (0.5, 8, 32):
            for how in ("sync", "query", "warm"):
                ev_us, sub_us, gpu = [], [], []
                for i in range(args.repeats + 3):
                    wait_work(kind, ms)
                    drain(how)
                    t0 = time.perf_counter()
                    a = torch.cuda.Event(enable_timing=True)
                    a.record(stream)
                    t1 = time.perf_counter()
                    dst.copy_(src, non_blocking=True)
                    t2 = time.perf_counter()
                    b = torch.cuda.Event(enable_timing=True)
                    b.record(stream)
                    b.synchronize()
                    if i >= 3:
                        ev_us.append((t1 - t0) * 1e6)
                        sub_us.append((t2 - t1) * 1e6)
                        gpu.append(a.elapsed_time(b))
                print(f"{kind:6s} {ms:4g} {how:6s} {statistics.median(ev_us):9.1f} {statistics.median(sub_us):15.1f} "
                      f"{statistics.median(gpu):12.3f}", flush=True)
    return 0

