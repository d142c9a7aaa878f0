"""The byte layout of one decoder layer's parameters, and binding a layer's parameters to views of such bytes.

A streamed layer's parameters live in one contiguous run of bytes (in the host pack, in a ring slot), at the same
offsets for every layer of a model: :class:`LayerLayout` says where each parameter sits, and
:func:`bind_parameters` / :func:`restore_parameters` swap a layer's Parameters for ones over those bytes and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from djinn_core.errors import ConfigError
from djinn_core.validation import check_int

PARAM_ALIGNMENT = 512  # offset of each parameter inside a layer: what the CUDA caching allocator gives a tensor
LAYER_ALIGNMENT = 4096  # a layer's stride in the pack and in the ring (page-aligned DMA sources)


def round_up(n: int, a: int) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class ParamEntry:
    """One parameter of a decoder layer inside its packed bytes (``offset``, ``nbytes`` in bytes)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class LayerLayout:
    """Byte layout of one decoder layer's parameters, identical for every layer of a model.

    ``used_bytes``: end of the last parameter (the bytes copied per layer); ``stride``: bytes a layer occupies in the
    pack and in a ring slot (``used_bytes`` rounded up to :data:`LAYER_ALIGNMENT`). Parameters sit at
    :data:`PARAM_ALIGNMENT`-aligned offsets, in the layer's ``named_parameters`` order.
    """

    entries: tuple[ParamEntry, ...]
    used_bytes: int
    stride: int

    @classmethod
    def of(cls, layer: nn.Module) -> "LayerLayout":
        entries = []
        offset = 0
        for name, p in layer.named_parameters():
            offset = round_up(offset, PARAM_ALIGNMENT)
            nbytes = p.numel() * p.element_size()
            entries.append(ParamEntry(name, tuple(p.shape), p.dtype, offset, nbytes))
            offset += nbytes
        if not entries:
            raise ConfigError(f"{type(layer).__name__} has no parameters to stream")
        for name, b in layer.named_buffers():
            if b.is_meta:
                raise ConfigError(f"decoder-layer buffer {name} is on the meta device; layer buffers are not streamed")
        return cls(tuple(entries), offset, round_up(offset, LAYER_ALIGNMENT))

    @property
    def param_bytes(self) -> int:
        """Weight bytes of one layer (without alignment padding): what a bandwidth figure should count."""
        return sum(e.nbytes for e in self.entries)

    @property
    def dtype(self) -> torch.dtype:
        return self.entries[0].dtype

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def signature(self) -> tuple:
        """What two layers must share to use one ring: names, shapes, dtypes and offsets."""
        return tuple((e.name, e.shape, e.dtype, e.offset) for e in self.entries)

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of each parameter inside ``buf`` (a uint8 tensor of at least ``used_bytes``), in order."""
        return [buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]

    def chunks(self, chunk_bytes: int) -> tuple[tuple[int, int], ...]:
        """Byte ranges ``[start, stop)`` covering ``used_bytes`` in pieces of at most ``chunk_bytes``."""
        check_int("chunk_bytes", chunk_bytes, 1)
        return tuple((a, min(a + chunk_bytes, self.used_bytes)) for a in range(0, self.used_bytes, chunk_bytes))


def bind_parameters(layer: nn.Module, tensors: Sequence[torch.Tensor]) -> dict[str, nn.Parameter]:
    """Replace ``layer``'s parameters (in ``named_parameters`` order) by Parameters over ``tensors``; return the
    originals by qualified name, for :func:`restore_parameters`."""
    originals = {}
    for (name, p), t in zip(list(layer.named_parameters()), tensors):
        owner_name, _, attr = name.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        originals[name] = p
        owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
    return originals


def restore_parameters(layer: nn.Module, originals: dict[str, nn.Parameter]) -> None:
    """Put back the Parameters :func:`bind_parameters` returned (the very same objects)."""
    for name, p in originals.items():
        owner_name, _, attr = name.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        owner._parameters[attr] = p


__all__ = ["LAYER_ALIGNMENT", "PARAM_ALIGNMENT", "LayerLayout", "ParamEntry", "bind_parameters",
           "restore_parameters", "round_up"]
