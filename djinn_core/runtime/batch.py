"""Batched decode across sessions: one greedy token for each of k decoding sessions, with one forward -- so over a
streamed model, one weight pass -- for all of them. Each session keeps its own KV blocks and position; sessions at
different lengths join and leave between steps.

The step's forward is the model's own, on a batch of ``k`` last tokens (``(k, 1)``) with a left-padded view of the
sessions' caches (:class:`BatchedKVCache`): at each layer every session's new K/V is written into its own slab block
(:meth:`SlabKVLayer.update <djinn_core.runtime.kv_cache.SlabKVLayer.update>`: copy-on-write, restore waits and
capacity checks included), then its ``l_i + 1`` keys and values are copied right-aligned into a zeroed ``(k,
kv_heads, M + 1, head_dim)`` buffer, ``M = max l_i``; a 2-D attention mask hides the padding and each session's
position id is its own length. So "bitwise at the same batch composition" means: equal to the plain Hugging Face
forward of the same ``(k, 1)`` tokens over a ``DynamicCache`` holding the same sessions' K/V left-padded with zeros
to ``M``, with that attention mask and those position ids
(:func:`~djinn_core.bench.experiments.exp4_streamed_sessions.padded_step_reference`). It is *not* bitwise equal to
each session decoded alone in general: a batch of ``k`` rows (and the padding) changes GEMM and attention shapes, so
kernels may sum in another order.

Streams: everything on the current stream of the model's device; nothing synchronises (the step's small host
tensors go up through pinned memory), so a loop of steps queues the next behind the running one.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from djinn_core.errors import AdmissionRefused, CacheCapacityExceeded, CheckpointStateError, ConfigError
from djinn_core.models import exact_attention
from djinn_core.runtime.checkpoint import SessionState

if TYPE_CHECKING:
    from djinn_core.runtime.kv_cache import SlabKVCache
    from djinn_core.runtime.runtime import BreakpointRuntime
    from djinn_core.runtime.session import BreakpointSession

log = logging.getLogger(__name__)


class _BatchLayer(DynamicLayer):
    """Layer ``layer_idx`` of :class:`BatchedKVCache`: writes each row's new K/V into its session's block and
    returns the left-padded batch of K and V."""

    is_sliding = False

    def __init__(self, batch: "BatchedKVCache", layer_idx: int):
        super().__init__()
        self._batch = batch
        self.layer_idx = layer_idx
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """``key_states``/``value_states`` (k, kv_heads, s, head_dim); returns K and V (k, kv_heads, M + s,
        head_dim), each session's tokens right-aligned, zeros before them."""
        past = self._batch.past
        k, kvh, s, hd = key_states.shape
        keys = key_states.new_zeros((k, kvh, past + s, hd))
        values = value_states.new_zeros((k, kvh, past + s, hd))
        for i, cache in enumerate(self._batch.caches):
            ki, vi = cache.layers[self.layer_idx].update(key_states[i:i + 1], value_states[i:i + 1])
            n = ki.shape[2]  # (1, kv_heads, l_i + s, head_dim)
            keys[i, :, past + s - n:].copy_(ki[0])
            values[i, :, past + s - n:].copy_(vi[0])
        return keys, values

    def get_seq_length(self) -> int:
        return self._batch.past

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._batch.past + query_length, 0

    def reset(self) -> None:
        raise CheckpointStateError("a BatchedKVCache is a view for one step; reset the sessions' caches instead")

    def crop(self, tokens_to_remove: int) -> None:
        raise CheckpointStateError("a BatchedKVCache does not crop")


class BatchedKVCache(Cache):
    """One decode step's view of ``caches`` (batch 1 each, ``lengths`` tokens each) as a left-padded batch."""

    def __init__(self, caches: Sequence["SlabKVCache"], lengths: Sequence[int]):
        self.caches = list(caches)
        self.past = max(lengths)
        super().__init__(layers=[_BatchLayer(self, i) for i in range(caches[0].geometry.num_layers)])


