"""Diagnostic: where a breakpoint restore spends its time, on the host and on the GPU, per layer L.

Runs the resume-latency experiment's restore loop (pause, drain, restore) on the Llama-2-13B architecture with the
runtime's phase tracing on, and prints, per L, the median host and device milliseconds from the restore call to each
phase (room made, head copies issued, layer L ready, KV copies issued), next to one manual 20 MiB pinned copy.

    PYTHONPATH=. python3 scripts/probe_resume.py [--layers 1 10 20 30 40] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from djinn_core.breakpoints import BreakpointRuntime
from djinn_core.host_pool import HostPool
from djinn_core.models import build_model
from djinn_core.slab import Slab
from djinn_core.timing import time_cuda


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama2-13b")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 10, 20, 30, 40])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    model = build_model(args.arch, device="cuda", dtype=torch.float16, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    rt = BreakpointRuntime(model, slab=Slab(8 << 30, "cuda"), host_pool=HostPool(4 << 30), trace=True)
    stream = torch.cuda.current_stream()
    for layer in args.layers:
        s = rt.open(ids, max_new_tokens=64)
        hidden = s.run_to(layer).hidden.clone()
        phases: dict[str, list[tuple[float, float]]] = {}
        for i in range(args.repeats + 3):
            s.pause()
            stream.synchronize()
            rt.swap.out_stream.synchronize()
            rt.trace_log.clear()
            s.restore()
            s.cache.wait_ready()
            stream.synchronize()
            (_, h0, e0), rest = rt.trace_log[0], rt.trace_log[1:]
            if i >= 3:
                for label, h, e in rest:
                    phases.setdefault(label, []).append(((h - h0) * 1e3, e0.elapsed_time(e)))
        pinned = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True).copy_(hidden.cpu())
        manual = time_cuda(lambda: hidden.copy_(pinned, non_blocking=True), warmup=3, repeats=args.repeats)
        cells = ", ".join(f"{k.split('.')[1]} host {statistics.median(h for h, _ in v):.3f} / gpu "
                          f"{statistics.median(d for _, d in v):.3f}" for k, v in phases.items())
        print(f"L={layer:2d} manual {manual.median_ms:.3f} ms | {cells}", flush=True)
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
