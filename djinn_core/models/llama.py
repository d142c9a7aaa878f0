"""The Llama-style family: Hugging Face ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM``.

All three lay a model out the same way: ``model.model.layers`` (decoder layers with ``input_layernorm``,
``self_attn``, ``post_attention_layernorm`` and ``mlp``), ``model.model.norm``, ``model.model.rotary_emb`` and
``model.lm_head``; their attention modules call ``apply_rotary_pos_emb(q, k, cos, sin)`` from their modeling module.
SmolLM2 (read from its GGUF) is a ``llama`` model.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from djinn_core.errors import ConfigError
from djinn_core.models.family import LayerSplit, ModelFamily, register_family

if TYPE_CHECKING:
    import types

    import torch
    from torch import nn

# sub-modules of a decoder layer whose forward is a fixed sequence of kernels given the input's shape
GRAPHABLE = frozenset({
    "LlamaRMSNorm", "LlamaMLP", "MistralRMSNorm", "MistralMLP", "Qwen2RMSNorm", "Qwen2MLP",
})
_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp")
# attention classes whose forward calls ``apply_rotary_pos_emb(q, k, cos, sin)`` from their modeling module
GRAPHABLE_ATTENTION = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention"})
_ROTARY = "apply_rotary_pos_emb"


def _module(owner: Any, attr: str, what: str) -> "nn.Module":
    from torch import nn

    m = getattr(owner, attr, None)
    if not isinstance(m, nn.Module):
        raise ConfigError(f"{type(owner).__name__} has no {what} ({attr}): not a Llama-style causal LM")
    return m


class LlamaFamily(ModelFamily):
    """Llama, Mistral and Qwen2 causal LMs (see the module docstring)."""

    name = "llama"
    model_types = frozenset({"llama", "mistral", "qwen2"})

    def decoder_layers(self, model: "nn.Module") -> "nn.ModuleList":
        from torch import nn

        layers = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"{type(model).__name__} is not a Llama-family decoder-only model (no model.layers)")
        return layers

    def final_norm(self, model: "nn.Module") -> "nn.Module":
        return _module(_module(model, "model", "decoder"), "norm", "final norm")

    def lm_head(self, model: "nn.Module") -> "nn.Module":
        return _module(model, "lm_head", "LM head")

    def rotary_embedding(self, model: "nn.Module") -> "nn.Module | None":
        from torch import nn

        rot = getattr(getattr(model, "model", None), "rotary_emb", None)
        return rot if isinstance(rot, nn.Module) else None

    def kv_shape(self, config: Any) -> tuple[int, int, int]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return config.num_hidden_layers, kv_heads, head_dim

    def graphable_modules(self, layer: "nn.Module") -> list["nn.Module"]:
        parts = (getattr(layer, part, None) for part in _LAYER_PARTS)
        return [m for m in parts if type(m).__name__ in GRAPHABLE]

    def rotary_function(self, model: "nn.Module") -> "tuple[types.ModuleType, str] | None":
        for layer in self.decoder_layers(model):
            attn = getattr(layer, "self_attn", None)
            if type(attn).__name__ in GRAPHABLE_ATTENTION:
                home = sys.modules.get(type(attn).__module__)
                if callable(getattr(home, _ROTARY, None)):
                    return home, _ROTARY
        return None

    def decode_layer_split(self, layer: "nn.Module", rotary: "tuple[types.ModuleType, str] | None"
                           ) -> "LayerSplit | None":
        if rotary is None or rotary[0] is None:
            return None
        return LlamaLayerSplit.of(layer, rotary[0])


# decoder layer classes whose forward LlamaLayerSplit follows op for op (transformers 5.x): the layer -> its attention,
# norm and MLP classes, and where its attention reads the sliding window it hands the attention function (Mistral:
# its config's, if any; Qwen2: its own attribute; Llama hands none)
SPLIT_LAYERS = {
    "LlamaDecoderLayer": ("LlamaAttention", "LlamaRMSNorm", "LlamaMLP", None),
    "MistralDecoderLayer": ("MistralAttention", "MistralRMSNorm", "MistralMLP", "config"),
    "Qwen2DecoderLayer": ("Qwen2Attention", "Qwen2RMSNorm", "Qwen2MLP", "attention"),
}
_ATTN_ARGS = ("attention_mask", "position_embeddings", "past_key_values", "position_ids", "use_cache")


class LlamaLayerSplit(LayerSplit):
    """``LlamaDecoderLayer.forward`` (with ``LlamaAttention.forward``), and Mistral's and Qwen2's, which differ only
    in the sliding window their attention hands its attention function, in three parts: see :class:`LayerSplit`.

    Each part makes the calls the layer's own forward makes, in its order and on the same modules, so the composition
    launches the same kernels. The attention function is looked up per call, as ``LlamaAttention.forward`` does."""

    def __init__(self, layer: "nn.Module", home: "types.ModuleType", window: str | None = None):
        self.layer = layer
        self.window = window
        self.attn = layer.self_attn
        self.norm1, self.norm2, self.mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
        self.home = home
        self._modules = tuple(layer.modules())
        self._slots = tuple((m._parameters, name) for m in self._modules for name, p in m._parameters.items()
                            if p is not None)

    @classmethod
    def of(cls, layer: "nn.Module", home: "types.ModuleType") -> "LlamaLayerSplit | None":
        """The split of ``layer``, or None unless its classes are the ones it follows (:data:`SPLIT_LAYERS`) and
        ``home`` (their modeling module) has the attention-function registry the attention looks up."""
        want = SPLIT_LAYERS.get(type(layer).__name__)
        parts = (getattr(layer, "self_attn", None), getattr(layer, "input_layernorm", None),
                 getattr(layer, "mlp", None))
        if want is None or tuple(type(p).__name__ for p in parts) != want[:3]:
            return None
        if type(getattr(layer, "post_attention_layernorm", None)).__name__ != want[1]:
            return None
        if not (hasattr(home, "ALL_ATTENTION_FUNCTIONS") and callable(getattr(home, "eager_attention_forward", None))):
            return None
        return cls(layer, home, want[3])

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> "tuple[Any, Any, Any, Any] | None":
        if len(args) == 1:
            h = args[0]
        elif not args and "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            h = kwargs.pop("hidden_states")
        else:
            return None
        pe, cache = kwargs.get("position_embeddings"), kwargs.get("past_key_values")
        if pe is None or cache is None or len(pe) != 2:
            return None
        # what LlamaDecoderLayer hands its attention, and the attention its attention function, besides the tensors
        extra = {k: v for k, v in kwargs.items() if k not in _ATTN_ARGS}
        extra["position_ids"] = kwargs.get("position_ids")
        extra["use_cache"] = kwargs.get("use_cache", False)
        return h, pe[0], pe[1], (kwargs.get("attention_mask"), cache, extra)

    def pre(self, h: "torch.Tensor", cos: "torch.Tensor", sin: "torch.Tensor", rotary: Any) -> Any:
        attn = self.attn
        x = type(self.norm1).forward(self.norm1, h)
        hidden_shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(x).view(hidden_shape).transpose(1, 2)
        k = attn.k_proj(x).view(hidden_shape).transpose(1, 2)
        v = attn.v_proj(x).view(hidden_shape).transpose(1, 2)
        q, k = rotary(q, k, cos, sin)
        return q, k, v

    def attend(self, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", ctx: Any) -> "torch.Tensor":
        mask, cache, extra = ctx
        attn = self.attn
        k, v = cache.update(k, v, attn.layer_idx)
        fn = self.home.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                             self.home.eager_attention_forward)
        dropout = 0.0 if not attn.training else attn.attention_dropout
        if self.window is None:
            out, _ = fn(attn, q, k, v, mask, dropout=dropout, scaling=attn.scaling, **extra)
        else:
            window = attn.sliding_window if self.window == "attention" else getattr(attn.config, "sliding_window", None)
            out, _ = fn(attn, q, k, v, mask, dropout=dropout, scaling=attn.scaling, sliding_window=window, **extra)
        return out

    def post(self, attn_out: "torch.Tensor", h: "torch.Tensor") -> "torch.Tensor":
        a = self.attn.o_proj(attn_out.reshape(*h.shape[:-1], -1).contiguous())
        h = h + a
        x = type(self.norm2).forward(self.norm2, h)
        return h + type(self.mlp).forward(self.mlp, x)

    def cache(self, ctx: Any) -> Any:
        return ctx[1]

    def modules(self) -> "tuple[nn.Module, ...]":
        return self._modules

    def weights(self) -> tuple[int, ...]:
        return tuple(-1 if (p := d.get(name)) is None else p.data_ptr() for d, name in self._slots)


LLAMA = LlamaFamily()
register_family(LLAMA)
