"""Where the remote L=40 resume's extra host time comes from: CPU placement of the client's spinning thread and
the server's compute thread.

Starts ``djinn serve`` (Llama-2-13B architecture, as the RPC claim does) and an in-process runtime, prints both
processes' CPU affinity, then alternates conditions: ``default`` (no pinning) and ``pinned`` (this thread on one CPU,
the server process on another), each a ``resume_remote_vs_local`` at L=40
(:mod:`djinn_core.bench.experiments.rpc_overhead`). Prints per condition the medians of remote, in-process, the
server's op launch and wait and the in-process launch and wait, and the CPU each thread last ran on.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from djinn_core.bench.experiments.rpc_overhead import resume_remote_vs_local
from djinn_core.bench.probes._setup import llama2_13b_runtime
from djinn_core.rpc.client import Client
from djinn_core.rpc.process import ServerProcess

DEVICE = "cuda"


def last_cpu(pid: int, tid: int | None = None) -> int:
    path = Path(f"/proc/{pid}/task/{tid or pid}/stat")
    return int(path.read_text().rsplit(")", 1)[1].split()[36])


def threads(pid: int) -> list[tuple[int, str, int]]:
    out = []
    for t in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
        try:
            comm = (t / "comm").read_text().strip()
            out.append((int(t.name), comm, last_cpu(pid, int(t.name))))
        except OSError:
            pass
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--busy-poll-s", type=float, default=0.2, help="client and server spin (the RPC claim's setting)")
    p.add_argument("--client-cpu", type=int, default=3)
    p.add_argument("--server-cpu", type=int, default=9)


def run(a: argparse.Namespace) -> int:
    _, rt, ids = llama2_13b_runtime()
    args = ["--model", "llama2-13b", "--device", "cuda", "--dtype", "float16", "--seed", "0", "--slab-bytes", "4GiB",
            "--host-pool-bytes", "2GiB", "--max-sessions", "256", "--stats-interval-s", "0",
            "--busy-poll-s", str(a.busy_poll_s)]
    mine = os.sched_getaffinity(0)
    print(f"this process: pid {os.getpid()}, affinity {sorted(mine)}", flush=True)
    rows = []
    with ServerProcess(args, start_timeout_s=300) as srv:
        spid = srv.proc.pid
        print(f"server: pid {spid}, affinity {sorted(os.sched_getaffinity(spid))}", flush=True)
        with Client(srv.address, timeout_s=120, busy_poll_s=a.busy_poll_s) as c:
            c.ping()
            resume_remote_vs_local(c, rt, ids, 40, rounds=5, warmup=3)  # warm-up of both sides
            for cycle in range(a.cycles):
                for cond in ("default", "pinned"):
                    if cond == "pinned":
                        os.sched_setaffinity(0, {a.client_cpu})
                        os.sched_setaffinity(spid, {a.server_cpu})
                    else:
                        os.sched_setaffinity(0, mine)
                        os.sched_setaffinity(spid, mine)
                    cmp = resume_remote_vs_local(c, rt, ids, 40, rounds=a.rounds, warmup=3)
                    where = {"client": last_cpu(os.getpid()), "server": last_cpu(spid)}
                    rows.append((cond, cmp, where))
                    print(f"cycle {cycle} {cond}: remote {cmp.remote.median_ms:.3f} in-process "
                          f"{cmp.local.median_ms:.3f} server launch {cmp.phases['op_launch'].median_ms:.3f} "
                          f"wait {cmp.phases['op_wait'].median_ms:.3f} | local launch "
                          f"{cmp.local_phases['op_launch'].median_ms:.3f} wait "
                          f"{cmp.local_phases['op_wait'].median_ms:.3f} | last CPUs {where}", flush=True)
            print("server threads (tid, name, last cpu):", threads(spid))
            print("this process's threads:", threads(os.getpid()))
    os.sched_setaffinity(0, mine)
    return 0

