"""Sessions over GPUs behind one endpoint (issue 22 item 2): one ``djinn serve`` worker per GPU (worker ``i`` pinned to
GPU ``i``), each with its own slab and host pool under its own VRAM budget, and a ``Router`` in front of them; every
client talks to the router only, and sessions are placed by free slab.

GPU (2 CUDA GPUs; run this file in a pytest process of its own, one test per process where the machine's command
limit is short: NVML's peaks are whole devices'):

* 128 clients, each with one 2048-token Llama-2-13B session (fp16, random weights) paused at layer 20 and resumed for
  2 rounds of 16 tokens, 64 sessions per GPU at the run's budget (``--djinn-vram-budget``, default the H100 80GB card)
  on each worker: none lost, each bitwise equal to its solo run (round-0 resume logits, tokens, step logits), each
  worker's NVML peak and torch peak within its budget. The solo runs go through the router as well (one at a time,
  placed by the same policy), so a session's results are checked independent of the GPU it ran on.
* Load: 64 clients x 100 pause/resume cycles through the router: none lost, all bitwise equal to their solo runs,
  p50/p99 of pause, resume and cycle in the info.
* A worker dies: 16 sessions open over both workers, worker 1 killed (SIGKILL); every client whose session lived there
  gets ``WorkerLost`` on its next call, every other completes bitwise equal to its solo run, and a new session opens
  on the survivor.

Preconditions (each fails the test): every worker ran and took at least 2/3 of an even share of the sessions; each
worker's sessions and weights ask for at least 1.5x its budget; the server evicted and swapped back in; the host can
pin both pools; resumes were timed; the killed worker held sessions and so did the survivor. Every record names the
GPU it measured (``gpu``: the NVML index of the worker's GPU, ``gpus``: all of them). ``DJINN_WORKERS`` (default 2)
sets how many GPUs, one worker each, with 64 sessions per GPU (4 on nvidia-h200-x4, issue 23). The CPU tests run the
same code with two CPU workers of the tiny Llama.
"""

from __future__ import annotations

import os

import psutil
import pytest
import torch

from djinn_core.bench import preconditions as pre
from djinn_core.bench.experiments.memory_pressure import NEW_TOKENS, ROUNDS, demand_bytes, prompts, swap_pool_bytes
from djinn_core.bench.experiments.rpc_overhead import load_verdict, seeded_prompts
from djinn_core.bench.experiments.server_pressure import (nvml_probe, resume_timing, serve_accepts, session_kv_bytes,
                                                          verdict)
from djinn_core.bench.experiments.sessions_over_gpus import (cluster_args, dead_worker_verdict, placement_summary,
                                                             run_dead_worker, run_routed_load, run_routed_pressure,
                                                             start_cluster, worker_gpus)
from djinn_core.bench.vram import VramSampler
from djinn_core.memory.host_ram import default_min_free_host_bytes
from djinn_core.models import architecture_config, model_sizes

GiB = 2**30
WORKERS = int(os.environ.get("DJINN_WORKERS", "2"))  # GPUs, one worker each: 2 (issue 22); 4 on nvidia-h200-x4 (23)
MODEL = "llama2-13b"
CLIENTS = 64 * WORKERS  # 64 per GPU
PAUSE_LAYER = 20
PROMPT_TOKENS = 2048
SERVER_OVERHEAD = 1 * GiB  # as test_server_memory_pressure.py sizes one server: CUDA context, cuBLAS, kernels
ACTIVATION_HEADROOM = 3 * GiB  # activations of a 2048-token forward and the allocator's slack
HEAD_BYTES = 64 << 20  # a checkpoint head at 2048 tokens (~21 MiB), rounded up
LOAD_CLIENTS, LOAD_CYCLES, LOAD_LAYER = 64, 100, 30
DEAD_CLIENTS = 16  # 8 per GPU
KILLED = 1
GPU_WORKER_TIMEOUT_S = 30.0  # the router's wait for one op of a worker (the longest: a 2048-token prefill under swaps)
METHOD = "djinn route over djinn serve workers"


def _need_gpus() -> list:
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < WORKERS:
        pytest.skip(f"needs {WORKERS} CUDA GPUs in one host (one djinn serve worker per GPU); this machine has {have}")
    return worker_gpus(WORKERS)


