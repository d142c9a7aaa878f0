"""Sessions over GPUs behind one endpoint (issue 22 item 2): one ``djinn serve`` worker per GPU, each with its own
slab and host pool, and a :class:`~djinn_core.rpc.router.Router` in front of them; clients talk to the router only.

* :func:`start_cluster`: ``n`` workers as child processes (:class:`ServerProcess`), worker ``i`` pinned to GPU ``i``
  (``CUDA_VISIBLE_DEVICES`` naming the NVML device behind this process's CUDA device ``i``, with
  ``CUDA_DEVICE_ORDER=PCI_BUS_ID``), or all on the CPU; a router in front, on a thread of this process.
* :func:`run_routed_pressure`: the server-pressure workload (:mod:`djinn_core.bench.experiments.server_pressure`:
  every client's session paused at ``L``, resumed round by round, each against its solo run) through the router. The
  solo runs go through the router too, one at a time (placed by the same policy; a client never picks its worker).
  Each worker's stats are polled on a connection of its own (straight to the worker, not through the router, whose
  loop the poll would hold up): where the sessions landed, and each worker's swaps.
* :func:`run_routed_load`: the RPC load (:func:`djinn_core.bench.experiments.rpc_overhead.run_load`) through the
  router, each worker's requests and sessions counted.
* :func:`run_dead_worker`: sessions open on every worker, one worker's process killed (SIGKILL); each client's next
  call either fails with :class:`~djinn_core.errors.WorkerLost` (its session lived there) or completes bitwise equal
  to its solo run; then a new session opens (on a survivor).

Where each dead-worker client's session lives is read from the workers themselves: the router forwards a request
under its client's id, so a worker lists a client's sessions (``sessions``) to a connection that uses the same id.

The router's stats (through ``Client(router.address).stats()``) carry each worker's own stats under ``workers``; the
functions here read that list through :func:`worker_entries`, which accepts an entry as ``{"stats": ..., "lost":
...}`` or as the worker's stats themselves (None for a lost worker).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from djinn_core.bench.experiments.rpc_overhead import run_load
from djinn_core.bench.experiments.server_pressure import (ServerPressureResult, StatsPoller, peak, serve_args,
                                                          solo_then_load)
from djinn_core.bench.vram import nvml_index
from djinn_core.errors import ConfigError, WorkerLost
from djinn_core.rpc.client import Client
from djinn_core.rpc.config import ServerConfig
from djinn_core.rpc.process import ServerProcess
from djinn_core.rpc.router import Router

SWAP_KEYS = ("swaps_out", "swaps_in", "bytes_out", "bytes_in")


# ---------------------------------------------------------------------------------------------------------------------
# the cluster: workers and a router


def worker_gpus(n: int) -> list[int | str]:
    """The NVML device (index, or UUID) behind each of this process's CUDA devices ``0..n-1`` (see
    :func:`djinn_core.bench.vram.nvml_index`): what worker ``i``'s ``CUDA_VISIBLE_DEVICES`` names."""
    return [nvml_index(i) for i in range(n)]


def worker_env(gpu: int | str | None) -> dict[str, str]:
    """This process's environment for a worker: pinned to ``gpu`` (in PCI bus order, as NVML numbers it), or with no
    GPU visible (``gpu`` None: a CPU worker)."""
    env = dict(os.environ)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else str(gpu)
    return env


def cluster_args(n: int, model: str, *, device: str, slab_bytes: int, host_pool_bytes: int, max_sessions: int,
                 vram_budget_bytes: int | None = None, dtype: str | None = None, seed: int = 0) -> list[list[str]]:
    """``djinn serve`` arguments for each of ``n`` workers (:func:`serve_args`): the same model and seed on each (so
    a session's results do not depend on where it lands), each worker with its own slab, host pool and budget."""
    return [serve_args(model, device=device, slab_bytes=slab_bytes, host_pool_bytes=host_pool_bytes,
                       max_sessions=max_sessions, vram_budget_bytes=vram_budget_bytes, dtype=dtype, seed=seed)
            for _ in range(n)]


