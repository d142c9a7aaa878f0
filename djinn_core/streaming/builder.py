"""Building a streamed model from an architecture: check everything, pin and fill the host pack, place the resident
modules on the device, wrap.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from djinn_core.errors import ConfigError, StreamingBudgetTooSmall
from djinn_core.models import build_model, decoder_layers, family_of, init_parameters_, rebuild_rotary_
from djinn_core.streaming.host_pack import pack_layer_weights
from djinn_core.streaming.layout import LayerLayout
from djinn_core.streaming.model import StreamedModel
from djinn_core.streaming.plan import (DEFAULT_CHUNK_BYTES, GiB, StreamingPolicy, check_chunk_bytes, plan_budget,
                                       resident_modules, resident_param_bytes)
from djinn_core.validation import check_device, check_int, check_optional_int

DEFAULT_CUDA_OVERHEAD_BYTES = 1 * GiB  # CUDA context + cuBLAS workspaces, outside what the plan otherwise counts


def place_resident_(model: nn.Module, device: torch.device | str, *, seed: int | None = None) -> int:
    """Put everything outside the decoder layers (embeddings, head, final norm, rotary) on ``device``.

    Parameters on ``meta`` are materialised and filled with :func:`init_parameters_` under ``seed`` (as
    ``build_model`` would); others are moved. Buffers on ``meta`` are only allowed in the family's rotary embedding,
    whose tables are then rebuilt on ``device``. Returns the resident parameter bytes.
    """
    device = check_device(device)
    rotary = family_of(model).rotary_embedding(model)
    rebuild_rotary = False
    with torch.no_grad():
        for name, mod in resident_modules(model):
            prefix = f"{name}." if name else ""
            fresh = [p for p in mod.parameters(recurse=False) if p.is_meta]
            if fresh:
                if seed is None:
                    raise ConfigError(f"{name} has parameters on meta: pass seed= to materialise them")
                if any(True for _ in mod.children()) and any(True for c in mod.children() for _ in c.parameters()):
                    raise ConfigError(f"{name} owns parameters and has children with parameters: unsupported")
                mod.to_empty(device=device, recurse=False)
                init_parameters_(mod, seed, prefix=prefix)
            else:
                for attr, p in list(mod._parameters.items()):
                    if p is not None and p.device != device:
                        mod._parameters[attr] = nn.Parameter(p.detach().to(device), requires_grad=False)
            for attr, b in list(mod._buffers.items()):
                if b is None:
                    continue
                if b.is_meta:
                    if mod is not rotary:
                        raise ConfigError(f"buffer {prefix}{attr} is on meta and is not a rotary table")
                    rebuild_rotary = True
                elif b.device != device:
                    mod._buffers[attr] = b.to(device)
    if rebuild_rotary:
        rebuild_rotary_(model, device)
    return resident_param_bytes(model)


def build_streamed_model(
    config: Any,
    *,
    budget_bytes: int,
    device: torch.device | str = "cuda",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prefetch_depth: int | None = None,
    policy: StreamingPolicy | None = None,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float16,
    num_layers: int | None = None,
    host_sets: int | None = None,
    batch: int = 1,
    max_tokens: int = 2048,
    prefill_tokens: int | None = None,
    device_overhead_bytes: int | None = None,
    max_slots: int | None = None,
    min_free_host_bytes: int | None = None,
    record_timeline: bool = False,
    progress: bool = True,
) -> StreamedModel:
    """Build an architecture (name or config) with seeded random weights, streamed under ``budget_bytes`` of VRAM.

    Checks, in order and before pinning anything: the device (:class:`~djinn_core.errors.DeviceUnavailable`), the
    arguments (``ConfigError``), the budget (:class:`StreamingBudgetTooSmall`), the policy against the layer size
    (``ConfigError``: slots, prefetch depth, chunk counts), the host RAM for the pack
    (:class:`~djinn_core.errors.InsufficientHostMemory`, keeping ``min_free_host_bytes`` available). Then pins and
    fills the pack (layers materialised on ``device`` with ``init_parameters_`` and copied to the host), materialises
    the resident modules on ``device``, and wraps. The weights are bit-identical to ``build_model(config,
    device=device, seed=seed)``. ``host_sets`` packs fewer distinct weight sets than layers; layer ``i`` then streams
    set ``i % host_sets`` (a deeper model from a smaller host). ``policy`` defaults to the plan's whole ring with
    ``chunk_bytes``/``prefetch_depth``; ``device_overhead_bytes`` (VRAM the plan counts for the CUDA context and
    workspaces) defaults to 1 GiB on CUDA, 0 on CPU.
    """
    device = check_device(device)
    if policy is None:
        check_chunk_bytes(chunk_bytes)
        check_optional_int("prefetch_depth", prefetch_depth, 0)
    elif not isinstance(policy, StreamingPolicy):
        raise ConfigError(f"policy must be a StreamingPolicy or None, got {type(policy).__name__}")
    check_optional_int("host_sets", host_sets, 1)
    check_int("seed", seed, None)
    if device_overhead_bytes is None:
        device_overhead_bytes = DEFAULT_CUDA_OVERHEAD_BYTES if device.type == "cuda" else 0
    model = build_model(config, dtype=dtype, num_layers=num_layers, materialize=False)
    plan = plan_budget(model, budget_bytes, max_tokens=max_tokens, prefill_tokens=prefill_tokens, batch=batch,
                       device_overhead_bytes=device_overhead_bytes, max_slots=max_slots,
                       fused_attention=device.type == "cuda")
    if policy is None:
        policy = StreamingPolicy(chunk_bytes=min(chunk_bytes, plan.ring_bytes), ring_bytes=plan.ring_bytes,
                                 prefetch_depth=prefetch_depth)
    slots = policy.slots(plan.layer_bytes)
    policy.depth(slots)
    if slots * plan.layer_bytes > plan.ring_bytes:
        raise StreamingBudgetTooSmall(f"the policy's ring ({slots} slots, {slots * plan.layer_bytes / GiB:.2f} GiB) "
                                      f"exceeds the budget's ring allowance ({plan.ring_bytes / GiB:.2f} GiB)")
    layers = decoder_layers(model)
    policy.chunks_per_layer(LayerLayout.of(layers[0]).used_bytes, slots)
    n_layers = len(layers)
    n_sets = n_layers if host_sets is None else host_sets
    if n_sets > n_layers:
        raise ConfigError(f"host_sets {n_sets} > {n_layers} layers")
    fill = partial(seeded_layer_fill, seed)
    pack = pack_layer_weights(model, device=device, fill=fill, num_sets=n_sets,
                              min_free_host_bytes=min_free_host_bytes, progress=progress)
    try:
        place_resident_(model, device, seed=seed)
        return StreamedModel(model, pack, policy, device=device, layer_sets=[i % n_sets for i in range(n_layers)],
                             budget=plan, record_timeline=record_timeline, owns_pack=True)
    except BaseException:
        pack.release()
        raise


def seeded_layer_fill(seed: int, layer: nn.Module, index: int) -> None:
    """Fill decoder layer ``index`` as ``build_model(..., seed=seed)`` fills it (a
    :data:`~djinn_core.streaming.host_pack.LayerFill` with the seed bound first)."""
    init_parameters_(layer, seed, prefix=f"model.layers.{index}.")


__all__ = ["DEFAULT_CUDA_OVERHEAD_BYTES", "build_streamed_model", "place_resident_", "seeded_layer_fill"]
