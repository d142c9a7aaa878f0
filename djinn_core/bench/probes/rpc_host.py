"""Does a thread spinning on another CPU slow this process's host work, and which CPUs share a core?

Prints the CPU topology the guest sees, then, with this process pinned to one CPU, medians (ms, host clock) of
``resume`` (an in-process L=40 resume of the Llama-2-13B architecture at 2048 tokens, last logits to the host,
``fork`` untimed, as the RPC claim times it) and ``decode`` (reading a 64 KiB reply out of a shared-memory channel
and decoding it: the client's reply_decode), with no spinner, or a spinner process (``sock.poll(0)`` in a loop, as a
waiting client or server does) pinned to this CPU's SMT sibling, to another core, or unpinned. Conditions are
interleaved in rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from djinn_core.bench.probes._setup import llama2_13b_runtime
from djinn_core.rpc.local_channel import ClientChannel, ServerChannel
from djinn_core.rpc.wire import decode, encode

DEVICE = "cuda"

SPINNER = """
import os, sys, zmq
cpu = int(sys.argv[1])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
s = zmq.Context().socket(zmq.DEALER)
s.bind("tcp://127.0.0.1:0")
print("ready", flush=True)
while True:
    s.poll(0, zmq.POLLIN)
"""


def siblings(cpu: int) -> list[int]:
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    out: list[int] = []
    for part in path.read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cpu", type=int, default=2)


def run(a: argparse.Namespace) -> int:
    print(subprocess.run(["lscpu"], capture_output=True, text=True).stdout, flush=True)
    cpus = sorted(os.sched_getaffinity(0))
    sib = [c for c in siblings(a.cpu) if c != a.cpu]
    other = next(c for c in cpus if c not in siblings(a.cpu) and c != a.cpu)
    print(f"this process on CPU {a.cpu}; its siblings {sib}; another core's CPU {other}", flush=True)
    os.sched_setaffinity(0, {a.cpu})

    _, rt, ids = llama2_13b_runtime()
    base = rt.open(ids, max_new_tokens=1)
    base.run_to(40)
    server = ServerChannel(1 << 20, (b"r",))
    client = ClientChannel(server.name, server.capacity)
    reply = encode({"id": 1, "ok": True, "result": {}}, [torch.randn(1, 32000).half()])

    def resume_once() -> float:
        (c,) = base.fork(1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        c.resume()[:, -1].cpu()
        dt = time.perf_counter() - t0
        c.close()
        return dt * 1e3

    def decode_once() -> float:
        server.write_reply(1, reply)
        t0 = time.perf_counter()
        decode(client.read_reply(), max_bytes=1 << 30, max_header_bytes=1 << 20)
        return (time.perf_counter() - t0) * 1e3

    conditions = {"quiet": None, "spinner_sibling": sib[0] if sib else None, "spinner_other_core": other,
                  "spinner_unpinned": -1}
    res: dict[str, dict[str, list[float]]] = {k: {"resume": [], "decode": []} for k in conditions}
    for _ in range(3):
        resume_once()
        decode_once()
    for r in range(a.rounds):
        for name, cpu in conditions.items():
            if name == "spinner_sibling" and cpu is None:
                continue
            proc = None
            if cpu is not None:
                proc = subprocess.Popen([sys.executable, "-c", SPINNER, str(cpu)], stdout=subprocess.PIPE, text=True)
                proc.stdout.readline()
                time.sleep(0.05)
            try:
                for _ in range(2):
                    resume_once()
                for _ in range(a.repeats):
                    res[name]["resume"].append(resume_once())
                    res[name]["decode"].append(decode_once())
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    print(f"\n{'condition':<22}{'resume ms':>12}{'decode ms':>12}{'n':>6}")
    for name, d in res.items():
        if d["resume"]:
            print(f"{name:<22}{statistics.median(d['resume']):>12.4f}{statistics.median(d['decode']):>12.4f}"
                  f"{len(d['resume']):>6}")
    client.close()
    server.close()
    return 0

