"""Shared set-up of the GPU probes: the Llama-2-13B architecture (seed 0, fp16) on the GPU, a runtime over it as the
RPC claim builds its in-process side (3 GiB slab, 1 GiB pinned host pool), and a seeded prompt on the device."""

from __future__ import annotations

from typing import Any

import torch

from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.slab import Slab
from djinn_core.models import build_model
from djinn_core.runtime import BreakpointRuntime


def llama2_13b_runtime(seq: int = 2048, slab_bytes: int = 3 << 30,
                       host_pool_bytes: int = 1 << 30) -> tuple[Any, BreakpointRuntime, torch.Tensor]:
    """(model, runtime, (1, seq) prompt ids on the device)."""
    dev = torch.device("cuda")
    model = build_model("llama2-13b", device=dev, dtype=torch.float16, seed=0)
    rt = BreakpointRuntime(model, slab=Slab(slab_bytes, dev), host_pool=HostPool(host_pool_bytes))
    ids = torch.randint(3, 32000, (1, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    return model, rt, ids
