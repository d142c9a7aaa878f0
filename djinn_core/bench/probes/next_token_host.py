"""Where the host time of resume-to-next-token goes, paused against resident (cProfile), at one or more depths of the
Llama-2-13B architecture at 2048 tokens, as the resume-latency claim times it: each repeat opens a session, runs it
to layer L, pauses it (or not), then profiles ``resume()`` and ``generate(2)``. Prints the phases' medians of both
(interleaved, ``djinn probe next_token``'s figures) and, per depth, the functions whose own host time differs most
between the two (ms per repeat).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

from djinn_core.bench.experiments.resume_latency import time_resume_to_next_token
from djinn_core.bench.probes._setup import llama2_13b_runtime

DEVICE = "cuda"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, nargs="+", default=[30, 40])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--top", type=int, default=25)


def _profile(rt, ids, layer: int, pause: bool, repeats: int) -> dict[tuple, tuple[int, float, float]]:
    """{function: (calls, own s, cumulative s)} summed over ``repeats`` profiled resume+generate regions."""
    stream = torch.cuda.current_stream()
    pr = cProfile.Profile()
    for _ in range(repeats):
        s = rt.open(ids, max_new_tokens=64)
        s.run_to(layer)
        if pause:
            s.pause()
        stream.synchronize()
        rt.swap.out_stream.synchronize()
        pr.enable()
        s.resume()
        s.generate(2)
        pr.disable()
        torch.cuda.synchronize()
        s.close()
    st = pstats.Stats(pr).stats  # {func: (cc, nc, tt, ct, callers)}
    return {f: (v[1], v[2], v[3]) for f, v in st.items()}


def _name(f: tuple) -> str:
    path, line, fn = f
    return f"{path.rsplit('/', 2)[-2:] if '/' in path else path}:{line}:{fn}"


def run(a: argparse.Namespace) -> int:
    _, rt, ids = llama2_13b_runtime(slab_bytes=8 << 30, host_pool_bytes=4 << 30)  # as the resume-latency claim
    try:
        for layer in a.layers:
            for _ in range(2):
                for pause in (True, False):
                    ph = time_resume_to_next_token(rt, ids, layer, pause=pause, repeats=a.repeats)
                    print(f"L={layer} {'paused' if pause else 'resident':9s} "
                          + " ".join(f"{k}={v.median_ms:.2f}" for k, v in ph.items()), flush=True)
            prof = {pause: _profile(rt, ids, layer, pause, a.repeats) for pause in (True, False)}
            for pause in (True, False):
                tot = sum(v[1] for v in prof[pause].values()) / a.repeats * 1e3
                print(f"L={layer} {'paused' if pause else 'resident'}: profiled own time {tot:.2f} ms per repeat "
                      f"(profiler overhead included)")
            keys = set(prof[True]) | set(prof[False])
            rows = []
            for f in keys:
                p = prof[True].get(f, (0, 0.0, 0.0))
                r = prof[False].get(f, (0, 0.0, 0.0))
                rows.append(((p[1] - r[1]) / a.repeats * 1e3, p[0] / a.repeats, r[0] / a.repeats,
                             p[1] / a.repeats * 1e3, r[1] / a.repeats * 1e3, _name(f)))
            rows.sort(key=lambda x: -abs(x[0]))
            print(f"L={layer}: own host time, paused minus resident (ms/repeat), calls/repeat paused, resident")
            for d, pc, rc, pt, rtt, name in rows[:a.top]:
                print(f"  {d:+7.3f}  {pt:7.3f} {rtt:7.3f}  calls {pc:7.1f} {rc:7.1f}  {name}")
            print(f"L={layer}: resident, own host time by function (ms/repeat)")
            res = sorted(prof[False].items(), key=lambda kv: -kv[1][1])
            for f, (n, tt, ct) in res[:a.top]:
                print(f"  {tt / a.repeats * 1e3:7.3f}  cum {ct / a.repeats * 1e3:7.3f}  calls {n / a.repeats:7.1f}  "
                      f"{_name(f)}")
    finally:
        rt.close_all()
    return 0
