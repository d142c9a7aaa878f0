"""Memory pressure through the server: many clients, each with one long session paused at a layer, resumed round by
round through ``djinn serve`` in its own process, under a VRAM budget.

The workload is the in-process one (:mod:`djinn_core.bench.experiments.memory_pressure`) with one client per session:
each client (a thread with its own connection) opens its session and runs it to the pause layer; once every client
has (a barrier), each round every client resumes its session if it is not resident (a checkpoint, paused or swapped
session) and generates ``GEN_PER_ROUND`` tokens; a barrier closes each round. No client pauses by hand: every swap
the server makes is an eviction, forced by the budget. Each client's round-0 resume logits, tokens and per-step
logits are compared with the same script alone on the idle server before the load (:func:`run_server_pressure`).

Recorded: every resume's host latency, the server's own time for it (``Client.last_server_ms``) and its phases
(``Client.last_phases_ms``); the server's ``stats`` polled on its own connection through the run (the server's
timeline: sessions resident and swapped, slab use, swap counters, torch allocator bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from djinn_core.bench.experiments.memory_pressure import GEN_PER_ROUND, NEW_TOKENS, ROUNDS
from djinn_core.bench.timing import TimingStats
from djinn_core.rpc.client import Client

RESIDENT_STATES = ("running",)  # a session in any other state is resumed before its round's tokens


def serve_args(model: str, *, device: str, slab_bytes: int, host_pool_bytes: int, max_sessions: int,
               vram_budget_bytes: int | None = None, dtype: str | None = None, seed: int = 0) -> list[str]:
    """``djinn serve`` arguments for a pressure run: the slab and host pool as sized by the caller, no periodic stats
    log, an idle timeout longer than any run; ``--vram-budget`` where a budget is to be enforced on the server."""
    args = ["--model", model, "--device", device, "--seed", str(seed), "--slab-bytes", str(slab_bytes),
            "--host-pool-bytes", str(host_pool_bytes), "--max-sessions", str(max_sessions),
            "--stats-interval-s", "0", "--idle-timeout-s", "86400"]
    if dtype is not None:
        args += ["--dtype", dtype]
    if vram_budget_bytes is not None:
        args += ["--vram-budget", str(vram_budget_bytes)]
    return args


def serve_accepts(option: str) -> bool:
    """Whether ``djinn serve`` has the command-line option ``option`` (e.g. ``--vram-budget``)."""
    from djinn_core.rpc.cli import add_serve_parser

    parser = argparse.ArgumentParser()
    serve = add_serve_parser(parser.add_subparsers())
    return option in serve.format_help().replace(",", " ").split()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


@dataclass
class ResumeSample:
    round: int
    state: str  # the session's state before the resume
    host_ms: float
    server_ms: float | None
    phases: dict[str, float] | None


@dataclass
class PressureClientRun:
    """One client's outcome: digests of its round-0 resume logits and each round's tokens and step logits, its
    tokens, its resumes, and any error."""

    digests: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    resumes: list[ResumeSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def pressure_client(address: str, ids: torch.Tensor, layer: int, *, timeout_s: float,
                    barrier: threading.Barrier | None = None) -> PressureClientRun:
    """One client's script (see the module doc); ``barrier`` None runs it alone (the solo reference)."""
    out = PressureClientRun()

    def sync() -> None:
        if barrier is not None:
            barrier.wait(timeout=timeout_s)

    try:
        with Client(address, timeout_s=timeout_s) as c:
            s = c.open(ids, max_new_tokens=NEW_TOKENS)
            s.run_to(layer)
            sync()
            for r in range(ROUNDS):
                state = s.state
                if state not in RESIDENT_STATES:
                    t0 = time.perf_counter()
                    logits = s.resume(logits="last")
                    dt = (time.perf_counter() - t0) * 1e3
                    out.resumes.append(ResumeSample(r, state, dt, c.last_server_ms, c.last_phases_ms))
                    if r == 0:
                        out.digests.append(_digest(logits))
                tokens, steps = s.generate(GEN_PER_ROUND, return_logits=True)
                out.tokens += tokens[0].tolist()
                out.digests += [_digest(tokens), _digest(steps)]
                sync()
            s.close()
    except Exception as e:  # noqa: BLE001 - every failure is counted by the test; the others must not wait for it
        out.errors.append(f"{type(e).__name__}: {e}")
        if barrier is not None:
            barrier.abort()
    return out