def _gpu_sizing(budget: int, sessions_per_worker: int) -> dict:
    """One worker's slab and host pool at ``budget``, as test_server_memory_pressure.py sizes one server, for
    ``sessions_per_worker`` sessions."""
    session_bytes = session_kv_bytes(MODEL, PROMPT_TOKENS, torch.float16)
    weight_bytes = model_sizes(architecture_config(MODEL), torch.float16).total_weight_bytes
    slab_bytes = budget - weight_bytes - SERVER_OVERHEAD - ACTIVATION_HEADROOM
    return {"slab_bytes": slab_bytes, "session_bytes": session_bytes, "weight_bytes": weight_bytes,
            "host_pool_bytes": swap_pool_bytes(sessions_per_worker, session_bytes, HEAD_BYTES, slab_bytes),
            "server_overhead_bytes": SERVER_OVERHEAD, "activation_headroom_bytes": ACTIVATION_HEADROOM}


def _budget_preconditions(claim, vram_budget, sizing: dict, params: dict) -> bool:
    """The budget fits the card and the workers can enforce it; the host can pin every worker's pool. Whether the
    budget is to be enforced (below the card)."""
    budget = vram_budget.bytes
    claim.precondition("vram_budget_within_card", value=(budget or float("nan")) / vram_budget.card_bytes, op="<=",
                       bound=1.0, unit="x card", what=f"the VRAM budget ({vram_budget.spec}) over the card's memory",
                       params=params)
    if vram_budget.below_card:
        claim.precondition("server_can_enforce_the_budget", value=int(serve_accepts("--vram-budget")), op="==",
                           bound=1, unit="bool", what="djinn serve has --vram-budget (the budget is below the card)",
                           params=params)
    vm = psutil.virtual_memory()
    pre.at_least(claim, "host_ram_pins_the_swap_pools", value=vm.available - default_min_free_host_bytes(vm.total),
                 bound=WORKERS * sizing["host_pool_bytes"], unit="bytes", params=params,
                 what="host RAM available for pinning, against every worker's host pool")
    return vram_budget.below_card


def _gpu_args(vram_budget, sizing: dict, max_sessions: int) -> list[list[str]]:
    return cluster_args(WORKERS, MODEL, device="cuda", dtype="float16", slab_bytes=sizing["slab_bytes"],
                        host_pool_bytes=sizing["host_pool_bytes"], max_sessions=max_sessions,
                        vram_budget_bytes=vram_budget.bytes if vram_budget.below_card else None)


# ---------------------------------------------------------------------------------------------------------------------
# claims shared by the GPU and CPU tests


def _worker_params(params: dict, w: dict) -> dict:
    return {**params, "worker": w["worker"], "gpu": w["gpu"]}