def padding_mask(lengths: Sequence[int], new: int, device: torch.device) -> torch.Tensor:
    """(k, max(lengths) + new) int64: 0 over each row's left padding, 1 over its tokens and the ``new`` ones."""
    past = max(lengths)
    cols = torch.arange(past + new)
    return to_device((cols[None, :] >= torch.tensor([past - n for n in lengths])[:, None]).long(), device)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (a small host tensor) on ``device`` without making the host wait for the device: on CUDA through pinned
    memory and a non-blocking copy (a plain ``.to(cuda)`` of pageable memory synchronises the stream, so a decode
    loop could never queue its next step behind the running one)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def decode_batch(runtime: "BreakpointRuntime", sessions: Sequence["BreakpointSession"], *,
                 return_logits: bool = False):
    """One greedy token (a (1, 1) tensor) for each of ``sessions``, in order, as ``session.generate(1)`` would give;
    with ``return_logits`` also the (1, vocab) logits that chose each.

    Every session must be decoding (RUNNING, or SWAPPED: brought back first), batch 1, with a token left in its
    ``max_new_tokens``. A session whose resume logits are not consumed yet takes its token from them; the others
    feed their last token through one batched forward. While the step runs no member of the batch is evicted; its
    swapped members need room next to the resident ones (:class:`~djinn_core.errors.SlabExhausted` when only busy
    sessions stand in the way, :class:`AdmissionRefused` when the batch can never be resident at once). Every check
    runs before anything changes.
    """
    sessions = list(sessions)
    if not sessions:
        return ([], []) if return_logits else []
    if len({id(s) for s in sessions}) != len(sessions):
        raise ConfigError("a session appears twice in the batch")
    for s in sessions:
        if s.runtime is not runtime:
            raise ConfigError(f"session {s.id} belongs to another runtime")
        if s.state not in (SessionState.RUNNING, SessionState.SWAPPED):
            raise CheckpointStateError(f"session {s.id} is {s.state.value}; a batched decode step needs decoding "
                                       "sessions (resume first)")
        if s.input_ids.shape[0] != 1:
            raise ConfigError(f"session {s.id} has batch {s.input_ids.shape[0]}; batched decode takes batch-1 "
                              "sessions")
        done = sum(t.shape[1] for t in s.generated)
        if done + 1 > s.max_new_tokens:
            raise CacheCapacityExceeded(f"session {s.id}: {done} + 1 tokens exceed max_new_tokens="
                                        f"{s.max_new_tokens}")
    slab, res = runtime.slab, runtime.residency
    need = sum(s.swapped.slab_bytes() if s.swapped is not None else s.slab_bytes() for s in sessions)
    if need > slab.capacity:
        raise AdmissionRefused(f"a batch of {len(sessions)} sessions needs {need} slab bytes resident at once; the "
                               f"whole slab holds {slab.capacity}")
    with contextlib.ExitStack() as stack:
        for s in sessions:  # NOTE: busy members are never evicted to make room for the others
            stack.enter_context(res.in_use(s))
        for s in sessions:
            if s.state is SessionState.SWAPPED:
                s._swap_in_decoding()
        out: list[torch.Tensor | None] = [None] * len(sessions)
        chose: list[torch.Tensor | None] = [None] * len(sessions)
        fed = []
        for i, s in enumerate(sessions):
            if s._next_logits is not None:  # resume logits not consumed: the token comes from them
                chose[i] = s._next_logits
                out[i] = s._next_logits.argmax(-1, keepdim=True)
                s._next_logits = None
            else:
                fed.append(i)
        if fed:
            members = [sessions[i] for i in fed]
            lengths = [s.cache.layers[0].length for s in members]
            tokens = torch.cat([s.generated[-1][:, -1:] for s in members])  # (k, 1)
            cache = BatchedKVCache([s.cache for s in members], lengths)
            with torch.inference_mode(), exact_attention():
                logits = runtime.model(tokens, attention_mask=padding_mask(lengths, 1, runtime.device),
                                       position_ids=to_device(torch.tensor(lengths), runtime.device)[:, None],
                                       past_key_values=cache, use_cache=True).logits[:, -1]  # (k, vocab)
            picked = logits.argmax(-1, keepdim=True)  # (k, 1)
            for row, i in enumerate(fed):
                out[i] = picked[row:row + 1]
                chose[i] = logits[row:row + 1]
        for s, tok in zip(sessions, out):
            s.generated.append(tok)
    return (out, chose) if return_logits else out


__all__ = ["BatchedKVCache", "decode_batch", "padding_mask", "to_device"]
