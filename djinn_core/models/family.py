"""Model families: one adapter per family of causal LMs behind one small interface, and the registry that finds it.

Everything Djinn needs to know about a model's structure lives in its family's adapter: where the decoder layers,
the final norm, the LM head and the model-level rotary embedding are; the KV-cache geometry of a config; which parts
of a decoder layer are pure functions of their input's shape (CUDA-graph replayable); and which modeling-module
function applies the rotary embedding. The rest of the library asks :func:`family_of` once, when it builds
something over a model (a runtime, a streamed model, decode graphs, a KV cache geometry), never per step or per layer.

Adding a family is adding one file: subclass :class:`ModelFamily` and pass an instance to :func:`register_family`
(the built-in Llama-style family is in :mod:`djinn_core.models.llama`). This module imports neither torch nor
transformers, so importing it is cheap.
"""

from __future__ import annotations

import abc
import importlib
import threading
from typing import TYPE_CHECKING, Any

from djinn_core.errors import ConfigError

if TYPE_CHECKING:
    import types

    import torch
    from torch import nn


class ModelFamily(abc.ABC):
    """The adapter of one family of decoder-only causal LMs (a Hugging Face ``*ForCausalLM`` and its config).

    The accessors take the causal LM (the model a user builds or loads) and raise
    :class:`~djinn_core.errors.ConfigError` when it lacks the part asked for.
    """

    name: str = ""
    model_types: frozenset[str] = frozenset()  # the Hugging Face ``config.model_type`` values it handles

    def matches(self, model_or_config: Any) -> bool:
        """Whether this family handles ``model_or_config`` (a causal LM, or its config). Must not raise. By default:
        its config's ``model_type`` is one of :attr:`model_types`."""
        cfg = getattr(model_or_config, "config", model_or_config)
        return getattr(cfg, "model_type", None) in self.model_types

    @abc.abstractmethod
    def decoder_layers(self, model: "nn.Module") -> "nn.ModuleList":
        """The decoder layers, in forward order."""

    @abc.abstractmethod
    def final_norm(self, model: "nn.Module") -> "nn.Module":
        """The norm applied to the last layer's hidden states before the LM head."""

    @abc.abstractmethod
    def lm_head(self, model: "nn.Module") -> "nn.Module":
        """The module that maps the final hidden states to logits."""

    @abc.abstractmethod
    def rotary_embedding(self, model: "nn.Module") -> "nn.Module | None":
        """The model-level rotary embedding module (computes ``cos, sin`` once per forward), or None."""

    @abc.abstractmethod
    def kv_shape(self, config: Any) -> tuple[int, int, int]:
        """``(num_layers, kv_heads, head_dim)`` of the KV cache of a model with this config."""

    @abc.abstractmethod
    def graphable_modules(self, layer: "nn.Module") -> list["nn.Module"]:
        """The sub-modules of one decoder layer whose forward is a fixed sequence of kernels given its single
        positional input's shape (so a CUDA graph may replay it); empty when none is known to be."""

    @abc.abstractmethod
    def rotary_function(self, model: "nn.Module") -> "tuple[types.ModuleType, str] | None":
        """``(python module, attribute name)`` of the function the decoder layers' attention looks up at call time
        to apply the rotary embedding as ``fn(q, k, cos, sin) -> (q, k)``; None when there is none to replace."""

    def decode_layer_split(self, layer: "nn.Module", rotary: "tuple[types.ModuleType, str] | None"
                           ) -> "LayerSplit | None":
        """One decoder layer's decode step split around its attention (see :class:`LayerSplit`), so that all of it
        but the attention itself can replay as CUDA graphs; None (the default) when the family does not know the
        layer's forward op for op. ``rotary`` is :meth:`rotary_function`'s answer for the model."""
        return None

    def __str__(self) -> str:
        types_ = ", ".join(sorted(self.model_types))
        return f"{self.name} (model types {types_})" if types_ else self.name

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