@dataclass
class Cluster:
    """Workers (child processes) and the router in front of them; :meth:`stop` (or ``with``) ends both."""

    workers: list[ServerProcess]
    router: Router
    gpus: list[int | str | None]  # worker i's GPU (NVML index or UUID), None on the CPU
    args: list[list[str]]

    @property
    def address(self) -> str:
        return self.router.address

    @property
    def worker_addresses(self) -> list[str]:
        return [w.address for w in self.workers]

    def kill(self, i: int) -> int:
        """SIGKILL worker ``i``'s process (no clean shutdown: the router finds out when it stops answering); its exit
        code."""
        proc = self.workers[i].proc
        proc.kill()
        return proc.wait(60)

    def stop(self) -> None:
        self.router.stop()
        for w in self.workers:
            w.stop()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


CONTEXT_BYTES = 2 << 30  # more than one process's CUDA context: a process holding more is using the GPU


def wait_gpus_free(gpus: Sequence[int | str | None], *, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
    """Wait until no process holds more than a CUDA context (:data:`CONTEXT_BYTES`) on any of ``gpus`` (NVML
    indices; others are skipped). A worker's VRAM budget counts what its device already holds when it starts, as a
    card of the budget's size would, and a stopped process's memory is released a moment after it exits: workers
    must not start beside the last ones. :class:`ConfigError` naming the processes after ``timeout_s``."""
    from djinn_core.bench.vram import nvml_handle

    deadline = time.monotonic() + timeout_s
    for g in gpus:
        if not isinstance(g, int):
            continue
        pynvml, handle = nvml_handle(g)
        while True:
            busy = [(p.pid, int(p.usedGpuMemory or 0)) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    if (p.usedGpuMemory or 0) > CONTEXT_BYTES]
            if not busy:
                break
            if time.monotonic() > deadline:
                raise ConfigError(f"GPU {g} is still in use after {timeout_s:g} s by (pid, bytes) {busy}: a worker "
                                  "started now would count that memory against its budget")
            time.sleep(poll_s)


def start_cluster(args: Sequence[list[str]], *, gpus: Sequence[int | str | None] | None = None,
                  worker_timeout_s: float = 60.0, start_timeout_s: float = 300.0,
                  stop_timeout_s: float = 60.0, placement: Any = None) -> Cluster:
    """Start a worker per entry of ``args`` (all at once: each loads its model in parallel), worker ``i`` on GPU
    ``gpus[i]`` (``gpus`` None: no GPU, CPU workers), then a router on a free loopback port in front of them.
    Waits first until no other process uses those GPUs (:func:`wait_gpus_free`).
    ``worker_timeout_s``: how long the router waits for a worker's answer before it counts the worker lost (more
    than the longest op takes; a killed worker is found out that long after its next request). ``placement``: the
    router's placement policy (None: the router's default, placement by free slab)."""
    gpus = list(gpus) if gpus is not None else [None] * len(args)
    if len(gpus) != len(args):
        raise ConfigError(f"{len(args)} workers but {len(gpus)} GPUs")
    if any(g is not None for g in gpus):
        wait_gpus_free(gpus)

    def start(i: int) -> ServerProcess:
        return ServerProcess(list(args[i]), start_timeout_s=start_timeout_s, stop_timeout_s=stop_timeout_s,
                             env=worker_env(gpus[i]))

    with ThreadPoolExecutor(len(args)) as pool:
        futures = [pool.submit(start, i) for i in range(len(args))]
    started, failed = [], []
    for f in futures:
        try:
            started.append(f.result())
        except Exception as e:  # noqa: BLE001 - the others are stopped, then the first failure is raised
            failed.append(e)
    if failed:
        for w in started:
            w.stop()
        raise failed[0]
    try:
        router = Router([w.address for w in started], ServerConfig(port=0, stats_interval_s=0),
                        worker_timeout_s=worker_timeout_s, placement=placement).start()
    except Exception:
        for w in started:
            w.stop()
        raise
    return Cluster(started, router, gpus, [list(a) for a in args])


def worker_entries(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The router's ``stats`` reply's ``workers`` as ``{"address", "lost", "stats"}`` each (``stats`` None for a
    lost worker), whichever way an entry is given."""
    out = []
    for i, e in enumerate(stats.get("workers") or []):
        if isinstance(e, dict) and ("stats" in e or "lost" in e):
            out.append({"address": e.get("address"), "lost": e.get("lost"), "stats": e.get("stats")})
        else:
            out.append({"address": None, "lost": None if e else "no stats", "stats": e or None})
    return out


def with_swap_totals(stats: dict[str, Any]) -> dict[str, Any]:
    """The router's stats with ``swap`` counters (summed over the live workers) where the router gives none, so the
    single-server :func:`~djinn_core.bench.experiments.server_pressure.verdict` reads them."""
    if "swap" in stats:
        return stats
    live = [e["stats"] for e in worker_entries(stats) if e["stats"]]
    keys = {k for s in live for k in (s.get("swap") or {})}
    return {**stats, "swap": {k: sum((s.get("swap") or {}).get(k, 0) for s in live) for k in sorted(keys)}}


def worker_stats(cluster: Cluster, timeout_s: float = 60.0) -> list[dict[str, Any] | None]:
    """Each worker's own stats, straight from the worker (None for one that does not answer)."""
    out: list[dict[str, Any] | None] = []
    for a in cluster.worker_addresses:
        try:
            with Client(a, timeout_s=timeout_s) as c:
                out.append(c.stats())
        except Exception:  # noqa: BLE001 - a dead worker has no stats
            out.append(None)
    return out


def _swap_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, int]:
    b, a = (before or {}).get("swap") or {}, (after or {}).get("swap") or {}
    return {k: a.get(k, 0) - b.get(k, 0) for k in SWAP_KEYS if k in a}


# ---------------------------------------------------------------------------------------------------------------------
# the pressure workload through the router


@dataclass
class RoutedPressureResult:
    """The workload's result as a single server's (:class:`ServerPressureResult`, the router's stats with swap totals,
    the workers' timelines concatenated, each row tagged ``worker``) and each worker's own record."""

    result: ServerPressureResult
    workers: list[dict[str, Any]]  # per worker: gpu, address, timeline, peaks, load_swaps, stats before/after
    router_stats_after: dict[str, Any]


def run_routed_pressure(cluster: Cluster, prompts: list[torch.Tensor], layer: int, *, timeout_s: float = 600.0,
                        poll_s: float = 0.25, progress: Callable[[str], None] | None = None) -> RoutedPressureResult:
    """:func:`~djinn_core.bench.experiments.server_pressure.run_server_pressure` through the router: each client's
    script alone (the solo references, one at a time through the router), then every client at once, each worker's
    stats polled on a connection of its own throughout."""
    w_before: list[dict[str, Any] | None] = []
    pollers = [StatsPoller(a, period_s=poll_s) for a in cluster.worker_addresses]

    @contextlib.contextmanager
    def polling() -> Iterator[None]:  # every worker's stats, straight from it, while the load runs
        with contextlib.ExitStack() as stack:
            for p in pollers:
                stack.enter_context(p)
            yield

    def stats(st: dict[str, Any]) -> dict[str, Any]:
        if not w_before:  # the first call: after the solo runs, before the load
            w_before.extend(worker_stats(cluster))
        return with_swap_totals(st)

    solo, before, runs, after, wall = solo_then_load(cluster.address, prompts, layer, polling=polling(),
                                                     timeout_s=timeout_s, stats=stats, progress=progress)
    w_after = worker_stats(cluster)
    workers = []
    for i, p in enumerate(pollers):
        workers.append({"worker": i, "gpu": cluster.gpus[i], "address": cluster.worker_addresses[i],
                        "peak_sessions": int(peak(p.samples, "sessions")),
                        "peak_resident": int(peak(p.samples, "resident")),
                        "peak_swapped": int(peak(p.samples, "swapped")),
                        "peak_slab_used": int(peak(p.samples, "slab_used")),
                        "peak_torch_reserved": peak(p.samples, "torch_reserved"),
                        "max_allocated": ((w_after[i] or {}).get("vram") or {}).get("max_allocated"),
                        "load_swaps": _swap_delta(w_before[i], w_after[i]),
                        "poll_errors": p.errors[:5], "timeline": p.samples,
                        "stats_before": w_before[i], "stats_after": w_after[i]})
    timeline = [{"worker": w["worker"], **row} for w in workers for row in w["timeline"]]
    return RoutedPressureResult(ServerPressureResult(solo, runs, before, after, timeline, wall), workers, after)


def placement_summary(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the sessions landed and what each worker swapped (JSON-ready, without the timelines)."""
    return {str(w["worker"]): {k: v for k, v in w.items() if k not in ("timeline", "stats_before", "stats_after")}
            for w in workers}


# ---------------------------------------------------------------------------------------------------------------------
# the load test through the router


def run_routed_load(cluster: Cluster, prompts: list[torch.Tensor], layer: int, cycles: int, new_tokens: int,
                    time_limit_s: float, poll_s: float = 0.25) -> dict[str, Any]:
    """:func:`~djinn_core.bench.experiments.rpc_overhead.run_load` through the router, each worker's stats polled
    straight from it: ``solo``, ``runs`` (lists of
    :class:`~djinn_core.bench.experiments.rpc_overhead.ClientRun`) and per worker its peak sessions and the requests
    it served."""
    before = worker_stats(cluster)
    pollers = [StatsPoller(a, period_s=poll_s) for a in cluster.worker_addresses]
    for p in pollers:
        p.__enter__()
    try:
        solo, runs = run_load(cluster.address, prompts, layer, cycles, new_tokens, time_limit_s)
    finally:
        for p in pollers:
            p.__exit__(None, None, None)
    after = worker_stats(cluster)
    workers = [{"worker": i, "gpu": cluster.gpus[i], "address": cluster.worker_addresses[i],
                "peak_sessions": int(peak(p.samples, "sessions")),
                "requests": (after[i] or {}).get("requests", 0) - (before[i] or {}).get("requests", 0),
                "sessions_left": (after[i] or {}).get("sessions")}
               for i, p in enumerate(pollers)]
    return {"solo": solo, "runs": runs, "workers": workers}


# ---------------------------------------------------------------------------------------------------------------------
# a worker dies


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


@dataclass
class DeadWorkerClient:
    """One client of the dead-worker scenario: where its session lived, its digests (resume logits, tokens, step
    logits) and tokens, whether it got :class:`WorkerLost`, and its errors."""

    client_id: str
    worker: int | None = None
    digests: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    worker_lost: bool = False
    errors: list[str] = field(default_factory=list)


def dead_worker_client(address: str, client_id: str, ids: torch.Tensor, layer: int, new_tokens: int, *,
                       timeout_s: float, opened: threading.Barrier | None = None,
                       resume: threading.Barrier | None = None) -> DeadWorkerClient:
    """Open a session, run it to ``layer`` (then wait at ``opened``, and at ``resume`` while a worker is killed),
    resume it (last logits), generate ``new_tokens`` with their logits, close it. Barriers None: the solo run."""
    out = DeadWorkerClient(client_id)
    try:
        with Client(address, timeout_s=timeout_s, client_id=client_id) as c:
            s = c.open(ids, max_new_tokens=new_tokens)
            s.run_to(layer)
            for b in (opened, resume):
                if b is not None:
                    b.wait(timeout=timeout_s)
            out.digests.append(_digest(s.resume(logits="last")))
            tokens, steps = s.generate(new_tokens, return_logits=True)
            out.tokens = tokens[0].tolist()
            out.digests += [_digest(tokens), _digest(steps)]
            s.close()
    except WorkerLost as e:
        out.worker_lost = True
        out.errors.append(f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - every failure is counted by the test
        out.errors.append(f"{type(e).__name__}: {e}")
        for b in (opened, resume):
            if b is not None:
                b.abort()
    return out


def session_worker(cluster: Cluster, client_id: str, timeout_s: float = 60.0) -> int | None:
    """The live worker that lists a session of ``client_id`` (the router forwards requests under the client's id);
    None when none does."""
    for i, a in enumerate(cluster.worker_addresses):
        if cluster.workers[i].proc.poll() is not None:
            continue
        with Client(a, timeout_s=timeout_s, client_id=client_id) as c:
            if c.sessions():
                return i
    return None


@dataclass
class DeadWorkerResult:
    killed: int  # the worker killed
    exit_code: int | None
    solo: list[DeadWorkerClient]
    runs: list[DeadWorkerClient]
    sessions_before_kill: list[int]  # sessions each worker held when it was killed (its own stats)
    new_open: DeadWorkerClient  # a session opened after the kill, run like the others (prompt 0)
    router_stats_after: dict[str, Any]
    wall_s: float


def run_dead_worker(cluster: Cluster, prompts: list[torch.Tensor], layer: int, new_tokens: int, *, kill: int = 1,
                    timeout_s: float = 600.0) -> DeadWorkerResult:
    """Each client's script alone (its solo run, through the router), then every client at once: all open and run to
    ``layer``; worker ``kill`` is killed (SIGKILL); every client resumes and generates. Then a new session (prompt 0)
    opens and runs the same script. Clients wait for the router's ``worker_timeout_s`` at most once: give
    ``timeout_s`` more than that."""
    address = cluster.address
    solo = [dead_worker_client(address, f"solo-{i}", ids, layer, new_tokens, timeout_s=timeout_s)
            for i, ids in enumerate(prompts)]
    n = len(prompts)
    opened, resume = threading.Barrier(n + 1), threading.Barrier(n + 1)
    runs: list[DeadWorkerClient | None] = [None] * n

    def work(i: int) -> None:
        runs[i] = dead_worker_client(address, f"client-{i}", prompts[i], layer, new_tokens, timeout_s=timeout_s,
                                     opened=opened, resume=resume)

    threads = [threading.Thread(target=work, args=(i,), name=f"dead-worker-client-{i}") for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    try:
        opened.wait(timeout=timeout_s)
        where = [session_worker(cluster, f"client-{i}") for i in range(n)]
        held = [(s or {}).get("sessions", 0) for s in worker_stats(cluster)]
        code = cluster.kill(kill)
        resume.wait(timeout=timeout_s)
    except threading.BrokenBarrierError:
        for t in threads:
            t.join(timeout_s)
        raise RuntimeError(f"a client failed before the kill: {[r.errors for r in runs if r is not None]}") from None
    for t in threads:
        t.join(2 * timeout_s)
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"a client hung past {2 * timeout_s:.0f} s after the kill")
    wall = time.perf_counter() - t0
    done = [r for r in runs if r is not None]
    for r, w in zip(done, where):
        r.worker = w
    new = dead_worker_client(address, "after-the-kill", prompts[0], layer, new_tokens, timeout_s=timeout_s,
                             opened=None, resume=None)
    if not new.errors:  # where it opened: a second copy, kept open while the workers are asked
        with Client(address, timeout_s=timeout_s, client_id="after-the-kill-probe") as c:
            s = c.open(prompts[0], max_new_tokens=new_tokens)
            new.worker = session_worker(cluster, "after-the-kill-probe")
            s.close()
    with Client(address, timeout_s=timeout_s) as c:
        after = c.stats()
    return DeadWorkerResult(kill, code, solo, done, held, new, after, wall)


def dead_worker_verdict(res: DeadWorkerResult) -> dict[str, Any]:
    """Clients whose session lived on the killed worker and how many of them got :class:`WorkerLost`; the others,
    and how many of them completed bitwise equal to their solo run; whether the session opened after the kill
    completed (equal to prompt 0's solo run) on a live worker; the router's view of the dead worker."""
    on_dead = [r for r in res.runs if r.worker == res.killed]
    others = [r for r in res.runs if r.worker != res.killed]
    by_id = {f"client-{i}": s for i, s in enumerate(res.solo)}

    def equal(r: DeadWorkerClient, s: DeadWorkerClient) -> bool:
        return not r.errors and not s.errors and r.digests == s.digests and r.tokens == s.tokens

    entries = worker_entries(res.router_stats_after)
    return {
        "killed_worker": res.killed, "exit_code": res.exit_code,
        "clients": len(res.runs), "placement": {r.client_id: r.worker for r in res.runs},
        "sessions_before_kill": res.sessions_before_kill,
        "clients_on_dead_worker": len(on_dead),
        "clients_on_dead_worker_with_worker_lost": sum(1 for r in on_dead if r.worker_lost),
        "clients_on_live_workers": len(others),
        "clients_on_live_workers_bitwise_complete": sum(1 for r in others if equal(r, by_id[r.client_id])),
        "clients_unplaced": sum(1 for r in res.runs if r.worker is None),
        "new_open_completed": not res.new_open.errors,
        "new_open_equal_to_solo": equal(res.new_open, res.solo[0]),
        "new_open_worker": res.new_open.worker,
        "router_lost_workers": [i for i, e in enumerate(entries) if e["lost"] or e["stats"] is None],
        "errors": {r.client_id: r.errors for r in res.runs if r.errors},
        "solo_errors": [e for s in res.solo for e in s.errors][:20],
        "new_open_errors": res.new_open.errors, "wall_s": res.wall_s,
    }


__all__ = ["Cluster", "DeadWorkerClient", "DeadWorkerResult", "RoutedPressureResult", "cluster_args",
           "dead_worker_client", "dead_worker_verdict", "placement_summary", "run_dead_worker", "run_routed_load",
           "run_routed_pressure", "start_cluster", "wait_gpus_free", "with_swap_totals", "worker_entries",
           "worker_env", "worker_gpus", "worker_stats"]
