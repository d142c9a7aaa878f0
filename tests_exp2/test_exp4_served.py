"""exp4, served (issue 21 item 5): ``djinn serve --model llama2-70b --stream --vram-budget 24GiB`` on the GPU. Remote
sessions over the Llama-2-70B architecture streamed through the server's ring -- paused at L and swapped to the host,
edited, forked, resumed and decoding -- are bitwise the resident model, and the server process stays within its
24 GiB budget.

The server streams ``SERVED_LAYERS`` of the 70B's layers (its pack pins every one: 1.7 GiB each), so that the
resident reference fits beside it on one H200. h100 test (run: ``pytest -m h100 tests_exp2/test_exp4_served.py``);
the CPU version of the same path is ``tests_core/test_serve_streamed.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from djinn_core.bench.experiments.exp2_streaming import SEED, free_device_memory, prompt
from djinn_core.bench.experiments.exp4_streamed_sessions import ARCH, steering_vector, unequal
from djinn_core.bench.experiments.server_pressure import nvml_probe
from djinn_core.bench.experiments.token_accuracy import session_run
from djinn_core.bench.vram import VramSampler
from djinn_core.memory.vram_budget import allocator_fraction
from djinn_core.models import build_model
from djinn_core.rpc.client import Client
from djinn_core.rpc.process import ServerProcess
from djinn_core.runtime import plain_run

GiB = 1 << 30
SERVED_LAYERS = 16
BUDGET = "24GiB"  # decimal units other than 80GB are refused as ambiguous
BUDGET_BYTES = 24 * GiB
PROMPT_TOKENS, NEW_TOKENS = 64, 8
# (L, edited, through a fork): paused at L and swapped to the host each time
CASES = ((1, False, False), (8, True, True), (15, True, False))
ARGS = ["--model", ARCH, "--device", "cuda", "--dtype", "float16", "--seed", str(SEED), "--num-layers",
        str(SERVED_LAYERS), "--stream", "--vram-budget", BUDGET, "--session-tokens", str(PROMPT_TOKENS + NEW_TOKENS),
        "--host-pool-bytes", "2GiB", "--stats-interval-s", "0"]


@pytest.mark.h100
@pytest.mark.slow
def test_remote_sessions_over_a_served_streamed_70b_are_bitwise_within_the_budget(cuda_device, claim):
    params = {"arch": ARCH, "layers": SERVED_LAYERS, "budget": BUDGET, "prompt_tokens": PROMPT_TOKENS,
              "new_tokens": NEW_TOKENS, "cases": [list(c) for c in CASES]}
    ids = prompt(PROMPT_TOKENS, 32000, device="cpu")
    v = steering_vector(8192, "cpu", torch.float32)

    def edit(h: torch.Tensor) -> torch.Tensor:  # the same arithmetic on both sides: fp32 on the host, then h's dtype
        return (h.cpu().float() + v).to(h.dtype).to(h.device)

    got: dict = {}

    def run() -> None:
        free_device_memory()
        before = nvml_probe(0, os.getpid())()["nvml_used"]
        with ServerProcess(ARGS, start_timeout_s=900) as srv:
            sampler = VramSampler(0, period_s=0.02, memory_probe=nvml_probe(0, srv.proc.pid))
            with sampler, Client(srv.address, timeout_s=600) as c:
                got["remote"] = [tuple(t.cpu() for t in session_run(c, ids, L, NEW_TOKENS, edit=edit if e else None,
                                                                     fork=f)) for L, e, f in CASES]
                got["stats"] = c.stats()
            got["sampler"], got["before"] = sampler, before
            got["server_output"] = srv.output[-40:]

    claim.measure(run)
    with allocator_fraction(1.0, cuda_device):  # the exact reference is not held to the server's budget
        resident = build_model(ARCH, num_layers=SERVED_LAYERS, device=cuda_device, seed=SEED)
        dev = ids.to(cuda_device)
        want = [tuple(t.cpu() for t in plain_run(resident, dev, NEW_TOKENS, layer=L, edit=edit if e else None))
                for L, e, _ in CASES]
        del resident
        free_device_memory()
    sampler, st = got["sampler"], got["stats"]
    diff = {f"L={c[0]}": unequal(g, w) for c, g, w in zip(CASES, got["remote"], want)}
    server_peak = max(r.get("server_used", 0.0) for r in sampler.timeline) if sampler.timeline else 0.0
    claim.info(diff=diff, stats=st, server_output=got["server_output"], vram=sampler.to_dict(),
               nvml_used_before_server=got["before"], tokens=[g[1].tolist() for g in got["remote"]])
    claim.precondition("server_streamed_weights", value=(st.get("streamed") or {}).get("streaming", {}).get(
        "bytes_streamed", 0), op=">", bound=0, unit="bytes", what="weight bytes the server's ring streamed",
        params=params)
    claim.precondition("sessions_swapped_to_the_host", value=st["swap"]["swaps_out"], op=">=", bound=len(CASES),
                       unit="swaps", what="swap-outs of the server's sessions (each paused at its L)", params=params)
    claim.precondition("server_memory_sampled", value=len(sampler.timeline), op=">", bound=0, unit="samples",
                       what="NVML samples of the server process's GPU memory", params=params)
    claim.check("unequal_logits_and_tokens_vs_resident", method="torch bit patterns: prompt and step logits, tokens",
                value=sum(sum(d.values()) for d in diff.values()), bound=0, op="<=", unit="elements", params=params,
                check=False)
    claim.check("server_peak_gpu_memory_over_budget", method="djinn serve --stream --vram-budget 24GiB",
                what="the server process's peak GPU memory (NVML, its own) over the budget",
                value=server_peak / BUDGET_BYTES, bound=1.0, op="<=", unit="x budget", params=params, check=False)
    failed = [r["claim"] for r in claim.records if not r["passed"]]
    assert not failed, f"{failed}: {diff}"
