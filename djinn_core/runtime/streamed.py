"""Breakpoint sessions over a model whose decoder layers stream through the weight ring.

:class:`StreamedBreakpointRuntime` is a :class:`~djinn_core.runtime.runtime.BreakpointRuntime` over the Hugging Face
model inside a :class:`~djinn_core.streaming.model.StreamedModel`: sessions run to layer L, pause, swap, resume,
fork, generate and are evicted exactly as on a resident model, because everything a session runs -- the capture, the
replay of layers ``L..``, the decode steps -- calls the decoder layers, and the streaming hooks on those layers load
each layer's weights into its ring slot just before it runs. Two things differ:

* ``run_to(L)`` loads layers ``0..L-1`` only (:meth:`StreamedModel.loads_before`; the capture hook runs before the
  streaming hook of layer L), so nothing is prefetched for a layer that does not run. A resume from L then streams
  layers ``L..n-1`` only -- continuing that pass when no other forward ran in between, else starting a pass at L --
  and the resident head (norm, LM head) costs no copy. A decode step streams every layer.
* One VRAM budget: the ring, the slab (every session's KV and checkpoint heads) and the activation headroom are
  sized together by a split policy (:class:`~djinn_core.streaming.budget_split.RingFirstSplit`) before anything is
  pinned; a budget that cannot hold the ring and one session is refused with the numbers. A session that can never
  fit in the slab gets :class:`~djinn_core.errors.AdmissionRefused` at ``run_to``; the others continue.

The resident runtime is untouched by this module: its hot paths run no code from here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from typing import Any, Callable

import torch

from djinn_core.errors import ConfigError, StreamingBudgetTooSmall
from djinn_core.memory.slab import Slab
from djinn_core.models import build_model, decoder_layers
from djinn_core.runtime.capture import Captured, capture_at
from djinn_core.runtime.runtime import BreakpointRuntime
from djinn_core.streaming.budget_split import RingFirstSplit, VramSplit
from djinn_core.streaming.builder import place_resident_, seeded_layer_fill
from djinn_core.streaming.host_pack import pack_layer_weights
from djinn_core.streaming.layout import LayerLayout
from djinn_core.streaming.model import StreamedModel
from djinn_core.streaming.plan import DEFAULT_CHUNK_BYTES, StreamingPolicy
from djinn_core.validation import check_device, check_optional_int

log = logging.getLogger(__name__)


class StreamedBreakpointRuntime(BreakpointRuntime):
    """Breakpoint sessions over ``streamed`` (a :class:`StreamedModel`), whose slab is the ``split``'s.

    Args:
        streamed: the streamed model; its ring must fit the split's ring allowance.
        split: the budget's split (:meth:`RingFirstSplit.split`); the slab gets ``split.slab_bytes``.
        owns_model: :meth:`release` also removes the streamed model (hooks, ring, pack).
        **kwargs: the :class:`BreakpointRuntime` options (``host_pool``, ``trace``, ``free_target_bytes``,
            ``eviction``); the slab comes from the split, and decode graphs are off (a graph would bake in one ring
            slot's weights).
    """

    def __init__(self, streamed: StreamedModel, split: VramSplit, *, owns_model: bool = False, **kwargs: Any):
        if not isinstance(streamed, StreamedModel) or streamed.ring is None:
            raise ConfigError("streamed must be a StreamedModel that has not been removed")
        if not isinstance(split, VramSplit):
            raise ConfigError(f"split must be a VramSplit, got {type(split).__name__}")
        if streamed.ring_bytes > split.ring_bytes:
            raise StreamingBudgetTooSmall(f"the streamed model's ring ({streamed.ring_bytes} bytes, {streamed.slots} "
                                          f"slots) exceeds the split's ring allowance ({split.ring_bytes} bytes)")
        for name in ("slab", "slab_bytes", "swap", "decode_graphs"):
            if name in kwargs:
                raise ConfigError(f"{name} is set by the streamed runtime (the slab is the VRAM split's)")
        super().__init__(streamed.model, slab=Slab(split.slab_bytes, streamed.device), decode_graphs=False, **kwargs)
        self.streamed = streamed
        self.split = split
        self._owns_model = owns_model

    def capture(self, input_ids: torch.Tensor, cache: Any, layer: int) -> Captured:
        """Prefill through layers ``0..layer-1``, loading only their weights, and capture layer ``layer``'s input."""
        with self.streamed.loads_before(layer):
            return capture_at(self.model, input_ids, cache, layer, self.parts, prepend=True)

    def prefetch_layers(self, start: int) -> None:
        """Layer ``start``'s weights (and those the prefetch depth brings with it) start streaming now, while the
        session's head and KV are being readied (:meth:`StreamedModel.prefetch`)."""
        self.streamed.prefetch(start)

    def stats(self) -> dict[str, Any]:
        """The VRAM split, the streaming counters and the slab's occupancy (bytes)."""
        return {"split": self.split.to_dict(), "streaming": self.streamed.stats(), "slab": asdict(self.slab.stats),
                "sessions": len(self.sessions), "evictions": self.evictions}

    def release(self) -> None:
        """Close every session; with ``owns_model``, also remove the streamed model (ring and pack freed)."""
        self.close_all()
        if self._owns_model:
            self.streamed.remove()


def build_streamed_runtime(
    config: Any,
    *,
    budget_bytes: int,
    split: RingFirstSplit | None = None,
    device: torch.device | str = "cuda",
    dtype: torch.dtype | str = torch.float16,
    seed: int = 0,
    num_layers: int | None = None,
    host_sets: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prefetch_depth: int | None = None,
    min_free_host_bytes: int | None = None,
    record_timeline: bool = False,
    progress: bool = True,
    **runtime_kwargs: Any,
) -> StreamedBreakpointRuntime:
    """An architecture (name or config) with seeded random weights -- bit-identical to ``build_model(config,
    seed=seed)`` -- streamed under ``budget_bytes`` of VRAM, with breakpoint sessions over it.

    The budget is split first (``split``, default :class:`RingFirstSplit`), on a ``meta`` model, before anything is
    pinned: :class:`StreamingBudgetTooSmall` with the numbers when the ring and one session do not fit. Then the pack
    is pinned and filled, the resident modules placed, the model wrapped, and the runtime made (it owns the model:
    :meth:`StreamedBreakpointRuntime.release`). ``host_sets``: layer ``i`` streams weight set ``i % host_sets``.
    """
    device = check_device(device)
    check_optional_int("host_sets", host_sets, 1)
    model = build_model(config, dtype=dtype, num_layers=num_layers, materialize=False)
    n_layers = len(decoder_layers(model))
    n_sets = n_layers if host_sets is None else host_sets
    if n_sets > n_layers:
        raise ConfigError(f"host_sets {n_sets} > {n_layers} layers")
    return streamed_runtime_over(
        model, budget_bytes=budget_bytes, split=split, device=device, chunk_bytes=chunk_bytes,
        prefetch_depth=prefetch_depth, seed=seed, layer_sets=[i % n_sets for i in range(n_layers)],
        record_timeline=record_timeline,
        pack=lambda: pack_layer_weights(model, device=device, fill=partial(seeded_layer_fill, seed), num_sets=n_sets,
                                        min_free_host_bytes=min_free_host_bytes, progress=progress),
        **runtime_kwargs)


def streamed_runtime_over(model: torch.nn.Module, *, budget_bytes: int, split: RingFirstSplit | None,
                          device: torch.device, pack: Callable[[], Any], chunk_bytes: int | None = None,
                          prefetch_depth: int | None = None, seed: int | None = None,
                          layer_sets: list[int] | None = None, record_timeline: bool = False,
                          **runtime_kwargs: Any) -> StreamedBreakpointRuntime:
    """The steps every streamed runtime takes over ``model`` (on ``meta`` or materialised): split the budget
    (:class:`StreamingBudgetTooSmall` before anything is pinned), check the policy, ``pack()`` the layer weights,
    place the resident modules (``seed`` fills those on ``meta``), wrap the model and make the runtime, which owns
    it; what was made is released when a later step fails."""
    split = RingFirstSplit() if split is None else split
    if not isinstance(split, RingFirstSplit):
        raise ConfigError(f"split must be a RingFirstSplit, got {type(split).__name__}")
    plan = split.split(model, budget_bytes, fused_attention=device.type == "cuda")
    chunk = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    policy = StreamingPolicy(chunk_bytes=min(chunk, plan.ring_bytes), ring_bytes=plan.ring_bytes,
                             prefetch_depth=prefetch_depth)
    policy.depth(plan.slots)
    policy.chunks_per_layer(LayerLayout.of(decoder_layers(model)[0]).used_bytes, plan.slots)
    weights = pack()
    if device.type == "cuda":  # what packing cached goes back before the resident modules and the slab are placed:
        torch.cuda.empty_cache()  # the split counts live tensors, and the cap leaves no room for a cached block
    try:
        place_resident_(model, device, seed=seed)
        streamed = StreamedModel(model, weights, policy, device=device, layer_sets=layer_sets, budget=plan,
                                 record_timeline=record_timeline, owns_pack=True)
    except BaseException:
        weights.release()
        raise
    try:
        return StreamedBreakpointRuntime(streamed, plan, owns_model=True, **runtime_kwargs)
    except BaseException:
        streamed.remove()
        raise

__all__ = ["StreamedBreakpointRuntime", "build_streamed_runtime", "streamed_runtime_over"]