class StatsPoller:
    """The server's ``stats`` every ``period_s`` on a connection of its own, on a thread: the server's timeline."""

    def __init__(self, address: str, period_s: float = 0.25, timeout_s: float = 60.0):
        self.address, self.period_s, self.timeout_s = address, period_s, timeout_s
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="djinn-stats-poller", daemon=True)

    def _loop(self) -> None:
        t0 = time.perf_counter()
        with Client(self.address, timeout_s=self.timeout_s) as c:
            while True:
                try:
                    st = c.stats()
                except Exception as e:  # noqa: BLE001 - recorded; the run's verdict does not depend on the poller
                    self.errors.append(f"{type(e).__name__}: {e}")
                    st = None
                if st is not None:
                    self.samples.append(timeline_row(time.perf_counter() - t0, st))
                if self._stop.wait(self.period_s):
                    return

    def __enter__(self) -> "StatsPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 10)


def timeline_row(t_s: float, st: dict[str, Any]) -> dict[str, Any]:
    """One row of the server's timeline from its ``stats`` reply."""
    vram = st.get("vram") or {}
    return {"t_s": t_s, "sessions": st["sessions"], "resident": st["resident"], "swapped": st["swapped"],
            "slab_used": st["slab"]["used"], **{f"swap_{k}": v for k, v in st["swap"].items()},
            "torch_allocated": vram.get("allocated"), "torch_reserved": vram.get("reserved")}


@dataclass
class ServerPressureResult:
    solo: list[PressureClientRun]
    runs: list[PressureClientRun]
    stats_before: dict[str, Any]  # after the solo runs, before the load
    stats_after: dict[str, Any]
    timeline: list[dict[str, Any]]
    wall_s: float


def solo_then_load(address: str, prompts: list[torch.Tensor], layer: int, *, polling: AbstractContextManager,
                   timeout_s: float = 600.0, stats: Callable[[dict[str, Any]], dict[str, Any]] = lambda st: st,
                   progress: Callable[[str], None] | None = None
                   ) -> tuple[list[PressureClientRun], dict[str, Any], list[PressureClientRun], dict[str, Any], float]:
    """Each client's script alone through ``address`` (the solo references), then every client at once (a thread
    each, a barrier per round) inside ``polling`` (whatever samples the servers' stats meanwhile). Returns (solo runs,
    ``stats(stats)`` before the load, the load's runs, ``stats(stats)`` after, the load's wall seconds)."""
    solo = [pressure_client(address, ids, layer, timeout_s=timeout_s) for ids in prompts]
    with Client(address, timeout_s=timeout_s) as c:
        before = stats(c.stats())
    if progress is not None:
        progress("solo runs done")
    barrier = threading.Barrier(len(prompts))
    runs: list[PressureClientRun | None] = [None] * len(prompts)

    def work(i: int) -> None:
        runs[i] = pressure_client(address, prompts[i], layer, timeout_s=timeout_s, barrier=barrier)

    threads = [threading.Thread(target=work, args=(i,), name=f"pressure-client-{i}") for i in range(len(prompts))]
    t0 = time.perf_counter()
    with polling:
        for t in threads:
            t.start()
        deadline = time.monotonic() + (ROUNDS + 2) * timeout_s
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
    wall = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"a pressure client hung past {(ROUNDS + 2) * timeout_s:.0f} s")
    with Client(address, timeout_s=timeout_s) as c:
        after = stats(c.stats())
    return solo, before, [r for r in runs if r is not None], after, wall


