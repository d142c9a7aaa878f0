"""RPC overhead: what the Djinn server adds to a breakpoint session, and how it holds under load.

Host clock throughout (an RPC round trip is a host-side latency), everything on 127.0.0.1:

* :func:`raw_tcp_rtt`: a plain-socket echo server in a child process, Nagle off on both ends, ``MSG_BYTES`` messages;
* :func:`resume_remote_vs_local`: a resume RPC against the same resume in process on identical weights, in
  alternating blocks, checked bitwise equal, with the remote round trip split into its phases;
* :func:`run_load`: many clients on threads, each with its own connection and sessions, pause/resume cycles on shared
  weights, each client's results against its solo run (:func:`load_verdict`).

The no-op RPC is ``Client.ping`` timed by :func:`djinn_core.bench.timing.time_host`.
"""

from __future__ import annotations

import hashlib
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from djinn_core.bench.timing import TimingStats
from djinn_core.rpc.client import Client
from djinn_core.runtime import BreakpointRuntime
from djinn_core.trace import timing_event

MSG_BYTES = 64


ECHO_SERVER = """
import socket
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := conn.recv(%d):
    conn.sendall(data)
""" % MSG_BYTES


def raw_tcp_rtt(rounds: int, warmup: int) -> TimingStats:
    """Round trips of ``MSG_BYTES`` through a plain-socket echo server in a child process on 127.0.0.1 (Nagle off on
    both ends), host clock."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    samples: list[float] = []
    msg = b"x" * MSG_BYTES
    try:
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(warmup + rounds):
                t0 = time.perf_counter()
                c.sendall(msg)
                got = 0
                while got < MSG_BYTES:
                    got += len(c.recv(MSG_BYTES - got))
                if i >= warmup:
                    samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        try:
            proc.wait(10)  # it exits when the connection closes
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
    return TimingStats(tuple(samples), clock="host")


@dataclass
class ResumeComparison:
    """Remote against in-process resumes of one checkpoint (host clock, ms), see :func:`resume_remote_vs_local`."""

    remote: TimingStats
    local: TimingStats
    equal: bool  # every remote logits row bitwise equal to the in-process one
    server: TimingStats  # the server's own time per resume: the op and the copy of its reply to the host
    phases: dict[str, TimingStats]  # the remote round trip split (Client.last_phases_ms)
    local_phases: dict[str, TimingStats]  # in process: op_launch (resume returned), op_wait (logits on the host)
    blocks: list[dict]  # per block of each side: the caching allocator's device allocations and frees meanwhile
    reference: str = "this process"  # where the in-process side ran: "this process" or "the server's process"
    # the device's span of each timed resume (CUDA events around its work), per side, where it was measured: with
    # the in-process side in the server's process (resume_timed reports both), or in this process (its own only)
    device: dict[str, TimingStats] = field(default_factory=dict)

    @property
    def host_beyond_device_paired_ms(self) -> float | None:
        """The median over pairs of (remote round trip - the server op's device span) - (in-process resume - its
        device span): what each side's host adds around the same device work, with the GPU's own speed (its clocks,
        which run the 60 ms L=20 resume 1-2% faster or slower from one op to the next) taken out. None unless both
        sides' spans were measured for every pair."""
        r, lo = self.device.get("remote"), self.device.get("in_process")
        if r is None or lo is None or not (r.n == lo.n == self.remote.n == self.local.n):
            return None
        return float(statistics.median((a - b) - (c - d) for a, b, c, d in zip(
            self.remote.samples_ms, r.samples_ms, self.local.samples_ms, lo.samples_ms)))

    @property
    def paired_differences_ms(self) -> list[float]:
        """Each block's remote repeats minus the in-process repeats of the same block, in order (may be negative)."""
        return [r - lo for r, lo in zip(self.remote.samples_ms, self.local.samples_ms)]

    @property
    def paired_difference_ms(self) -> float:
        """The median of :attr:`paired_differences_ms`: remote minus in-process with the GPU's drift between blocks
        (its clocks move the 60 ms L=20 resume by 1-2 ms over seconds) cancelled by pairing repeats taken together."""
        return float(statistics.median(self.paired_differences_ms))


