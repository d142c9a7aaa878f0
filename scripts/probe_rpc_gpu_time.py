"""Diagnostic: is the remote L=40 resume's extra time spent on the GPU? Device-clock times of the same resume in the
server process and in this one.

Starts a server process like ``djinn serve`` (Llama-2-13B architecture, seed 0) whose resume op is wrapped in CUDA
events (op start to the reply's logits on the host), and an in-process runtime here over identical weights. In
alternating blocks it times, on both clocks, a remote resume (last logits) with the client spinning, the same with
the client sleeping between checks, and the in-process resume.

    PYTHONPATH=. python3 scripts/probe_rpc_gpu_time.py [--cycles 4] [--block 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

SERVER = r"""
import sys, torch
from djinn_core.rpc import server as S
from djinn_core.rpc.server import Server, ServerConfig, load_model, make_runtime
model = load_model("llama2-13b", device="cuda", dtype="float16", seed=0)
rt = make_runtime(model, slab_bytes=4 << 30, host_pool_bytes=2 << 30)
srv = Server(rt, ServerConfig(port=0, busy_poll_s=0.2, stats_interval_s=0, max_sessions=256))
times, pending = [], {}
orig_resume, orig_encode = srv.ops["resume"], S.encode_tensors
def timed_resume(req):
    e0 = torch.cuda.Event(enable_timing=True)
    e0.record()
    pending["e0"] = e0
    return orig_resume(req)
def timed_encode(tensors):
    out = orig_encode(tensors)
    e0 = pending.pop("e0", None)
    if e0 is not None:
        e1 = torch.cuda.Event(enable_timing=True)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return out
def gpu_times(req):
    out = times[:]
    times.clear()
    return {"ms": out}, []
S.encode_tensors = timed_encode
srv.ops["resume"] = timed_resume
srv.ops["gpu_times"] = gpu_times
print(srv.bind(), flush=True)
srv.serve_forever()
"""


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=4)
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()

    from djinn_core.rpc.client import Client
    from scripts.probe_setup import llama2_13b_runtime

    _, rt, dev_ids = llama2_13b_runtime()
    ids = dev_ids.cpu()
    dev = dev_ids.device
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        address = proc.stdout.readline().strip()
        spin = Client(address, timeout_s=120, busy_poll_s=0.2)
        sleepy = Client(address, timeout_s=120, busy_poll_s=0.0, local_channel=True)
        rbase = {c: c.open(ids, max_new_tokens=1) for c in (spin, sleepy)}
        for s in rbase.values():
            s.run_to(40)
        lbase = rt.open(ids.to(dev), max_new_tokens=1)
        lbase.run_to(40)
        res = {k: {"host": [], "gpu": [], "launch": [], "wait": []} for k in ("remote_spin", "remote_sleep", "local")}

        def remote(c: Client, key: str, timed: bool) -> None:
            (child,) = rbase[c].fork(1)
            t0 = time.perf_counter()
            child.resume(logits="last")
            dt = (time.perf_counter() - t0) * 1e3
            ph = c.last_phases_ms
            child.close()
            if timed:
                res[key]["host"].append(dt)
                res[key]["launch"].append(ph["op_launch"])
                res[key]["wait"].append(ph["op_wait"])

        def local(timed: bool) -> None:
            (child,) = lbase.fork(1)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            e0.record()
            out = child.resume()
            t1 = time.perf_counter()
            out[:, -1].cpu()
            e1.record()
            t2 = time.perf_counter()
            e1.synchronize()
            child.close()
            if timed:
                res["local"]["host"].append((t2 - t0) * 1e3)
                res["local"]["gpu"].append(e0.elapsed_time(e1))
                res["local"]["launch"].append((t1 - t0) * 1e3)
                res["local"]["wait"].append((t2 - t1) * 1e3)

        for cycle in range(a.cycles):
            for key in ("remote_spin", "local", "remote_sleep", "local"):
                c = spin if key == "remote_spin" else sleepy
                if key != "local":
                    c.call("gpu_times")
                for i in range(a.warmup + a.block):
                    if key == "local":
                        local(i >= a.warmup)
                    else:
                        remote(c, key, i >= a.warmup)
                if key != "local":
                    res[key]["gpu"].extend(c.call("gpu_times").header["result"]["ms"][a.warmup:])
            print(f"cycle {cycle + 1}/{a.cycles}: " + ", ".join(
                f"{k} host {med(v['host']):.3f} gpu {med(v['gpu']):.3f}" for k, v in res.items()), flush=True)
        print(f"\n{'condition':<14}{'host ms':>10}{'gpu ms':>10}{'launch':>10}{'wait':>10}{'n':>5}")
        for k, v in res.items():
            print(f"{k:<14}{med(v['host']):>10.3f}{med(v['gpu']):>10.3f}{med(v['launch']):>10.3f}"
                  f"{med(v['wait']):>10.3f}{len(v['host']):>5}")
        for k, v in res.items():
            print(k, "gpu samples", [round(x, 2) for x in v["gpu"]])
        for s in rbase.values():
            s.close()
        spin.close()
        sleepy.close()
    finally:
        proc.kill()
        proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
