"""Diagnostic: resume-to-next-token phases at one depth, with parts of the restore path switched back one at a time.

Variants: ``current``; ``torch_copies`` (restore copies and layer waits through torch, not the CUDA driver);
``query_fences`` (the head's allocation queries and waits for its fences itself); ``no_spare_event`` (the ready event
is created at restore); ``no_grad_decode`` (decode steps under ``torch.no_grad`` instead of ``torch.inference_mode``);
``no_graphs`` (decode steps fully eager: no CUDA graphs); ``no_rotary`` (graphs of the norms and MLPs only).
Prints the median of each phase (ms from the resume call), as ``tests_exp3/test_resume_latency.py`` measures them.

    PYTHONPATH=. python3 scripts/probe_next_token.py [--layer 40] [--repeats 8]
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from djinn_core.memory import slab as slab_mod
from djinn_core.runtime import BreakpointRuntime
from djinn_core.memory.host_pool import HostPool
from djinn_core.models import build_model
from djinn_core.memory.slab import Slab
from tests_exp3.test_resume_latency import time_resume_to_next_token


@contextlib.contextmanager
def variant(name: str, rt):
    patches = []

    def patch(obj, attr, value):
        patches.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    if name == "query_fences":
        orig = slab_mod.Slab.allocate
        patch(slab_mod.Slab, "allocate", lambda self, *a, fences=None, **k: orig(self, *a, **k))
    elif name == "torch_copies":
        patch(rt.swap, "driver", None)
    elif name == "no_grad_decode":
        patch(torch, "inference_mode", torch.no_grad)
    elif name == "no_graphs":
        patch(rt, "graphs", None)
    elif name == "no_rotary":
        patch(rt.graphs, "functions", [])
    elif name == "no_spare_event":
        patch(rt, "_spare_event", lambda: None)
    try:
        yield
    finally:
        for obj, attr, old in reversed(patches):
            setattr(obj, attr, old)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=40)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=["current", "torch_copies", "current", "torch_copies"])
    args = p.parse_args()
    model = build_model("llama2-13b", device="cuda", dtype=torch.float16, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (1, 2048), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    rt = BreakpointRuntime(model, slab=Slab(8 << 30, "cuda"), host_pool=HostPool(4 << 30))
    for name in args.variants:
        with variant(name, rt):
            ph = time_resume_to_next_token(rt, ids, args.layer, pause=True, repeats=args.repeats)
        print(f"{name:15s} " + " ".join(f"{k}={v.median_ms:.2f}" for k, v in ph.items()), flush=True)
    for name in dict.fromkeys(args.variants):  # the resident continuation under each variant, once
        with variant(name, rt):
            ph = time_resume_to_next_token(rt, ids, args.layer, pause=False, repeats=args.repeats)
        print(f"{'resident/' + name:15s} " + " ".join(f"{k}={v.median_ms:.2f}" for k, v in ph.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
