"""Weight streaming: run a decoder model larger than its GPU budget by streaming layer weights through a ring buffer.

Each decoder layer's parameters are packed once, contiguously and with the same offsets for every layer, into host
memory pinned in large segments (:mod:`.host_pack`). On the GPU, a ring of ``ring_bytes // layer_bytes`` whole-layer
slots receives them on a side copy stream (:mod:`.ring`), prefetching up to ``prefetch_depth`` layers ahead of the
one computing; hooks on the model's decoder layers, installed from outside, bind each layer's parameters to its slot
(:mod:`.model`). Without CUDA the same code runs with CPU tensors and synchronous copies, so CPU tests exercise slot
rotation, chunking and parameter binding.

Modules, one job each: :mod:`.plan` (the :class:`StreamingPolicy` and the VRAM budget plan), :mod:`.layout` (a
layer's byte layout), :mod:`.host_pack` (the pinned host pack), :mod:`.ring` (the GPU ring and its copy stream),
:mod:`.model` (:class:`StreamedModel`, the per-layer hooks), :mod:`.builder` (:func:`build_streamed_model`).
Measurements and their history: ``docs/notes/streaming.md``.
"""

from djinn_core.streaming.builder import DEFAULT_CUDA_OVERHEAD_BYTES, build_streamed_model, place_resident_
from djinn_core.streaming.host_pack import DEFAULT_SEGMENT_BYTES, LayerFill, WeightPack, pack_layer_weights
from djinn_core.streaming.layout import LAYER_ALIGNMENT, PARAM_ALIGNMENT, LayerLayout, ParamEntry
from djinn_core.streaming.model import StreamedModel
from djinn_core.streaming.plan import (DEFAULT_CHUNK_BYTES, MAX_CHUNKS_PER_LAYER, MAX_RING_CHUNKS, MIN_CHUNK_BYTES,
                                       StreamingBudget, StreamingPolicy, activation_bytes, oversubscription,
                                       plan_budget)
from djinn_core.streaming.ring import WeightRing

__all__ = [
    "DEFAULT_CHUNK_BYTES", "DEFAULT_CUDA_OVERHEAD_BYTES", "DEFAULT_SEGMENT_BYTES", "LAYER_ALIGNMENT", "LayerFill",
    "LayerLayout", "MAX_CHUNKS_PER_LAYER", "MAX_RING_CHUNKS", "MIN_CHUNK_BYTES", "PARAM_ALIGNMENT", "ParamEntry",
    "StreamedModel", "StreamingBudget", "StreamingPolicy", "WeightPack", "WeightRing", "activation_bytes",
    "build_streamed_model", "oversubscription", "pack_layer_weights", "place_resident_", "plan_budget",
]