def _allocator_calls(stats: dict | None) -> tuple[int, int]:
    return (stats or {}).get("device_allocs", 0), (stats or {}).get("device_frees", 0)


def resume_remote_vs_local(client: Client, runtime: BreakpointRuntime | None, ids: torch.Tensor, layer: int,
                           rounds: int, warmup: int, block: int = 10,
                           block_warmup: int | None = None) -> ResumeComparison:
    """A resume RPC (last-position logits back) against the same resume in process (last-position logits to the
    host), in alternating blocks of ``block`` timed repeats per side, each block after ``block_warmup`` untimed ones
    (default ``warmup``), the first after ``warmup``. With ``block=1, block_warmup=0`` the sides strictly alternate,
    each resume right after its own untimed fork, and :attr:`ResumeComparison.paired_difference_ms` pairs repeats a
    few milliseconds apart.

    The in-process side runs in ``runtime`` (this process, over identical weights), or with ``runtime`` None in the
    server's own process (``RemoteSession.resume_timed``, a server with ``--bench-ops``): the same calls, timed on the
    server's host clock, on the server's CUDA context, so that both sides have the GPU to themselves as a deployed
    server and a library caller each would (two processes alternating on one GPU made the server's 60 ms resume
    0.2-0.4 ms slower than this process's on the H200: ``docs/notes/rpc.md``).

    Blocks rather than strict alternation: the server and this process are two CUDA contexts on one GPU, and the
    first kernels after the other context ran pay a GPU context switch that a deployed server (the only process on
    its GPU) never pays; the untimed repeats at the start of each block absorb it, and alternating blocks still
    spread drift over both sides. Each repeat resumes a fresh fork of one checkpoint per side (forked untimed).
    Also checks every remote logits row against the in-process one bitwise, takes the server's own time for each
    resume (``server_ms``: splits remote - in-process into execution and transport), the remote round trip's phases
    (``Client.last_phases_ms``), the same launch/wait split in process, and per block the device allocations each
    side's caching allocator made (a resume that allocates from the driver pays for it)."""
    rbase = client.open(ids.cpu(), max_new_tokens=1)
    rbase.run_to(layer)
    lbase = None
    if runtime is not None:
        lbase = runtime.open(ids, max_new_tokens=1)
        lbase.run_to(layer)
        if runtime.device.type == "cuda":  # the prefill must not share the GPU with the first timed block
            torch.cuda.synchronize(runtime.device)
    remote, local, server = [], [], []
    phases: dict[str, list[float]] = {}  # the remote round trip split on the host clock (client.last_phases_ms)
    local_phases: dict[str, list[float]] = {"op_launch": [], "op_wait": []}
    device: dict[str, list[float]] = {}  # device spans of the timed resumes, per side (see ResumeComparison.device)
    blocks: list[dict] = []
    r_logits: list[torch.Tensor] = []
    l_logits: list[torch.Tensor] = []
    cuda = runtime is not None and runtime.device.type == "cuda"

    def remote_once(timed: bool) -> None:
        (rc,) = rbase.fork(1)
        t0 = time.perf_counter()
        logits = rc.resume(logits="last")
        dt = (time.perf_counter() - t0) * 1e3
        dt_s = client.last_server_ms  # this resume's, before the next call replaces it
        ph = client.last_phases_ms
        rc.close()
        r_logits.append(logits)
        if timed:
            remote.append(dt)
            server.append(dt_s)
            if ph is not None:
                for k, v in ph.items():
                    phases.setdefault(k, []).append(v)

    def local_once(timed: bool) -> None:
        spans: dict[str, float | None] = {}
        if lbase is None:  # in the server's process: the same calls as below, timed there
            got, logits = rbase.resume_timed()
            ms, launch_ms, wait_ms = got["ms"], got["launch_ms"], got["wait_ms"]
            spans = {"in_process": got.get("device_ms"), "remote": got.get("previous_device_ms")}
        else:
            (lc,) = lbase.fork(1)
            ev0 = timing_event(device=runtime.device)
            t0 = time.perf_counter()
            out = lc.resume()
            t_fn = time.perf_counter()
            logits = out[:, -1].cpu()
            t1 = time.perf_counter()
            ev1 = timing_event(device=runtime.device)
            lc.close()
            ms, launch_ms, wait_ms = (t1 - t0) * 1e3, (t_fn - t0) * 1e3, (t1 - t_fn) * 1e3
            if ev0 is not None:  # .cpu() waited for the copy: its events are complete
                spans = {"in_process": ev0.elapsed_time(ev1)}
        l_logits.append(logits)
        if timed:
            local.append(ms)
            local_phases["op_launch"].append(launch_ms)
            local_phases["op_wait"].append(wait_ms)
            for side, v in spans.items():
                if isinstance(v, (int, float)):
                    device.setdefault(side, []).append(float(v))

    def allocator_calls(side: str) -> tuple[int, int]:
        if side == "remote" or lbase is None:
            return _allocator_calls(client.stats().get("vram"))
        if not cuda:
            return 0, 0
        ms = torch.cuda.memory_stats(runtime.device)
        return ms.get("num_device_alloc", 0), ms.get("num_device_free", 0)

    try:
        per_block = warmup if block_warmup is None else block_warmup
        for b in range(max(1, -(-rounds // block))):
            n = min(block, rounds - b * block)
            for side, once in (("remote", remote_once), ("in_process", local_once)):
                before = allocator_calls(side)
                skip = warmup if b == 0 else per_block
                for i in range(skip + n):
                    once(i >= skip)
                after = allocator_calls(side)
                blocks.append({"block": b, "side": side, "device_allocs": after[0] - before[0],
                               "device_frees": after[1] - before[1]})
    finally:
        rbase.close()
        if lbase is not None:
            lbase.close()
    equal = all(torch.equal(r, l_logits[0]) for r in r_logits) and all(torch.equal(x, l_logits[0]) for x in l_logits)
    stats = {k: TimingStats(tuple(v), "host") for k, v in phases.items()}
    return ResumeComparison(TimingStats(tuple(remote), "host"), TimingStats(tuple(local), "host"), equal,
                            TimingStats(tuple(server), "host"), stats,
                            {k: TimingStats(tuple(v), "host") for k, v in local_phases.items()}, blocks,
                            "this process" if lbase is not None else "the server's process",
                            {k: TimingStats(tuple(v), "cuda_event") for k, v in device.items() if v})


def comparison_info(c: ResumeComparison) -> dict:
    """A comparison as JSON-ready info: timings, medians, the remote minus in-process split, phases, blocks."""
    return {"in_process_in": c.reference,
            "remote": c.remote.to_dict(), "in_process": c.local.to_dict(), "server_ms": c.server.to_dict(),
            "logits_bitwise_equal": c.equal, "remote_minus_in_process_ms": c.remote.median_ms - c.local.median_ms,
            "paired_difference_ms": c.paired_difference_ms, "paired_differences_ms": c.paired_differences_ms,
            "blocks_per_side": len(c.blocks) // 2,
            "execution_ms": c.server.median_ms - c.local.median_ms,
            "transport_ms": c.remote.median_ms - c.server.median_ms,
            "device_ms": {k: t.to_dict() for k, t in c.device.items()},
            "host_beyond_device_paired_ms": c.host_beyond_device_paired_ms,
            "remote_phases": {k: t.to_dict() for k, t in c.phases.items()},
            "in_process_phases": {k: t.to_dict() for k, t in c.local_phases.items()}, "blocks": c.blocks}


@dataclass
class ClientRun:
    """One load client's outcome: per-cycle last-position logits digests, final tokens, latencies (ms), errors."""

    digests: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    pause_ms: list[float] = field(default_factory=list)
    resume_ms: list[float] = field(default_factory=list)
    cycle_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def client_script(address: str, ids: torch.Tensor, layer: int, cycles: int, new_tokens: int, deadline: float,
                  start: threading.Barrier | None = None) -> ClientRun:
    """Open a session, run to ``layer``; ``cycles`` times: fork, pause the child, resume it (last logits), close it;
    the last child also generates ``new_tokens``. Bounded by ``cycles`` and ``deadline``."""
    out = ClientRun()
    with Client(address, timeout_s=120) as c:
        try:
            base = c.open(ids, max_new_tokens=new_tokens)
            base.run_to(layer)
            if start is not None:
                start.wait(timeout=120)
            for k in range(cycles):
                if time.monotonic() > deadline:
                    out.errors.append(f"deadline reached after {k} cycles")
                    break
                t0 = time.perf_counter()
                (child,) = base.fork(1)
                t1 = time.perf_counter()
                child.pause()
                t2 = time.perf_counter()
                logits = child.resume(logits="last")
                t3 = time.perf_counter()
                if k == cycles - 1:
                    out.tokens = child.generate(new_tokens)[0].tolist()
                child.close()
                out.pause_ms.append((t2 - t1) * 1e3)
                out.resume_ms.append((t3 - t2) * 1e3)
                out.cycle_ms.append((time.perf_counter() - t0) * 1e3)
                out.digests.append(hashlib.sha256(logits.numpy().tobytes()).hexdigest())
            if base.state != "checkpoint":
                out.errors.append(f"base session is {base.state}")
            base.close()
        except Exception as e:  # noqa: BLE001 - every failure is counted by the test
            out.errors.append(f"{type(e).__name__}: {e}")
    return out


def run_load(address: str, prompts: list[torch.Tensor], layer: int, cycles: int, new_tokens: int,
             time_limit_s: float) -> tuple[list[ClientRun], list[ClientRun]]:
    """Each client's script alone (one cycle: the solo reference), then all clients at once."""
    deadline = time.monotonic() + time_limit_s
    solo = [client_script(address, ids, layer, 1, new_tokens, deadline) for ids in prompts]
    start = threading.Barrier(len(prompts))
    runs: list[ClientRun | None] = [None] * len(prompts)

    def work(i: int) -> None:
        runs[i] = client_script(address, prompts[i], layer, cycles, new_tokens, deadline, start)

    threads = [threading.Thread(target=work, args=(i,), name=f"load-client-{i}") for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + 60))
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"a load client hung past its deadline ({time_limit_s} s)")
    return solo, runs


def load_verdict(solo: list[ClientRun], runs: list[ClientRun],
                 cycles: int) -> tuple[dict[str, Any], dict[str, TimingStats]]:
    """(verdict, latencies): clients that lost work or whose results differ from their solo run, the first errors,
    p50/p99 per step; and every client's pause, resume and whole-cycle latencies pooled (host clock, ms)."""
    lost = sum(1 for r in runs if r.errors or len(r.digests) != cycles)
    unequal = sum(1 for s, r in zip(solo, runs)
                  if s.errors or set(r.digests) != set(s.digests) or r.tokens != s.tokens)
    pause = TimingStats(tuple(x for r in runs for x in r.pause_ms) or (0.0,), "host")
    resume = TimingStats(tuple(x for r in runs for x in r.resume_ms) or (0.0,), "host")
    cycle = TimingStats(tuple(x for r in runs for x in r.cycle_ms) or (0.0,), "host")
    return ({"clients_with_lost_work": lost, "clients_unequal_to_solo": unequal,
            "errors": [e for r in runs for e in r.errors][:20],
            "latency_ms": {name: {"p50": t.quantile_ms(0.5), "p99": t.quantile_ms(0.99), "n": t.n}
                           for name, t in (("pause", pause), ("resume", resume), ("cycle", cycle))}},
            {"pause": pause, "resume": resume, "cycle": cycle})


def seeded_prompts(n: int, seq: int, vocab: int) -> list[torch.Tensor]:
    """``n`` distinct prompts of ``seq`` token ids in [3, vocab), seeded per client (seeds 100, 101...)."""
    return [torch.randint(3, vocab, (1, seq), generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]