def run_server_pressure(address: str, prompts: list[torch.Tensor], layer: int, *, timeout_s: float = 600.0,
                        poll_s: float = 0.25, progress: Callable[[str], None] | None = None) -> ServerPressureResult:
    """Each client's script alone (the solo references), then every client at once, the server's stats polled
    throughout (:func:`solo_then_load`)."""
    poller = StatsPoller(address, period_s=poll_s)
    solo, before, runs, after, wall = solo_then_load(address, prompts, layer, polling=poller, timeout_s=timeout_s,
                                                     progress=progress)
    return ServerPressureResult(solo, runs, before, after, poller.samples, wall)


def session_kv_bytes(model: str, tokens: int, dtype: torch.dtype) -> int:
    """One fully decoded session's KV bytes: ``tokens`` of prompt plus ``NEW_TOKENS``, architecture ``model``."""
    from djinn_core.models import architecture_config
    from djinn_core.runtime.kv_cache import KVGeometry

    geo = KVGeometry.for_model(architecture_config(model), batch=1, capacity=tokens + NEW_TOKENS, dtype=dtype)
    return geo.block_bytes * geo.num_layers


def nvml_probe(index: int, pid: int) -> Callable[[], dict[str, float]]:
    """A memory probe for :class:`~djinn_core.bench.vram.VramSampler`: device memory used on CUDA device ``index``'s
    GPU (NVML, every process) and what process ``pid`` holds there, without touching CUDA in this process."""
    from djinn_core.bench.vram import nvml_handle

    pynvml, handle = nvml_handle(index)

    def probe() -> dict[str, float]:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return {"nvml_used": float(pynvml.nvmlDeviceGetMemoryInfo(handle).used),
                "server_used": float(sum(p.usedGpuMemory or 0 for p in procs if p.pid == pid))}

    return probe


def verdict(result: ServerPressureResult) -> dict[str, Any]:
    """Clients that lost work and clients unequal to their solo run; resume latencies pooled (host clock and the
    server's own time, ms) with p50/p99 overall and by the state the session was resumed from; swaps the load made."""
    n = len(result.solo)
    lost = sum(1 for r in result.runs if r.errors) + n - len(result.runs)
    unequal = sum(1 for s, r in zip(result.solo, result.runs)
                  if s.errors or r.digests != s.digests or r.tokens != s.tokens)
    resumes = [x for r in result.runs for x in r.resumes]
    swap_before, swap_after = result.stats_before["swap"], result.stats_after["swap"]
    load_swaps = {k: swap_after[k] - swap_before[k] for k in swap_after}

    def pct(samples: list[float]) -> dict[str, Any]:
        if not samples:
            return {"n": 0}
        t = TimingStats(tuple(samples), "host")
        return {"n": t.n, "p50": t.quantile_ms(0.5), "p99": t.quantile_ms(0.99), "max": max(samples)}

    by_state: dict[str, list[ResumeSample]] = {}
    for x in resumes:
        by_state.setdefault(x.state, []).append(x)
    return {
        "clients": n, "clients_with_lost_work": lost, "clients_unequal_to_solo": unequal,
        "errors": [e for r in result.runs for e in r.errors][:20],
        "solo_errors": [e for r in result.solo for e in r.errors][:20],
        "resumes": len(resumes), "load_swaps": load_swaps,
        "resume_ms": {"host": pct([x.host_ms for x in resumes]),
                      "server": pct([x.server_ms for x in resumes if x.server_ms is not None]),
                      "by_state": {k: {"host": pct([x.host_ms for x in v]),
                                       "server": pct([x.server_ms for x in v if x.server_ms is not None])}
                                   for k, v in sorted(by_state.items())}},
        "wall_s": result.wall_s,
    }


def resume_timing(result: ServerPressureResult) -> TimingStats:
    """Every resume of the load, host clock (ms); :class:`ConfigError` from TimingStats when there was none."""
    return TimingStats(tuple(x.host_ms for r in result.runs for x in r.resumes), "host")


def peak(timeline: list[dict[str, Any]], key: str) -> float:
    """The largest value of ``key`` over the server's timeline (0 when never reported)."""
    return max((row[key] for row in timeline if row.get(key) is not None), default=0.0)
