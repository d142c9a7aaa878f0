"""exp3: memory pressure through the server, as the seeds ran it. 64 clients, each with one 2048-token Llama-2-13B
session paused at layer 20 and resumed for 2 rounds (16 tokens each), through ``djinn serve`` in its own process under
the run's VRAM budget (``--djinn-vram-budget``, default the H100 80GB card): all complete, each bitwise equal to its
solo run (round-0 resume logits, tokens, every step's logits), within the budget, with the server's swaps recorded.
p50/p99 per resume (host clock and the server's own time) and the server's timeline (its ``stats`` polled through the
run) go into the JSON.

The server's slab is the budget less the weights, the server's CUDA context and an activation headroom; its host
pool holds what must be swapped at 64 sessions (see ``swap_pool_bytes``). Run this file in a pytest process of its own
(no other test's model on the GPU): NVML's peak is the whole device's.

Preconditions (each fails the test): the budget fits the card and ``djinn serve`` can enforce it; the host can pin
the pool; the sessions ask for at least 1.5x the budget; the server evicted (no client pauses: every swap-out is an
eviction) and swapped back in; resumes were timed. The CPU test runs the same code on a tiny config.
"""

from __future__ import annotations

import os

import psutil
import pytest
import torch

from djinn_core.bench import preconditions as pre
from djinn_core.bench.experiments.memory_pressure import ROUNDS, demand_bytes, prompts, swap_pool_bytes
from djinn_core.bench.experiments.server_pressure import (nvml_probe, peak, resume_timing, run_server_pressure,
                                                          serve_accepts, serve_args, session_kv_bytes, verdict)
from djinn_core.bench.vram import VramSampler
from djinn_core.memory.host_ram import default_min_free_host_bytes
from djinn_core.models import architecture_config, model_sizes
from djinn_core.rpc.process import ServerProcess

GiB = 2**30
MODEL = "llama2-13b"
CLIENTS = 64
PAUSE_LAYER = 20
PROMPT_TOKENS = 2048
SERVER_OVERHEAD = 1 * GiB  # the server's CUDA context, cuBLAS workspace and loaded kernels, outside its slab
ACTIVATION_HEADROOM = 3 * GiB  # activations of a 2048-token forward and the allocator's slack, outside the slab
HEAD_BYTES = 64 << 20  # a checkpoint head at 2048 tokens (~21 MiB), rounded up


def _record(claim, v: dict, params: dict) -> None:
    claim.check("load_no_session_lost", what="clients that lost their session or a round, or met an error",
                method="djinn serve", value=v["clients_with_lost_work"], bound=0, op="==", unit="clients",
                params=params, check=False)
    claim.check("load_every_client_bitwise_equal_to_its_solo_run",
                what="clients whose resume logits, tokens or step logits differ from their solo run",
                method="djinn serve", value=v["clients_unequal_to_solo"], bound=0, op="==", unit="clients",
                params=params, check=False)


