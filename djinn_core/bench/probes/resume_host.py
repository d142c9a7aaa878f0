"""Where the host time of an in-process resume goes (cProfile), at one depth of the Llama-2-13B architecture at
2048 tokens, last logits to the host, as the RPC claim times it (a fresh fork of one checkpoint per resume).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from djinn_core.bench.probes._setup import llama2_13b_runtime

DEVICE = "cuda"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", type=int, default=40)
    p.add_argument("--repeats", type=int, default=50)


def run(a: argparse.Namespace) -> int:
    _, rt, ids = llama2_13b_runtime()
    base = rt.open(ids, max_new_tokens=1)
    base.run_to(a.layer)
    torch.cuda.synchronize()
    launch, total = [], []

    def once() -> None:
        (c,) = base.fork(1)
        t0 = time.perf_counter()
        out = c.resume()
        t1 = time.perf_counter()
        out[:, -1].cpu()
        t2 = time.perf_counter()
        c.close()
        launch.append((t1 - t0) * 1e3)
        total.append((t2 - t0) * 1e3)

    for _ in range(10):
        once()
    launch.clear()
    total.clear()
    for _ in range(a.repeats):
        once()
    print(f"launch {statistics.median(launch):.3f} ms, total {statistics.median(total):.3f} ms (medians)")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(a.repeats):
        once()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(22)
    return 0