class LayerSplit(abc.ABC):
    """A decoder layer's forward, split in three around its attention, for a decode step (a few positions):

    * ``pre(h, cos, sin, rotary) -> (q, k, v)``: the input norm, the projections and the rotary embedding;
    * ``attend(q, k, v, ctx) -> attn``: the KV cache's update and the attention over every cached position (the key
      length grows by a step each time, so this part runs eagerly);
    * ``post(attn, h) -> h'``: the output projection, the residual, the second norm, the MLP and its residual.

    ``pre`` and ``post`` are pure functions of their tensors' shapes (CUDA-graph replayable); composed, the three
    launch exactly the kernels of the layer's own forward, in its order, so the result is bitwise equal to it.
    :meth:`bind` maps the layer's forward arguments to ``(h, cos, sin, ctx)``.
    """

    @abc.abstractmethod
    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> "tuple[Any, Any, Any, Any] | None":
        """``(h, cos, sin, ctx)`` from the layer's forward arguments; None when they are not a plain decode call."""

    @abc.abstractmethod
    def pre(self, h: "torch.Tensor", cos: "torch.Tensor", sin: "torch.Tensor", rotary: Any) -> Any:
        """(q, k, v) of ``h``; ``rotary`` is the function that applies the rotary embedding."""

    @abc.abstractmethod
    def attend(self, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", ctx: Any) -> "torch.Tensor":
        """The cache update and the attention (eager)."""

    @abc.abstractmethod
    def post(self, attn: "torch.Tensor", h: "torch.Tensor") -> "torch.Tensor":
        """The layer's output from the attention's output and the layer's input ``h`` (its residual)."""

    @abc.abstractmethod
    def cache(self, ctx: Any) -> Any:
        """The KV cache that :meth:`attend` updates (from :meth:`bind`'s ``ctx``)."""

    @abc.abstractmethod
    def modules(self) -> "tuple[nn.Module, ...]":
        """Every module whose forward the parts stand in for (their hooks must send the call the eager way)."""

    @abc.abstractmethod
    def weights(self) -> tuple[int, ...]:
        """The data pointers of every parameter the graphed parts read, now (a change means a new capture)."""


_families: list[ModelFamily] = []
_lock = threading.Lock()
_builtins_loaded = False


def _load_builtins() -> None:
    """Register the built-in families on first use (their modules import nothing heavy either). The import system
    runs each module once; a thread that arrives during the import waits for it to finish."""
    global _builtins_loaded
    if not _builtins_loaded:
        importlib.import_module("djinn_core.models.llama")  # registers itself
        _builtins_loaded = True


def register_family(family: ModelFamily) -> None:
    """Add ``family`` to the registry; it is tried before the families registered earlier. A family of the same
    name is replaced."""
    _load_builtins()
    if not isinstance(family, ModelFamily):
        raise ConfigError(f"register_family needs a ModelFamily, got {type(family).__name__}")
    if not isinstance(family.name, str) or not family.name:
        raise ConfigError(f"{type(family).__name__}.name must be a non-empty str, got {family.name!r}")
    with _lock:
        _families[:] = [f for f in _families if f.name != family.name]
        _families.insert(0, family)


def unregister_family(name: str) -> None:
    """Remove the family called ``name`` from the registry (a no-op when there is none)."""
    _load_builtins()
    with _lock:
        _families[:] = [f for f in _families if f.name != name]


def families() -> tuple[ModelFamily, ...]:
    """The registered families, in the order :func:`family_of` tries them."""
    _load_builtins()
    with _lock:
        return tuple(_families)


def family_of(model_or_config: Any) -> ModelFamily:
    """The family that handles ``model_or_config`` (a causal LM or its config); :class:`ConfigError` naming the
    supported families when none does. Call it once per model, when building something over it, not per step."""
    found = families()
    for family in found:
        if family.matches(model_or_config):
            return family
    cfg = getattr(model_or_config, "config", model_or_config)
    what = type(model_or_config).__name__
    raise ConfigError(f"{what} (model_type {getattr(cfg, 'model_type', None)!r}) is not of a supported model family; "
                      f"supported: {', '.join(str(f) for f in found) or 'none'}")


def decoder_layers(model: "nn.Module") -> "nn.ModuleList":
    """The decoder layers of ``model``, through its family's adapter."""
    return family_of(model).decoder_layers(model)


def rebuild_rotary_(model: "nn.Module", device: "torch.device | str") -> None:
    """Recompute the rotary embedding's buffers (inverse frequencies) on ``device``, in place.

    They are non-persistent buffers, so a model materialised with ``to_empty`` (or left on ``meta``) holds garbage
    there; a fresh module built from the same config holds the right values, which replace them. The module object
    stays the same.
    """
    rot = family_of(model).rotary_embedding(model)
    if rot is None:
        return
    fresh = type(rot)(config=rot.config).to(device)
    for name, buf in fresh.named_buffers(recurse=False):
        setattr(rot, name, buf)
