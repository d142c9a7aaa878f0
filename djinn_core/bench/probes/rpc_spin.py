"""Does the server's spin loop slow its next op? Remote minus in-process resume with the loop polling the ZeroMQ
socket (a system call) on every spin against every 8th spin.

Starts two ``djinn serve`` processes (Llama-2-13B architecture, as the RPC claim runs it), one with
``--spin-zmq-every 1`` and one with ``--spin-zmq-every 8``, and an in-process runtime, then alternates between them for
``--cycles`` cycles: a ``resume_remote_vs_local`` at each depth (:mod:`djinn_core.bench.experiments.rpc_overhead`),
printing per server and depth the medians of remote minus in-process, the server's op launch and wait, and the
in-process launch. Both servers share the GPU with the in-process runtime; the blocks of each comparison absorb the
context switches as in the claim.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from djinn_core.bench.experiments.rpc_overhead import resume_remote_vs_local
from djinn_core.bench.probes._setup import llama2_13b_runtime
from djinn_core.bench.provenance import result_provenance
from djinn_core.rpc.client import Client
from djinn_core.rpc.process import ServerProcess

DEVICE = "cuda"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--layers", type=int, nargs="+", default=[40, 20])
    p.add_argument("--busy-poll-s", type=float, default=0.2, help="client and server spin (the RPC claim's setting)")
    p.add_argument("--every", type=int, nargs="+", default=[1, 8], help="--spin-zmq-every of each server")
    p.add_argument("--json", help="also write every row here, with the machine's and the commit's provenance")


def _server_args(every: int, busy_poll_s: float) -> list[str]:
    return ["--model", "llama2-13b", "--device", "cuda", "--dtype", "float16", "--seed", "0", "--slab-bytes", "4GiB",
            "--host-pool-bytes", "2GiB", "--max-sessions", "256", "--stats-interval-s", "0",
            "--busy-poll-s", str(busy_poll_s), "--spin-zmq-every", str(every)]


def run(a: argparse.Namespace) -> int:
    _, rt, ids = llama2_13b_runtime()
    rows = []
    servers = [ServerProcess(_server_args(e, a.busy_poll_s), start_timeout_s=300) for e in a.every]
    try:
        clients = []
        for srv in servers:
            srv.__enter__()
            c = Client(srv.address, timeout_s=120, busy_poll_s=a.busy_poll_s)
            c.ping()
            clients.append(c)
        for c in clients:  # warm-up of every side
            resume_remote_vs_local(c, rt, ids, 40, rounds=5, warmup=3)
        for cycle in range(a.cycles):
            for every, c in zip(a.every, clients):
                for layer in a.layers:
                    cmp = resume_remote_vs_local(c, rt, ids, layer, rounds=a.rounds, warmup=3)
                    row = {"cycle": cycle, "spin_zmq_every": every, "L": layer, "time_s": time.time(),
                           "remote_minus_in_process_ms": cmp.remote.median_ms - cmp.local.median_ms,
                           "remote_ms": cmp.remote.median_ms, "in_process_ms": cmp.local.median_ms,
                           "server_launch_ms": cmp.phases["op_launch"].median_ms,
                           "server_wait_ms": cmp.phases["op_wait"].median_ms,
                           "in_process_launch_ms": cmp.local_phases["op_launch"].median_ms,
                           "in_process_wait_ms": cmp.local_phases["op_wait"].median_ms, "bitwise": cmp.equal}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        for every in a.every:
            for layer in a.layers:
                mine = [r for r in rows if r["spin_zmq_every"] == every and r["L"] == layer]
                gap = [r["remote_minus_in_process_ms"] for r in mine]
                ratio = [r["server_launch_ms"] / r["in_process_launch_ms"] for r in mine]
                print(f"spin_zmq_every={every} L={layer}: remote - in-process median {statistics.median(gap):+.3f} "
                      f"ms (worst {max(gap):+.3f}); server launch / in-process launch {statistics.median(ratio):.2f}",
                      flush=True)
        for c in clients:
            c.close()
    finally:
        for srv in servers:
            srv.__exit__(None, None, None)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**result_provenance(), "rows": rows}, f, indent=1, default=str)
    return 0