@pytest.mark.h100
@pytest.mark.slow
def test_64_clients_with_2048_token_sessions_swap_through_the_server_within_the_budget(vram_budget, claim):
    budget = vram_budget.bytes
    params = {"model": MODEL, "clients": CLIENTS, "L": PAUSE_LAYER, "prompt_tokens": PROMPT_TOKENS,
              "rounds": ROUNDS, "budget": vram_budget.spec}
    session_bytes = session_kv_bytes(MODEL, PROMPT_TOKENS, torch.float16)
    weight_bytes = model_sizes(architecture_config(MODEL), torch.float16).total_weight_bytes
    claim.precondition("vram_budget_within_card", value=(budget or float("nan")) / vram_budget.card_bytes, op="<=",
                       bound=1.0, unit="x card", what=f"the VRAM budget ({vram_budget.spec}) over the card's memory",
                       params=params)
    enforce = vram_budget.below_card
    if enforce:
        claim.precondition("server_can_enforce_the_budget", value=int(serve_accepts("--vram-budget")), op="==",
                           bound=1, unit="bool", what="djinn serve has --vram-budget (the budget is below the card)",
                           params=params)
    slab_bytes = budget - weight_bytes - SERVER_OVERHEAD - ACTIVATION_HEADROOM
    # the host pool holds every session's state (KV and a checkpoint head) the slab cannot, plus two sessions
    pool_bytes = swap_pool_bytes(CLIENTS, session_bytes, HEAD_BYTES, slab_bytes)
    vm = psutil.virtual_memory()
    pre.at_least(claim, "host_ram_pins_the_swap_pool", value=vm.available - default_min_free_host_bytes(vm.total),
                 bound=pool_bytes, unit="bytes", params=params,
                 what="host RAM available for pinning, against the server's host pool for 64 sessions")
    pre.oversubscribed(claim, demand_bytes=demand_bytes(CLIENTS, session_bytes, weight_bytes), budget_bytes=budget,
                       params=params)
    ps = [p.cpu() for p in prompts(CLIENTS, PROMPT_TOKENS, 32000, "cpu")]
    args = serve_args(MODEL, device="cuda", dtype="float16", slab_bytes=slab_bytes, host_pool_bytes=pool_bytes,
                      max_sessions=2 * CLIENTS, vram_budget_bytes=budget if enforce else None)
    got: dict = {}

    def run() -> None:
        with ServerProcess(args, start_timeout_s=900, stop_timeout_s=300) as srv:
            sampler = VramSampler(0, period_s=0.02, memory_probe=nvml_probe(0, srv.proc.pid))
            with sampler:
                got["result"] = run_server_pressure(srv.address, ps, PAUSE_LAYER, timeout_s=600)
            got["vram"] = sampler
            got["server_output"] = srv.output[-40:]

    claim.measure(run)
    res, sampler = got["result"], got["vram"]
    v = verdict(res)
    st = res.stats_after
    claim.info(verdict=v, server_timeline=res.timeline, stats_before=res.stats_before, stats_after=st,
               vram=sampler.to_dict(), budget_bytes=budget, server_args=args, server_output=got["server_output"],
               peaks_against_budget={**sampler.peaks(budget),
                                     "server_torch_max_allocated_bytes": st["vram"]["max_allocated"],
                                     "server_torch_reserved_peak_polled_bytes": peak(res.timeline, "torch_reserved")},
               resume_host=resume_timing(res).to_dict() if v["resumes"] else None,
               sizing={"slab_bytes": slab_bytes, "host_pool_bytes": pool_bytes, "session_bytes": session_bytes,
                       "weight_bytes": weight_bytes, "server_overhead_bytes": SERVER_OVERHEAD,
                       "activation_headroom_bytes": ACTIVATION_HEADROOM},
               pytest_process_nvml_bytes=nvml_probe(0, os.getpid())()["server_used"])
    pre.evicted(claim, evictions=v["load_swaps"]["swaps_out"], params=params,
                what="session swap-outs by the server during the load (no client pauses: each is an eviction)")
    pre.swaps_measured(claim, direction="in", swaps=v["load_swaps"]["swaps_in"], params=params)
    pre.at_least(claim, "resumes_timed", value=v["resumes"], bound=CLIENTS, unit="resumes", params=params,
                 what="resume RPCs timed (at least round 0's, one per client)")
    _record(claim, v, params)
    claim.check("peak_nvml_used_over_budget", what="peak GPU memory used (NVML, the whole device) over the budget",
                method="djinn serve", value=sampler.peak_nvml_used() / budget, bound=1.0, op="<=", unit="x budget",
                params=params, check=False)
    claim.check("peak_server_torch_allocated_over_budget",
                what="the server's peak torch-allocated GPU memory (its max_allocated) over the budget",
                method="djinn serve", value=st["vram"]["max_allocated"] / budget, bound=1.0, op="<=",
                unit="x budget", params=params, check=False)
    claim.check("peak_server_torch_reserved_over_budget",
                what="the server's torch-reserved GPU memory, peak of its polled stats, over the budget",
                method="djinn serve", value=peak(res.timeline, "torch_reserved") / budget, bound=1.0, op="<=",
                unit="x budget", params=params, check=False)
    failed = [r["claim"] for r in claim.records if not r["passed"]]
    assert not failed, f"{failed}; verdict {v}"


@pytest.mark.cpu
@pytest.mark.slow
def test_server_pressure_plumbing_on_cpu(claim):
    """The same code through ``djinn serve`` on the CPU: 4 clients of the tiny Llama over a slab that holds two and a
    half fully decoded sessions, so the server must evict; all complete, bitwise equal to their solo runs."""
    clients, layer, tokens = 4, 3, 40
    session_bytes = session_kv_bytes("llama-tiny", tokens, torch.float32)
    slab_bytes = int(2.5 * session_bytes)
    pool_bytes = swap_pool_bytes(clients, session_bytes, 64 << 10, slab_bytes)
    args = serve_args("llama-tiny", device="cpu", slab_bytes=slab_bytes, host_pool_bytes=pool_bytes,
                      max_sessions=2 * clients)
    assert "--vram-budget" not in args  # no budget to enforce on the CPU
    ps = prompts(clients, tokens, 512, "cpu")
    got: dict = {}

    def run() -> None:
        with ServerProcess(args, start_timeout_s=300) as srv:
            got["result"] = run_server_pressure(srv.address, ps, layer, timeout_s=120, poll_s=0.05)

    claim.measure(run)
    res = got["result"]
    v = verdict(res)
    claim.info(verdict=v, server_timeline=res.timeline)
    assert not v["solo_errors"], v["solo_errors"]
    pre.evicted(claim, evictions=v["load_swaps"]["swaps_out"], params={"clients": clients})
    pre.swaps_measured(claim, direction="in", swaps=v["load_swaps"]["swaps_in"], params={"clients": clients})
    pre.at_least(claim, "resumes_timed", value=v["resumes"], bound=clients, unit="resumes",
                 what="resume RPCs timed", params={"clients": clients})
    _record(claim, v, {"clients": clients})
    assert all(c.digests for c in res.runs) and len(res.runs) == clients
    assert res.timeline, "the server's stats were never polled"
    assert res.stats_after["sessions"] == 0, "sessions left on the server"
    assert set(v["resume_ms"]["by_state"]) <= {"checkpoint", "paused", "swapped"}
    failed = [r["claim"] for r in claim.records if not r["passed"]]
    assert not failed, f"{failed}; verdict {v}"
