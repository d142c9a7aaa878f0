"""Diagnostic: the reply leg of an RPC after the server was busy for a while, by ZeroMQ threading setup.

Serves a tiny model's runtime in this process (server thread) with two extra ops: ``spin`` (the server thread busy
for ``ms``, as it is while it waits for the GPU) and ``sleep`` (idle for ``ms``). A client with busy polling calls
each op and records its phases (request, dispatch, op, reply; ``Client.last_phases_ms``). Variants: ``default``;
``pinned``: each side's ZeroMQ I/O thread shares a core with the thread that waits on it (context option
``THREAD_AFFINITY_CPU_ADD`` and ``os.sched_setaffinity``), so handing it a message needs no wake-up of an idle core;
``warm``: a thread per side bounces a byte over a loopback pair of the same context every 100 us, so its I/O
thread never idles long; ``qos``: the process holds ``/dev/cpu_dma_latency`` at 0 us (PM QoS), so idle cores poll
instead of entering an idle state with an exit latency (a halted vCPU on a virtual machine).

    PYTHONPATH=. python3 scripts/probe_rpc_wake.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import threading
import time

import torch
import zmq

from djinn_core.runtime import BreakpointRuntime
from djinn_core.rpc.client import Client
from djinn_core.models import build_model
from djinn_core.rpc import server as server_mod
from djinn_core.rpc.server import Server, ServerConfig

zmq_context = zmq.Context


def _spin(ms: float) -> None:
    end = time.perf_counter() + ms * 1e-3
    while time.perf_counter() < end:
        pass


class _KeepWarm:
    """A thread bouncing one byte over a loopback TCP pair of ``ctx`` every ``period_s``: traffic for the context's
    I/O thread, so it never sits idle long enough to sleep deeply."""

    def __init__(self, ctx: zmq.Context, period_s: float = 100e-6):
        self._a, self._b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        port = self._a.bind_to_random_port("tcp://127.0.0.1")
        self._b.connect(f"tcp://127.0.0.1:{port}")
        self._stop = threading.Event()
        self._period = period_s
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._a.send(b"x")
            self._b.recv()
            time.sleep(self._period)

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self._a.close(0)
        self._b.close(0)


def run(variant: str, rounds: int, cores: list[int]) -> dict[str, float]:
    model = build_model("llama-tiny", dtype=torch.float32, seed=0)
    rt = BreakpointRuntime(model, budget_bytes=64 << 20)
    srv = Server(rt, ServerConfig(port=0, busy_poll_s=0.2, stats_interval_s=0))
    srv.ops["spin"] = lambda req: (_spin(float(req.args.get("ms", 0))), ({}, []))[1]
    srv.ops["sleep"] = lambda req: (time.sleep(float(req.args.get("ms", 0)) * 1e-3), ({}, []))[1]
    ctx = zmq.Context()
    if variant == "pinned":
        srv_core, cli_core = cores[0], cores[-1]
        ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, cli_core)
        os.sched_setaffinity(0, {cli_core})

        def server_context() -> zmq.Context:
            c = zmq_context()
            c.set(zmq.THREAD_AFFINITY_CPU_ADD, srv_core)
            return c
        server_mod.zmq.Context = server_context
    try:
        srv.start()
    finally:
        server_mod.zmq.Context = zmq_context
    warm = [_KeepWarm(srv._ctx), _KeepWarm(ctx)] if variant == "warm" else []
    qos = None
    if variant == "qos":  # PM QoS: no idle state with an exit latency above 0 us while the file is held open
        qos = open("/dev/cpu_dma_latency", "wb", buffering=0)
        qos.write(struct.pack("i", 0))
    if variant == "pinned":
        os.sched_setaffinity(srv._thread.native_id, {srv_core})
    out: dict[str, float] = {}
    try:
        with Client(srv.address, busy_poll_s=0.2, context=ctx) as c:
            for op, ms in (("ping", 0), ("spin", 1.3), ("spin", 20), ("sleep", 1.3), ("sleep", 20), ("ping", 0)):
                reply, total = [], []
                for i in range(rounds + 10):
                    t0 = time.perf_counter()
                    c.call(op, args={"ms": ms})
                    t1 = time.perf_counter()
                    if i >= 10:
                        reply.append(c.last_phases_ms["reply"])
                        total.append((t1 - t0) * 1e3 - c.last_phases_ms["op"])
                out[f"{op}{ms:g}_reply"] = statistics.median(reply)
                out[f"{op}{ms:g}_total_minus_op"] = statistics.median(total)
    finally:
        for w in warm:
            w.close()
        if qos is not None:
            qos.close()
        srv.stop()
        ctx.term()
        os.sched_setaffinity(0, set(cores))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--variants", nargs="+", default=["default", "pinned", "warm", "default", "pinned", "warm"])
    args = p.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    for v in args.variants:
        r = run(v, args.rounds, cores)
        print(f"{v:8s} " + " ".join(f"{k}={x:.3f}" for k, x in r.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
