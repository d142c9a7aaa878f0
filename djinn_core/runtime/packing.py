"""What a session's state is made of: typed swap item keys, and the packed head (hidden state + layer kwargs).

A paused checkpoint is a set of swap items: :data:`HEAD` (one slab allocation packing the hidden state and the
tensors among layer L's captured kwargs) and ``kv_keys(n)[i]`` (layer ``i``'s K/V block, whose ``index`` is the
layer). Keys are the swap engine's interned :class:`~djinn_core.memory.swap.ItemKey` s, so no name is formatted or
parsed back on a swap.
"""

from __future__ import annotations

from typing import Any

import torch

from djinn_core.memory.slab import SlabTensor
from djinn_core.memory.swap import ItemKey

HIDDEN = "hidden"  # the hidden state's name inside the packed head
_HEAD_ALIGN = 256  # bytes: every packed tensor starts on this boundary
HEAD = ItemKey("head")  # the swap item holding the packed hidden state and layer kwargs
_KV: list[ItemKey] = []


def kv_keys(num_layers: int) -> list[ItemKey]:
    """The swap item keys of the K/V blocks of layers ``0..num_layers-1``, in layer order."""
    while len(_KV) < num_layers:
        _KV.append(ItemKey("kv", len(_KV)))
    return _KV[:num_layers]


def flatten_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split layer kwargs into tensors named ``arg.<key>`` / ``arg.<key>.<i>`` and a template for the rest."""
    tensors: dict[str, torch.Tensor] = {}
    template: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "past_key_values":
            template[key] = None  # substituted by the session's own cache at replay
        elif isinstance(value, torch.Tensor):
            tensors[f"arg.{key}"] = value
            template[key] = ("tensor", f"arg.{key}")
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            names = [f"arg.{key}.{i}" for i in range(len(value))]
            tensors.update(zip(names, value))
            template[key] = ("tensors", type(value), names)
        else:
            template[key] = ("value", value)
    return tensors, template


def rebuild_kwargs(template: dict[str, Any], tensors: dict[str, torch.Tensor], cache: Any) -> dict[str, Any]:
    """The layer kwargs of :func:`flatten_kwargs`'s ``template`` over ``tensors``, with ``cache`` as the cache."""
    out: dict[str, Any] = {}
    for key, spec in template.items():
        if key == "past_key_values":
            out[key] = cache
        elif spec[0] == "tensor":
            out[key] = tensors[spec[1]]
        elif spec[0] == "tensors":
            out[key] = spec[1](tensors[n] for n in spec[2])
        else:
            out[key] = spec[1]
    return out


Layout = dict[str, tuple[int, int, tuple[int, ...], torch.dtype]]  # name -> (byte offset, nbytes, shape, dtype)


class PackedHead:
    """A checkpoint's head -- the hidden state first, then the captured layer kwargs tensors -- in one slab
    allocation (uint8), so a pause moves it as one item and a restore brings it back with one copy, before anything
    else."""

    __slots__ = ("buf", "layout")

    def __init__(self, buf: SlabTensor, layout: Layout):
        self.buf = buf
        self.layout = layout

    @staticmethod
    def plan(tensors: dict[str, torch.Tensor]) -> tuple[Layout, int]:
        """(layout, total bytes) packing ``tensors`` in order, each aligned to ``_HEAD_ALIGN`` bytes."""
        layout, off = {}, 0
        for name, t in tensors.items():
            off = -(-off // _HEAD_ALIGN) * _HEAD_ALIGN
            nbytes = t.numel() * t.element_size()
            layout[name] = (off, nbytes, tuple(t.shape), t.dtype)
            off += nbytes
        return layout, max(off, 1)

    def _slice(self, raw: torch.Tensor, name: str) -> torch.Tensor:
        off, n, shape, dtype = self.layout[name]
        return raw[off: off + n].view(dtype).view(shape)

    def view(self, name: str) -> torch.Tensor:
        """The packed tensor ``name`` (a view of the slab allocation; take it again after a slab allocation)."""
        return self._slice(self.buf.view(), name)

    def views(self) -> dict[str, torch.Tensor]:
        raw = self.buf.view()
        return {name: self._slice(raw, name) for name in self.layout}

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes
