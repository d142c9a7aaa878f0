"""Does a server setting slow its next op? Remote minus in-process resume through servers that differ in one setting:
by default how the loop polls the ZeroMQ socket while spinning (``--spin-zmq-every`` 1 against 8), or any other
``djinn serve`` option (``--setting reply-wait --values poll block``).

Starts one ``djinn serve`` process per value (Llama-2-13B architecture, as the RPC claim runs it) and an in-process
runtime, then alternates between the servers for ``--cycles`` cycles: a ``resume_remote_vs_local`` at each depth
(:mod:`djinn_core.bench.experiments.rpc_overhead`) with the sides strictly alternating, as the claim pairs them,
printing per server and depth the median over pairs of remote minus in-process, and its split at the server's own op
time: the server's op against the in-process one (execution) and the round trip around the server's op (transport).
All servers share the GPU with the in-process runtime.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from djinn_core.bench.experiments.rpc_overhead import ResumeComparison, resume_remote_vs_local
from djinn_core.bench.probes._setup import llama2_13b_runtime
from djinn_core.bench.provenance import result_provenance
from djinn_core.rpc.client import Client
from djinn_core.rpc.process import ServerProcess

DEVICE = "cuda"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=120, help="pairs per comparison")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--layers", type=int, nargs="+", default=[40, 20])
    p.add_argument("--busy-poll-s", type=float, default=0.2, help="client and server spin (the RPC claim's setting)")
    p.add_argument("--setting", default="spin-zmq-every", help="the djinn serve option the servers differ in")
    p.add_argument("--values", nargs="+", default=["1", "8"], help="its value for each server")
    p.add_argument("--json", help="also write every row here, with the machine's and the commit's provenance")


def _server_args(setting: str, value: str, busy_poll_s: float) -> list[str]:
    return ["--model", "llama2-13b", "--device", "cuda", "--dtype", "float16", "--seed", "0", "--slab-bytes", "4GiB",
            "--host-pool-bytes", "2GiB", "--max-sessions", "256", "--stats-interval-s", "0",
            "--busy-poll-s", str(busy_poll_s), f"--{setting}", value]


def _paired_median(a: list[float], b: list[float]) -> float:
    return statistics.median(x - y for x, y in zip(a, b))


def _row(cmp: ResumeComparison) -> dict:
    remote, server, local = cmp.remote.samples_ms, cmp.server.samples_ms, cmp.local.samples_ms
    return {"remote_minus_in_process_ms": cmp.paired_difference_ms,
            "execution_ms": _paired_median(server, local), "transport_ms": _paired_median(remote, server),
            "remote_ms": cmp.remote.median_ms, "in_process_ms": cmp.local.median_ms,
            "server_launch_ms": cmp.phases["op_launch"].median_ms, "server_wait_ms": cmp.phases["op_wait"].median_ms,
            "in_process_launch_ms": cmp.local_phases["op_launch"].median_ms,
            "in_process_wait_ms": cmp.local_phases["op_wait"].median_ms, "pairs": cmp.remote.n, "bitwise": cmp.equal}


def run(a: argparse.Namespace) -> int:
    _, rt, ids = llama2_13b_runtime()
    rows = []
    servers = [ServerProcess(_server_args(a.setting, v, a.busy_poll_s), start_timeout_s=300) for v in a.values]
    pairing = {"warmup": 3, "block": 1, "block_warmup": 0}
    try:
        clients = []
        for srv in servers:
            srv.__enter__()
            c = Client(srv.address, timeout_s=120, busy_poll_s=a.busy_poll_s)
            c.ping()
            clients.append(c)
        for c in clients:  # warm-up of every side
            resume_remote_vs_local(c, rt, ids, 40, rounds=5, **pairing)
        for cycle in range(a.cycles):
            for value, c in zip(a.values, clients):
                for layer in a.layers:
                    cmp = resume_remote_vs_local(c, rt, ids, layer, rounds=a.rounds, **pairing)
                    row = {"cycle": cycle, "setting": a.setting, "value": value, "L": layer, "time_s": time.time(),
                           **_row(cmp)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        for value in a.values:
            for layer in a.layers:
                mine = [r for r in rows if r["value"] == value and r["L"] == layer]
                gap = [r["remote_minus_in_process_ms"] for r in mine]
                print(f"--{a.setting} {value} L={layer}: remote - in-process median {statistics.median(gap):+.3f} ms "
                      f"(worst {max(gap):+.3f}); execution {statistics.median(r['execution_ms'] for r in mine):+.3f}"
                      f", transport {statistics.median(r['transport_ms'] for r in mine):+.3f} ms", flush=True)
        for c in clients:
            c.close()
    finally:
        for srv in servers:
            srv.__exit__(None, None, None)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**result_provenance(), "rows": rows}, f, indent=1, default=str)
    return 0
