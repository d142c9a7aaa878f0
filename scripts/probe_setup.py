"""Shared set-up of the RPC/resume probes: the Llama-2-13B architecture (seed 0, fp16) on the GPU, a runtime over it
as ``tests_exp3/test_rpc_overhead.py`` builds its in-process side (3 GiB slab, 1 GiB pinned host pool), and a seeded
2048-token prompt on the device."""

from __future__ import annotations

import torch


def llama2_13b_runtime(seq: int = 2048):
    """(model, runtime, prompt ids on the device)."""
    from djinn_core.runtime import BreakpointRuntime
    from djinn_core.memory.host_pool import HostPool
    from djinn_core.models import build_model
    from djinn_core.memory.slab import Slab

    dev = torch.device("cuda")
    model = build_model("llama2-13b", device=dev, dtype=torch.float16, seed=0)
    rt = BreakpointRuntime(model, slab=Slab(3 << 30, dev), host_pool=HostPool(1 << 30))
    ids = torch.randint(3, 32000, (1, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    return model, rt, ids
