"""Resume-to-next-token phases at one depth of the Llama-2-13B architecture (2048 tokens), from a paused session
and from a resident checkpoint, as the resume-latency claim measures them
(:func:`djinn_core.bench.experiments.resume_latency.time_resume_to_next_token`): medians in ms from the resume call
of ``head_ready``, ``continuation``, ``kv_restored``, ``total`` and the host phases. Paused and resident runs
alternate ``--cycles`` times.
"""

from __future__ import annotations

import argparse

from djinn_core.bench.experiments.resume_latency import time_resume_to_next_token
from djinn_core.bench.probes._setup import llama2_13b_runtime

DEVICE = "cuda"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", type=int, default=40)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--cycles", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    _, rt, ids = llama2_13b_runtime(slab_bytes=8 << 30, host_pool_bytes=4 << 30)  # as the resume-latency claim
    try:
        for _ in range(args.cycles):
            for pause in (True, False):
                ph = time_resume_to_next_token(rt, ids, args.layer, pause=pause, repeats=args.repeats)
                print(f"{'paused' if pause else 'resident':9s} " + " ".join(f"{k}={v.median_ms:.2f}"
                                                                         for k, v in ph.items()), flush=True)
    finally:
        rt.close_all()
    return 0
