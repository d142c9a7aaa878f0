"""One VRAM budget for breakpoint sessions over a streamed model: the weight ring, the session slab (KV and checkpoint
heads) and the activations share it, and a named policy splits it. Nothing here allocates: the split is computed and
checked on a ``meta`` model before anything is pinned or placed on the device.

:class:`RingFirstSplit` (the default policy): the ring gets ``ring_slots`` slots of the (largest) layer stride; the
resident modules (embeddings, final norm, LM head), the activation headroom and the device overhead are set aside; the
slab gets the rest. A budget whose slab could not hold one session -- the KV of every layer for ``session_tokens``
tokens plus its checkpoint head -- is refused with :class:`~djinn_core.errors.StreamingBudgetTooSmall`, giving every
number.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from djinn_core.errors import StreamingBudgetTooSmall
from djinn_core.memory.slab import DEFAULT_ALIGNMENT
from djinn_core.models import decoder_layers, family_of
from djinn_core.streaming.layout import LayerLayout, round_up
from djinn_core.streaming.plan import MiB, activation_bytes, batched_decode_bytes, resident_param_bytes
from djinn_core.validation import check_int, check_optional_int

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VramSplit:
    """How one VRAM budget is split, in bytes. ``slots`` x ``layer_bytes`` is the ring; ``slab_bytes`` holds the
    sessions' KV and checkpoint heads; ``session_bytes`` is what one session of ``session_tokens`` tokens needs there.

    Has the attributes :class:`~djinn_core.streaming.model.StreamedModel` reads from a budget (``ring_bytes``,
    ``slots``, ``to_dict``), so a streamed model reports this split as its budget."""

    policy: str
    budget_bytes: int
    layer_bytes: int
    slots: int
    resident_bytes: int
    activation_bytes: int
    device_overhead_bytes: int
    session_tokens: int
    session_bytes: int
    slab_bytes: int

    @property
    def ring_bytes(self) -> int:
        return self.slots * self.layer_bytes

    @property
    def planned_bytes(self) -> int:
        """Everything the split assigns (at most ``budget_bytes``)."""
        return (self.ring_bytes + self.resident_bytes + self.activation_bytes + self.device_overhead_bytes
                + self.slab_bytes)

    @property
    def sessions_resident(self) -> int:
        """How many sessions of ``session_tokens`` tokens the slab holds at once (the rest wait on the host)."""
        return self.slab_bytes // self.session_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ring_bytes": self.ring_bytes, "planned_bytes": self.planned_bytes,
                "sessions_resident": self.sessions_resident}


def session_slab_bytes(config: Any, *, tokens: int, batch: int = 1, element_size: int,
                       alignment: int = DEFAULT_ALIGNMENT) -> int:
    """Slab bytes of one session of ``batch x tokens`` tokens: one aligned K/V block per layer, plus its checkpoint
    head (the hidden state and the rotary tables, each aligned)."""
    num_layers, kv_heads, head_dim = family_of(config).kv_shape(config)
    block = round_up(2 * batch * kv_heads * tokens * head_dim * element_size, alignment)
    t = batch * tokens
    head = (round_up(t * config.hidden_size * element_size, alignment)
            + 2 * round_up(t * head_dim * element_size, alignment) + round_up(t * 8, alignment))
    return num_layers * block + head


@dataclass(frozen=True, kw_only=True)
class RingFirstSplit:
    """The ring first, the session slab gets the rest. Validated at construction (ConfigError).

    ``ring_slots``: whole-layer ring slots (>= 2 overlaps copies with compute). ``session_tokens``: the KV capacity
    (prompt + new tokens, batch 1) one session must be able to hold. ``prefill_tokens``: the largest prefill the
    activation headroom is sized for (default ``session_tokens``). ``activation_headroom_bytes``: set the headroom
    instead of estimating it (:func:`~djinn_core.streaming.plan.activation_bytes`). ``decode_batch``: the most
    sessions one batched decode step runs (:func:`~djinn_core.runtime.batch.decode_batch`); the estimated headroom
    is the larger of the prefill's and that step's (:func:`~djinn_core.streaming.plan.batched_decode_bytes`, with
    every session at ``session_tokens``), since a batch's padded, GQA-repeated K/V outgrow one prefill's activations
    (an H200 run of k=64 sessions ran out of memory inside a 288 MiB headroom sized for one prefill).
    ``device_overhead_bytes``: VRAM the caller counts for the CUDA context and workspaces.
    """

    name = "ring-first"
    ring_slots: int = 4
    session_tokens: int = 2048
    prefill_tokens: int | None = None
    activation_headroom_bytes: int | None = None
    decode_batch: int = 1
    device_overhead_bytes: int = 0

    def __post_init__(self) -> None:
        check_int("ring_slots", self.ring_slots, 1)
        check_int("session_tokens", self.session_tokens, 1)
        check_optional_int("prefill_tokens", self.prefill_tokens, 1)
        check_optional_int("activation_headroom_bytes", self.activation_headroom_bytes, 0)
        check_int("decode_batch", self.decode_batch, 1)
        check_int("device_overhead_bytes", self.device_overhead_bytes, 0)

    def split(self, model: nn.Module, budget_bytes: int, *, fused_attention: bool = True) -> VramSplit:
        """Split ``budget_bytes`` for ``model`` (on ``meta`` or materialised). :class:`StreamingBudgetTooSmall`, with
        the numbers, when the slab left over cannot hold one session."""
        check_int("budget_bytes", budget_bytes, 1)
        layout = LayerLayout.of(decoder_layers(model)[0])
        config = model.config
        es = layout.element_size
        act = self.activation_headroom_bytes
        if act is None:
            act = activation_bytes(config, tokens=self.prefill_tokens or self.session_tokens, dtype=layout.dtype,
                                   fused_attention=fused_attention)
            if self.decode_batch > 1:
                act = max(act, batched_decode_bytes(config, batch=self.decode_batch,
                                                    context_tokens=self.session_tokens, dtype=layout.dtype))
        resident = resident_param_bytes(model)
        ring = self.ring_slots * layout.stride
        session = session_slab_bytes(config, tokens=self.session_tokens, element_size=es)
        fixed = ring + resident + act + self.device_overhead_bytes
        slab = (budget_bytes - fixed) // DEFAULT_ALIGNMENT * DEFAULT_ALIGNMENT
        if slab < session:
            raise StreamingBudgetTooSmall(
                f"a VRAM budget of {budget_bytes} bytes ({budget_bytes / MiB:.1f} MiB) cannot hold the weight ring "
                f"({self.ring_slots} slots x {layout.stride} bytes = {ring}), the resident modules ({resident}), "
                f"the activation headroom ({act}), the device overhead ({self.device_overhead_bytes}) and one "
                f"session's KV and checkpoint head ({session} bytes for {self.session_tokens} tokens): it needs at "
                f"least {fixed + session} bytes ({(fixed + session) / MiB:.1f} MiB); {self.name} split")
        out = VramSplit(self.name, budget_bytes, layout.stride, self.ring_slots, resident, act,
                        self.device_overhead_bytes, self.session_tokens, session, slab)
        log.info("VRAM split (%s) of %.1f MiB: ring %d x %.1f MiB, resident %.1f MiB, activations %.1f MiB, "
                 "overhead %.1f MiB, slab %.1f MiB (%d sessions of %d tokens)", self.name, budget_bytes / MiB,
                 out.slots, layout.stride / MiB, resident / MiB, act / MiB, self.device_overhead_bytes / MiB,
                 slab / MiB, out.sessions_resident, self.session_tokens)
        return out


__all__ = ["RingFirstSplit", "VramSplit", "session_slab_bytes"]
