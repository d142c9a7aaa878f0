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
from djinn_core.models.family import ModelFamily, register_family

if TYPE_CHECKING:
    import types

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


LLAMA = LlamaFamily()
register_family(LLAMA)
