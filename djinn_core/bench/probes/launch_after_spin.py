"""Is a resume's host launch slower right after the thread has spun, as the server's loop spins between requests, and
what keeps it fast? The L=40 gap of the RPC claim on the H200 is the server's launch of the same resume running
1.4-1.6x the in-process one.

In one process, on the Llama-2-13B architecture at 2048 tokens (a fresh fork of one checkpoint at ``--layer`` per
resume, as the RPC claim times it): the host time of ``resume()`` (its Python and kernel launches, not its GPU time)
after ``--spin-ms`` of each way of waiting, conditions interleaved:

* ``none``: the resume right after the previous one (the in-process claim's side);
* ``spin``: a Python loop reading a shared-memory word and the clock, as the server's loop does on hot channels;
* ``spin_zmq``: the same, with a ZeroMQ poll every 8th spin (the server's loop since 640bc46);
* ``spin_zmq1``: a ZeroMQ poll every spin (the server's loop before);
* ``spin_launch``: ``spin``, also launching one tiny kernel on a side stream every 100 us (keeps the launch path of
  torch and the driver warm);
* ``sleep``: ``time.sleep`` for the same time (the thread leaves the CPU);
* ``codec``: no wait, but the message work the server does between a fork's reply and the next request (encode a
  reply header, decode a request: :mod:`djinn_core.rpc.wire`).

Each for every ``--spin-ms`` (the server spins ~0.1 ms between a client's fork and its resume, and tens of ms between
clients' bursts). Prints the machine's CPU topology first, then per condition the median and p90 of the launch in ms.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import subprocess
import time

import torch
import zmq

from djinn_core.bench.probes._setup import llama2_13b_runtime
from djinn_core.rpc.wire import decode, encode, encode_header

DEVICE = "cuda"
CONDITIONS = ("none", "spin", "spin_zmq", "spin_zmq1", "spin_launch", "sleep", "codec")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", type=int, default=40)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--spin-ms", type=float, nargs="+", default=[0.1, 20.0])


def _topology() -> str:
    try:
        return subprocess.run(["lscpu", "--extended=CPU,CORE,SOCKET,NODE"], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"lscpu failed: {e}"


def run(a: argparse.Namespace) -> int:
    print(_topology(), flush=True)
    _, rt, ids = llama2_13b_runtime()
    base = rt.open(ids, max_new_tokens=1)
    base.run_to(a.layer)
    torch.cuda.synchronize()
    word = mmap.mmap(-1, 4096)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.bind("tcp://127.0.0.1:0")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    side = torch.cuda.Stream()
    tiny = torch.zeros(1, device="cuda")

    request = encode({"id": 7, "op": "resume", "session": 12, "logits": "last", "token": "x" * 32}, [])

    def wait(cond: str, ms: float) -> None:
        end = time.perf_counter() + ms / 1e3
        if cond == "none":
            return
        if cond == "sleep":
            time.sleep(ms / 1e3)
            return
        if cond == "codec":
            encode_header({"id": 6, "ok": True, "result": {"sessions": [13]}, "server_ms": 0.1,
                           "server_t": [0.0, 0.0, 0.0, 0.0]}, [])
            decode(request, max_bytes=1 << 20)
            return
        n, next_launch = 0, 0.0
        while True:
            now = time.perf_counter()
            if now >= end:
                return
            if word[0]:  # never set: the slot check
                return
            n += 1
            if (cond == "spin_zmq" and n % 8 == 0) or cond == "spin_zmq1":
                poller.poll(0)
            if cond == "spin_launch" and now >= next_launch:
                with torch.cuda.stream(side):
                    tiny.add_(0)
                next_launch = now + 1e-4

    def once(cond: str, ms: float) -> float:
        (c,) = base.fork(1)
        torch.cuda.synchronize()
        wait(cond, ms)
        t0 = time.perf_counter()
        out = c.resume()
        t1 = time.perf_counter()
        out[:, -1].cpu()
        c.close()
        return (t1 - t0) * 1e3

    cases = [(c, ms) for ms in a.spin_ms for c in CONDITIONS if c not in ("none", "codec") or ms == a.spin_ms[0]]
    for cond, ms in cases:  # warm-up
        for _ in range(3):
            once(cond, ms)
    got: dict[tuple[str, float], list[float]] = {case: [] for case in cases}
    for _ in range(a.repeats):
        for case in cases:
            got[case].append(once(*case))
    for (cond, ms), xs in got.items():
        xs = sorted(xs)
        print(f"{cond:12s} {ms:6g} ms: launch median {statistics.median(xs):.3f} ms, p90 "
              f"{xs[int(0.9 * (len(xs) - 1))]:.3f} ms (L={a.layer}, {len(xs)} repeats)", flush=True)
    return 0