def _pressure_claims(claim, v: dict, workers: list[dict], clients: int, params: dict, *,
                     session_bytes: int | None = None, weight_bytes: int | None = None,
                     budget: int | None = None) -> None:
    """Preconditions (every worker ran and took 2/3 of an even share of the sessions; each worker's demand over its
    budget where there is one; evictions and swap-ins; resumes timed), then no session lost and every client bitwise."""
    claim.precondition("workers_ran", value=sum(1 for w in workers if w["stats_after"] is not None), op="==",
                       bound=len(workers), unit="workers", params=params,
                       what="workers that answered their stats after the load")
    for w in workers:
        pre.at_least(claim, "sessions_landed_on_worker", value=w["peak_sessions"],
                     bound=-(-2 * clients // (3 * len(workers))),
                     unit="sessions", params=_worker_params(params, w),
                     what="sessions the worker held at its peak (its own stats, polled), at least 2/3 of an even share")
        if budget is not None:
            pre.oversubscribed(claim, demand_bytes=demand_bytes(w["peak_sessions"], session_bytes, weight_bytes),
                               budget_bytes=budget, params=_worker_params(params, w))
    pre.evicted(claim, evictions=v["load_swaps"]["swaps_out"], params=params,
                what="session swap-outs by the workers during the load (no client pauses: each is an eviction)")
    pre.swaps_measured(claim, direction="in", swaps=v["load_swaps"]["swaps_in"], params=params)
    pre.at_least(claim, "resumes_timed", value=v["resumes"], bound=clients, unit="resumes", params=params,
                 what="resume RPCs timed (at least round 0's, one per client)")
    claim.check("load_no_session_lost", what="clients that lost their session or a round, or met an error",
                method=METHOD, value=v["clients_with_lost_work"], bound=0, op="==", unit="clients",
                params=params, check=False)
    claim.check("load_every_client_bitwise_equal_to_its_solo_run",
                what="clients whose resume logits, tokens or step logits differ from their solo run",
                method=METHOD, value=v["clients_unequal_to_solo"], bound=0, op="==", unit="clients",
                params=params, check=False)


def _load_claims(claim, got: dict, clients: int, cycles: int, params: dict) -> dict:
    """Preconditions (every client ran, cycles timed, every worker held 2/3 of an even share of the clients'
    sessions), then no client lost work and every client bitwise equal to its solo run; p50/p99 go to the info. The
    verdict."""
    v, latency = load_verdict(got["solo"], got["runs"], cycles)
    claim.info(load=v, load_workers=got["workers"],
               percentiles_ms={name: {"p50": t.quantile_ms(0.5), "p99": t.quantile_ms(0.99), "n": t.n}
                               for name, t in latency.items()})
    claim.precondition("load_clients_ran", value=len(got["runs"]), op="==", bound=clients, unit="clients",
                       what="load clients that returned a result", params=params)
    pre.at_least(claim, "load_cycles_timed", value=sum(len(r.resume_ms) for r in got["runs"]), bound=1,
                 unit="cycles", what="pause/resume cycles timed over all clients", params=params)
    for w in got["workers"]:
        pre.at_least(claim, "load_sessions_on_worker", value=w["peak_sessions"],
                     bound=-(-2 * clients // (3 * len(got["workers"]))),
                     unit="sessions", params=_worker_params(params, w),
                     what="sessions the worker held at its peak during the load, at least 2/3 of an even share")
    claim.check("load_no_session_lost", what="load clients that lost a session or a cycle, or met an error",
                method=METHOD, value=v["clients_with_lost_work"], bound=0, op="==", unit="clients",
                params=params, check=False)
    claim.check("load_every_client_bitwise_equal_to_its_solo_run",
                what="load clients whose logits or tokens differ from their solo run", method=METHOD,
                value=v["clients_unequal_to_solo"], bound=0, op="==", unit="clients", params=params, check=False)
    return v


def _dead_worker_claims(claim, v: dict, params: dict) -> None:
    """Preconditions (the worker was killed and held sessions, the survivor held sessions, every client's session was
    found on a worker), then WorkerLost for each client of the dead worker, the others bitwise complete, a new session
    on a survivor."""
    claim.precondition("worker_killed", value=int(v["exit_code"] is not None and v["exit_code"] != 0), op="==",
                       bound=1, unit="bool", what="the killed worker's process exited (SIGKILL)", params=params)
    pre.at_least(claim, "clients_placed", value=v["clients"] - v["clients_unplaced"], bound=v["clients"],
                 unit="clients", what="clients whose session a worker listed before the kill", params=params)
    pre.at_least(claim, "clients_on_dead_worker", value=v["clients_on_dead_worker"], bound=1, unit="clients",
                 what="clients whose session lived on the worker killed", params=params)
    pre.at_least(claim, "clients_on_live_workers", value=v["clients_on_live_workers"], bound=1, unit="clients",
                 what="clients whose session lived on a worker left running", params=params)
    claim.check("dead_worker_clients_without_worker_lost",
                what="clients of the killed worker whose next call did not fail with WorkerLost", method=METHOD,
                value=v["clients_on_dead_worker"] - v["clients_on_dead_worker_with_worker_lost"], bound=0, op="==",
                unit="clients", params=params, check=False)
    claim.check("live_worker_clients_not_bitwise_complete",
                what="clients of the surviving workers that failed or differ from their solo run", method=METHOD,
                value=v["clients_on_live_workers"] - v["clients_on_live_workers_bitwise_complete"], bound=0,
                op="==", unit="clients", params=params, check=False)
    survivor = v["new_open_worker"] is not None and v["new_open_worker"] != v["killed_worker"]
    claim.check("new_session_after_the_kill_completes_on_a_survivor",
                what="a session opened after the kill ran bitwise equal to its solo run, on a surviving worker",
                method=METHOD, value=int(v["new_open_completed"] and v["new_open_equal_to_solo"] and survivor),
                bound=1, op="==", unit="bool", params=params, check=False)


def _assert_claims(claim, v: dict) -> None:
    failed = [r["claim"] for r in claim.records if not r["passed"]]
    assert not failed, f"{failed}; verdict {v}"


# ---------------------------------------------------------------------------------------------------------------------
# GPU: 2 x (Llama-2-13B fp16, 80 GB budget)


@pytest.fixture
def gpu_cluster(vram_budget):
    """Two workers (one per GPU) sized for 64 sessions each at the run's budget, and the router: one cluster per test
    (the pressure and the load tests; the dead-worker test starts its own), stopped before the next test starts its
    own: the budget counts every process's memory on a GPU, as an 80 GB card would, so two clusters cannot share one
    (on nvidia-h200-x2 at 43bb4d8 a module-wide cluster still held 76.6 GiB of GPU 0 when the dead-worker test
    started its workers, which got 1.96 GiB and ran out of memory)."""
    gpus = _need_gpus()
    sizing = _gpu_sizing(vram_budget.bytes, CLIENTS // WORKERS)
    args = _gpu_args(vram_budget, sizing, max_sessions=2 * CLIENTS)
    with start_cluster(args, gpus=gpus, worker_timeout_s=GPU_WORKER_TIMEOUT_S, start_timeout_s=900,
                       stop_timeout_s=300) as cluster:
        yield cluster, sizing


@pytest.mark.gpu
@pytest.mark.slow
def test_128_sessions_of_2048_tokens_over_2_gpus_behind_one_endpoint_all_bitwise_within_each_budget(
        gpu_cluster, vram_budget, claim):
    cluster, sizing = gpu_cluster
    budget = vram_budget.bytes
    params = {"model": MODEL, "clients": CLIENTS, "workers": WORKERS, "gpus": list(cluster.gpus), "L": PAUSE_LAYER,
              "prompt_tokens": PROMPT_TOKENS, "rounds": ROUNDS, "budget": vram_budget.spec}
    _budget_preconditions(claim, vram_budget, sizing, params)
    ps = [p.cpu() for p in prompts(CLIENTS, PROMPT_TOKENS, 32000, "cpu")]
    got: dict = {}

    def run() -> None:
        samplers = [VramSampler(0, period_s=0.02, memory_probe=nvml_probe(i, w.proc.pid))
                    for i, w in enumerate(cluster.workers)]
        for s in samplers:
            s.start()
        try:
            got["result"] = run_routed_pressure(cluster, ps, PAUSE_LAYER, timeout_s=600)
        finally:
            for s in samplers:
                s.stop()
        got["vram"] = samplers

    claim.measure(run)
    routed, samplers = got["result"], got["vram"]
    res, workers = routed.result, routed.workers
    v = verdict(res)
    claim.info(verdict=v, placement=placement_summary(workers), router_stats_before=res.stats_before,
               router_stats_after=res.stats_after, worker_timelines={str(w["worker"]): w["timeline"] for w in workers},
               vram={str(w["worker"]): {"gpu": w["gpu"], **s.to_dict()} for w, s in zip(workers, samplers)},
               peaks_against_budget={str(w["worker"]): {"gpu": w["gpu"], **s.peaks(budget),
                                                        "server_torch_max_allocated_bytes": w["max_allocated"]}
                                     for w, s in zip(workers, samplers)},
               resume_host=resume_timing(res).to_dict() if v["resumes"] else None, budget_bytes=budget,
               worker_args=cluster.args, gpus=list(cluster.gpus), sizing=sizing,
               solo_runs="through the router, one at a time (placed by the same policy)",
               worker_output={str(i): w.output[-40:] for i, w in enumerate(cluster.workers)},
               pytest_process_nvml_bytes=[nvml_probe(i, os.getpid())()["server_used"] for i in range(WORKERS)])
    _pressure_claims(claim, v, workers, CLIENTS, params, session_bytes=sizing["session_bytes"],
                     weight_bytes=sizing["weight_bytes"], budget=budget)
    for w, s in zip(workers, samplers):
        wp = _worker_params(params, w)
        claim.check("peak_nvml_used_over_budget", what="peak GPU memory used on the worker's GPU (NVML, the whole "
                    "device) over its budget", method=METHOD, value=s.peak_nvml_used() / budget, bound=1.0, op="<=",
                    unit="x budget", params=wp, check=False)
        claim.check("peak_server_torch_allocated_over_budget",
                    what="the worker's peak torch-allocated GPU memory (its max_allocated) over its budget",
                    method=METHOD, value=(w["max_allocated"] or float("nan")) / budget, bound=1.0, op="<=",
                    unit="x budget", params=wp, check=False)
    _assert_claims(claim, v)


@pytest.mark.gpu
@pytest.mark.slow
def test_64_clients_x_100_pause_resume_cycles_over_2_gpus_lose_nothing_and_match_their_solo_runs(gpu_cluster, claim):
    cluster, _ = gpu_cluster
    params = {"model": MODEL, "clients": LOAD_CLIENTS, "cycles": LOAD_CYCLES, "L": LOAD_LAYER, "prompt_tokens": 32,
              "workers": WORKERS, "gpus": list(cluster.gpus)}
    ps = seeded_prompts(LOAD_CLIENTS, seq=32, vocab=32000)
    got: dict = {}
    claim.measure(lambda: got.update(run_routed_load(cluster, ps, LOAD_LAYER, LOAD_CYCLES, new_tokens=4,
                                                     time_limit_s=540)))
    claim.info(gpus=list(cluster.gpus), topology=f"{LOAD_CLIENTS} client threads in the pytest process; a router "
               "thread in it; one djinn serve child process per GPU")
    v = _load_claims(claim, got, LOAD_CLIENTS, LOAD_CYCLES, params)
    _assert_claims(claim, v)


@pytest.mark.gpu
@pytest.mark.slow
def test_a_dead_gpu_worker_takes_only_its_own_sessions_down(vram_budget, claim):
    gpus = _need_gpus()
    sizing = _gpu_sizing(vram_budget.bytes, DEAD_CLIENTS // WORKERS)
    params = {"model": MODEL, "clients": DEAD_CLIENTS, "workers": WORKERS, "gpus": gpus, "killed_gpu": gpus[KILLED],
              "L": PAUSE_LAYER, "prompt_tokens": PROMPT_TOKENS, "budget": vram_budget.spec}
    _budget_preconditions(claim, vram_budget, sizing, params)
    args = _gpu_args(vram_budget, sizing, max_sessions=4 * DEAD_CLIENTS)
    ps = [p.cpu() for p in prompts(DEAD_CLIENTS, PROMPT_TOKENS, 32000, "cpu")]
    got: dict = {}

    def run() -> None:
        with start_cluster(args, gpus=gpus, worker_timeout_s=GPU_WORKER_TIMEOUT_S, start_timeout_s=900,
                           stop_timeout_s=300) as cluster:
            got["result"] = run_dead_worker(cluster, ps, PAUSE_LAYER, NEW_TOKENS, kill=KILLED, timeout_s=600)
            got["output"] = {str(i): w.output[-40:] for i, w in enumerate(cluster.workers)}

    claim.measure(run)
    v = dead_worker_verdict(got["result"])
    claim.info(verdict=v, gpus=gpus, killed_gpu=gpus[KILLED], worker_args=args, sizing=sizing,
               worker_timeout_s=GPU_WORKER_TIMEOUT_S, worker_output=got["output"],
               router_stats_after=got["result"].router_stats_after,
               solo_runs="through the router, one at a time, before the kill")
    _dead_worker_claims(claim, v, params)
    _assert_claims(claim, v)


# ---------------------------------------------------------------------------------------------------------------------
# CPU: the same code with two and with four CPU workers of the tiny Llama (no speed, no budget; four as issue 23's
# nvidia-h200-x4 would run it)

CPU_CLIENTS, CPU_LAYER, CPU_TOKENS = 12, 3, 40
CPU_WORKERS = (2, 4)


def _cpu_args(workers: int, max_sessions: int) -> list[list[str]]:
    """Each worker's slab holds one and a half fully decoded sessions (3 or more land on each of up to 4 workers:
    each must evict)."""
    session_bytes = session_kv_bytes("llama-tiny", CPU_TOKENS, torch.float32)
    slab_bytes = int(1.5 * session_bytes)
    pool_bytes = swap_pool_bytes(CPU_CLIENTS, session_bytes, 64 << 10, slab_bytes)
    return cluster_args(workers, "llama-tiny", device="cpu", slab_bytes=slab_bytes, host_pool_bytes=pool_bytes,
                        max_sessions=max_sessions)


@pytest.fixture(scope="module", params=CPU_WORKERS, ids=lambda n: f"workers={n}")
def cpu_cluster(request):
    with start_cluster(_cpu_args(request.param, 8 * CPU_CLIENTS), worker_timeout_s=60.0,
                       start_timeout_s=300) as cluster:
        yield cluster


@pytest.mark.cpu
@pytest.mark.slow
def test_sessions_over_workers_plumbing_on_cpu(cpu_cluster, claim):
    n = len(cpu_cluster.workers)
    params = {"model": "llama-tiny", "clients": CPU_CLIENTS, "workers": n}
    assert all("--vram-budget" not in a for a in cpu_cluster.args)  # no budget to enforce on the CPU
    got: dict = {}
    ps = prompts(CPU_CLIENTS, CPU_TOKENS, 512, "cpu")
    claim.measure(lambda: got.update(result=run_routed_pressure(cpu_cluster, ps, CPU_LAYER, timeout_s=120,
                                                                poll_s=0.05)))
    routed = got["result"]
    res, workers = routed.result, routed.workers
    v = verdict(res)
    claim.info(verdict=v, placement=placement_summary(workers))
    assert not v["solo_errors"], v["solo_errors"]
    assert [w["gpu"] for w in workers] == [None] * n
    _pressure_claims(claim, v, workers, CPU_CLIENTS, params)
    assert sum(w["peak_sessions"] for w in workers) >= CPU_CLIENTS
    assert all(w["load_swaps"]["swaps_out"] > 0 for w in workers), placement_summary(workers)
    assert res.stats_after["sessions"] == 0, "sessions left behind the router"
    _assert_claims(claim, v)


@pytest.mark.cpu
@pytest.mark.slow
def test_load_over_workers_plumbing_on_cpu(cpu_cluster, claim):
    clients, cycles = 4, 5
    got: dict = {}
    claim.measure(lambda: got.update(run_routed_load(cpu_cluster, seeded_prompts(clients, 8, 512), CPU_LAYER,
                                                     cycles, new_tokens=3, time_limit_s=120, poll_s=0.05)))
    n = len(cpu_cluster.workers)
    v = _load_claims(claim, got, clients, cycles, {"clients": clients, "cycles": cycles, "workers": n})
    assert [w["sessions_left"] for w in got["workers"]] == [0] * n
    assert all(w["requests"] > 0 for w in got["workers"])
    _assert_claims(claim, v)


@pytest.mark.cpu
@pytest.mark.slow
@pytest.mark.parametrize("workers", CPU_WORKERS, ids=lambda n: f"workers={n}")
def test_dead_worker_plumbing_on_cpu(workers, claim):
    params = {"model": "llama-tiny", "clients": CPU_CLIENTS, "workers": workers, "killed": KILLED}
    got: dict = {}

    def run() -> None:
        with start_cluster(_cpu_args(workers, 8 * CPU_CLIENTS), worker_timeout_s=5.0, start_timeout_s=300) as cluster:
            got["result"] = run_dead_worker(cluster, prompts(CPU_CLIENTS, CPU_TOKENS, 512, "cpu"), CPU_LAYER,
                                            NEW_TOKENS, kill=KILLED, timeout_s=120)

    claim.measure(run)
    v = dead_worker_verdict(got["result"])
    claim.info(verdict=v)
    assert not v["solo_errors"], v["solo_errors"]
    _dead_worker_claims(claim, v, params)
    assert v["router_lost_workers"] == [KILLED], v
    assert all("WorkerLost" in e[0] for e in v["errors"].values()), v["errors"]
    _assert_claims(claim, v)


@pytest.mark.cpu
def test_workers_wait_until_no_other_process_uses_their_gpus(monkeypatch):
    """A cluster on GPUs starts only once no process holds more than a CUDA context there (a stopped cluster's memory
    is released a moment after its processes exit); still held after the timeout, a ConfigError names it."""
    import types

    from djinn_core.bench import vram
    from djinn_core.bench.experiments.sessions_over_gpus import CONTEXT_BYTES, wait_gpus_free
    from djinn_core.errors import ConfigError

    seen = {"calls": 0}
    held = [types.SimpleNamespace(pid=11, usedGpuMemory=76 << 30), types.SimpleNamespace(pid=12, usedGpuMemory=1 << 29)]

    def processes(handle):
        seen["calls"] += 1
        return held if seen["calls"] <= 2 else held[1:]  # the big one exits after two looks; a bare context stays

    fake = types.SimpleNamespace(nvmlDeviceGetComputeRunningProcesses=processes)
    monkeypatch.setattr(vram, "nvml_handle", lambda index: (fake, index))
    wait_gpus_free([0, None, "GPU-x"], timeout_s=5, poll_s=0.01)
    assert seen["calls"] == 3 and held[1].usedGpuMemory < CONTEXT_BYTES
    seen["calls"] = -10**6  # never frees
    with pytest.raises(ConfigError, match=r"GPU 0 is still in use .* \[\(11, 81604378624\)\]"):
        wait_gpus_free([0], timeout_s=0.05, poll_s=0.01)
