"""The streaming policy (chunk size, ring size, prefetch depth) and the VRAM budget plan, in bytes. Nothing here
allocates: these checks run before anything is pinned or placed on the device.

Budget (:func:`plan_budget`): ring + resident (embeddings, head, final norm) + KV cache + activation headroom +
``device_overhead_bytes`` (CUDA context and anything else the caller counts) must fit ``budget_bytes``; a budget
without room for one slot raises :class:`~djinn_core.errors.StreamingBudgetTooSmall`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from djinn_core.errors import ConfigError, StreamingBudgetTooSmall
from djinn_core.models import decoder_layers, resolve_dtype
from djinn_core.streaming.layout import LayerLayout
from djinn_core.validation import check_int, check_optional_int

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
DEFAULT_CHUNK_BYTES = 64 * MiB
# NOTE: every chunk of every ring slot gets a tensor view and an event when the ring is built, so the chunk count is
# bounded: a 1-byte chunk once made a tiny model's ring allocate without bound. The floor is one page (smaller
# copies are all launch overhead); the CPU tests stream with chunks down to 4 KiB (145 per tiny layer, 290 per ring)
# and the GPU sweeps with 16..512 MiB (a 1.6 GiB Llama-2-70B layer in 16 MiB chunks is 102 per layer, 408 over its
# 4 slots), both far inside the bounds.
MIN_CHUNK_BYTES = 4 * KiB
MAX_CHUNKS_PER_LAYER = 4096
MAX_RING_CHUNKS = 16384  # chunks over all slots of the ring


def check_chunk_bytes(chunk_bytes: Any) -> int:
    check_int("chunk_bytes", chunk_bytes, 1)
    if chunk_bytes < MIN_CHUNK_BYTES:
        raise ConfigError(f"chunk_bytes={chunk_bytes} is below the floor of {MIN_CHUNK_BYTES} bytes "
                          f"(MIN_CHUNK_BYTES): each chunk is one copy and one event per ring slot")
    return chunk_bytes


@dataclass(frozen=True, kw_only=True)
class StreamingPolicy:
    """How weights are streamed. Validated at construction (:class:`~djinn_core.errors.ConfigError`).

    ``chunk_bytes``: copy granularity inside a layer (one ``copy_`` and one CUDA event per chunk), at least
    :data:`MIN_CHUNK_BYTES`.
    ``ring_bytes``: GPU bytes for weights in flight; the ring holds ``ring_bytes // layer_bytes`` whole-layer slots.
    ``prefetch_depth``: how many layers ahead of the computing one have their copies issued; ``None`` is as deep as the
    ring allows (``slots - 1``); it must be ``<= slots - 1`` (checked when the layer size is known).
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ring_bytes: int
    prefetch_depth: int | None = None

    def __post_init__(self) -> None:
        check_chunk_bytes(self.chunk_bytes)
        check_int("ring_bytes", self.ring_bytes, 1)
        if self.ring_bytes < self.chunk_bytes:
            raise ConfigError(f"ring_bytes ({self.ring_bytes}) is smaller than one chunk ({self.chunk_bytes} bytes): "
                              "the ring must hold at least one whole layer, and a layer at least one chunk")
        check_optional_int("prefetch_depth", self.prefetch_depth, 0)

    def slots(self, layer_bytes: int) -> int:
        """Whole-layer ring slots for layers of ``layer_bytes``; a ring smaller than one layer is a ConfigError."""
        k = self.ring_bytes // check_int("layer_bytes", layer_bytes, 1)
        if k < 1:
            raise ConfigError(f"ring_bytes ({self.ring_bytes}) cannot hold one layer ({layer_bytes} bytes); "
                              "one slot streams without overlap, overlap needs >= 2 slots")
        return k

    def depth(self, slots: int) -> int:
        """The prefetch depth used with ``slots`` ring slots (``slots - 1`` unless set lower)."""
        if self.prefetch_depth is None:
            return slots - 1
        if self.prefetch_depth > slots - 1:
            raise ConfigError(f"prefetch_depth {self.prefetch_depth} needs {self.prefetch_depth + 1} ring slots; the "
                              f"ring has {slots} (a load may only reuse a slot whose layer has been computed)")
        return self.prefetch_depth

    def chunks_per_layer(self, layer_used_bytes: int, slots: int) -> int:
        """Chunks per layer for layers of ``layer_used_bytes`` over ``slots`` slots; a ConfigError giving the numbers
        when a layer would be more than :data:`MAX_CHUNKS_PER_LAYER` chunks or the ring more than
        :data:`MAX_RING_CHUNKS`."""
        per_layer = -(-check_int("layer_used_bytes", layer_used_bytes, 1) // self.chunk_bytes)
        check_int("slots", slots, 1)
        if per_layer > MAX_CHUNKS_PER_LAYER or per_layer * slots > MAX_RING_CHUNKS:
            cap = min(MAX_CHUNKS_PER_LAYER, MAX_RING_CHUNKS // slots)  # the most chunks per layer allowed here
            fix = (f"use chunks of at least {max(-(-layer_used_bytes // cap), MIN_CHUNK_BYTES)} bytes, or fewer "
                   "slots (a smaller ring_bytes, or max_slots)" if cap else
                   "use fewer slots (a smaller ring_bytes, or max_slots)")
            raise ConfigError(
                f"chunk_bytes={self.chunk_bytes} cuts a layer of {layer_used_bytes} bytes into {per_layer} chunks, "
                f"{per_layer * slots} over the ring's {slots} slots; the bounds are {MAX_CHUNKS_PER_LAYER} chunks "
                f"per layer (MAX_CHUNKS_PER_LAYER) and {MAX_RING_CHUNKS} per ring (MAX_RING_CHUNKS): {fix}")
        return per_layer


@dataclass(frozen=True)
class StreamingBudget:
    """A VRAM plan for streaming, in bytes: what stays resident and how many ring slots fit beside it."""

    budget_bytes: int
    layer_bytes: int  # one ring slot (a layer's packed stride)
    resident_bytes: int  # embeddings, head, final norm: stay on the device
    kv_bytes: int  # KV cache for batch x max_tokens, all layers, plus one layer's growth transient
    activation_bytes: int  # conservative estimate for the largest prefill (see activation_bytes())
    device_overhead_bytes: int  # counted by the caller: CUDA context, workspaces
    slots: int

    @property
    def ring_bytes(self) -> int:
        return self.slots * self.layer_bytes

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.activation_bytes + self.device_overhead_bytes

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + self.ring_bytes

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "ring_bytes": self.ring_bytes, "planned_bytes": self.planned_bytes}


def _shape(config: Any) -> tuple[int, int, int, int, int, int]:
    """(hidden, intermediate, vocabulary, query heads, key/value heads, head dim) of a Llama-family config."""
    nh = config.num_attention_heads
    kvh = getattr(config, "num_key_value_heads", None) or nh
    hd = getattr(config, "head_dim", None) or config.hidden_size // nh
    return config.hidden_size, config.intermediate_size, config.vocab_size, nh, kvh, hd


def _estimate(parts: tuple[int, ...], stream: int) -> int:
    """The residual stream plus the largest of ``parts``, times 1.25, plus 64 MiB for allocator rounding."""
    return int(1.25 * (stream + max(parts))) + 64 * MiB


def activation_bytes(config: Any, *, tokens: int, batch: int = 1, dtype: torch.dtype | str = torch.float16,
                     fused_attention: bool = True) -> int:
    """A conservative estimate of the activation bytes of one Llama-family forward over ``batch x tokens``.

    Residual stream and RMSNorm fp32 temporaries, plus the largest of: attention (q/k/v before and after rotary, the
    GQA repeat of k/v, the output; with ``fused_attention=False`` also the explicit scores and fp32 softmax), the MLP
    (gate, up and their product), the head (logits and an fp32 copy). Times 1.25 plus 64 MiB for allocator rounding.
    """
    es = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    check_int("tokens", tokens, 1)
    check_int("batch", batch, 1)
    h, inter, vocab, nh, kvh, hd = _shape(config)
    t = tokens * batch
    stream = 4 * t * h * es + 3 * t * h * 4
    attn = 2 * t * (nh + 2 * kvh) * hd * es + 2 * t * nh * hd * es + t * nh * hd * es
    if not fused_attention:
        attn += batch * nh * tokens * tokens * (es + 4)
    mlp = 3 * t * inter * es
    head = t * vocab * (es + 4)
    return _estimate((attn, mlp, head), stream)


def batched_decode_bytes(config: Any, *, batch: int, context_tokens: int,
                         dtype: torch.dtype | str = torch.float16) -> int:
    """A conservative estimate of the activation bytes of one batched decode step of ``batch`` sessions whose longest
    holds ``context_tokens`` (:func:`~djinn_core.runtime.batch.decode_batch`), per layer at its peak.

    The step gathers each layer's K and V into a left-padded ``(batch, kv_heads, M + 1, head_dim)`` pair, and
    attention with a padding mask repeats them to every query head (GQA's ``repeat_kv``): at k=64 sessions of 528
    tokens of Llama-2-70B that is 1.1 GB a layer, where one session's 2048-token prefill needs 0.3 GB. Plus the
    additive mask, the residual stream, the MLP of ``batch`` tokens and the head's logits (and an fp32 copy); times
    1.25 plus 64 MiB for allocator rounding, as :func:`activation_bytes`."""
    es = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    check_int("batch", batch, 1)
    check_int("context_tokens", context_tokens, 1)
    h, inter, vocab, nh, kvh, hd = _shape(config)
    m = context_tokens + 1
    kv = 2 * batch * kvh * m * hd * es  # the padded K and V of one layer
    repeat = 2 * batch * nh * m * hd * es if kvh != nh else 0  # repeat_kv's copies for the query heads
    mask = batch * m * 4
    attn = kv + repeat + mask + 4 * batch * nh * hd * es
    stream = 4 * batch * h * es + 3 * batch * h * 4
    mlp = 3 * batch * inter * es
    head = batch * vocab * (es + 4)
    return _estimate((attn, mlp, head), stream)


def _kv_bytes(config: Any, *, tokens: int, batch: int, es: int) -> int:
    _, _, _, _, kvh, hd = _shape(config)
    per_layer = 2 * kvh * hd * es * tokens * batch  # (batch, kv_heads, tokens, head_dim), K and V
    return per_layer * (config.num_hidden_layers + 1)  # + one layer's transient while a DynamicCache grows


def resident_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module outside the decoder layers that directly owns tensors."""
    layer_ids = {id(m) for m in decoder_layers(model).modules()}
    out = []
    for name, mod in model.named_modules():
        if id(mod) in layer_ids:
            continue
        if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
            out.append((name, mod))
    return out


def resident_param_bytes(model: nn.Module) -> int:
    """Parameter bytes outside the decoder layers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for _, mod in resident_modules(model):
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def plan_budget(
    model: nn.Module,
    budget_bytes: int,
    *,
    max_tokens: int,
    prefill_tokens: int | None = None,
    batch: int = 1,
    device_overhead_bytes: int = 0,
    max_slots: int | None = None,
    fused_attention: bool = True,
) -> StreamingBudget:
    """Plan a VRAM budget for streaming ``model`` (meta or materialised): as many ring slots as fit.

    Raises :class:`StreamingBudgetTooSmall` (a ConfigError) when not even one slot fits beside the resident weights,
    a KV cache of ``batch x max_tokens``, the activations of a ``prefill_tokens`` (default ``max_tokens``) prefill and
    ``device_overhead_bytes``. Nothing is allocated.
    """
    check_int("budget_bytes", budget_bytes, 1)
    check_int("max_tokens", max_tokens, 1)
    check_optional_int("prefill_tokens", prefill_tokens, 1)
    check_int("batch", batch, 1)
    check_int("device_overhead_bytes", device_overhead_bytes, 0)
    check_optional_int("max_slots", max_slots, 1)
    layout = LayerLayout.of(decoder_layers(model)[0])
    config = model.config
    kv = _kv_bytes(config, tokens=max_tokens, batch=batch, es=layout.element_size)
    act = activation_bytes(config, tokens=prefill_tokens or max_tokens, batch=batch, dtype=layout.dtype,
                           fused_attention=fused_attention)
    resident = resident_param_bytes(model)
    fixed = resident + kv + act + device_overhead_bytes
    slots = max(0, budget_bytes - fixed) // layout.stride
    if max_slots is not None:
        slots = min(slots, max_slots)
    if slots < 1:
        raise StreamingBudgetTooSmall(
            f"a VRAM budget of {budget_bytes / GiB:.2f} GiB cannot hold one layer ({layout.stride / GiB:.3f} GiB) "
            f"plus resident weights {resident / GiB:.3f} GiB, KV cache {kv / GiB:.3f} GiB "
            f"({batch}x{max_tokens} tokens), activations {act / GiB:.3f} GiB and device overhead "
            f"{device_overhead_bytes / GiB:.3f} GiB; it needs at least {(fixed + layout.stride) / GiB:.2f} GiB "
            f"(>= 2 slots, {(fixed + 2 * layout.stride) / GiB:.2f} GiB, to overlap copies with compute)")
    plan = StreamingBudget(budget_bytes, layout.stride, resident, kv, act, device_overhead_bytes, slots)
    log.info("streaming budget %.2f GiB: %d ring slots of %.3f GiB, resident %.3f, KV %.3f, activations %.3f, "
             "device overhead %.3f GiB", budget_bytes / GiB, slots, layout.stride / GiB, resident / GiB, kv / GiB,
             act / GiB, device_overhead_bytes / GiB)
    return plan


def oversubscription(model_weight_bytes: int, budget_bytes: int) -> float:
    """How many times the model's weights exceed the VRAM budget."""
    return check_int("model_weight_bytes", model_weight_bytes, 1) / check_int("budget_bytes", budget_bytes, 1)


__all__ = ["DEFAULT_CHUNK_BYTES", "MAX_CHUNKS_PER_LAYER", "MAX_RING_CHUNKS", "MIN_CHUNK_BYTES", "StreamingBudget",
           "StreamingPolicy", "activation_bytes", "oversubscription", "plan_budget", "resident_modules",
           "resident_param_bytes"]
