"""Byte counts of an architecture at a dtype, from its config, without building its weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from djinn_core.models.dtypes import resolve_dtype
from djinn_core.models.family import family_of


@dataclass(frozen=True)
class ModelSizes:
    """Byte counts of an architecture at a dtype, computed from its config (no model is built)."""

    layer_weight_bytes: int
    embed_bytes: int
    head_bytes: int
    total_weight_bytes: int
    kv_bytes_per_token: int  # all layers, K and V
    hidden_bytes_per_token: int

    def kv_bytes(self, tokens: int) -> int:
        return self.kv_bytes_per_token * tokens


def model_sizes(config: PretrainedConfig, dtype: torch.dtype = torch.float16) -> ModelSizes:
    """Exact parameter and cache byte counts, from a meta-device build of the model."""
    dtype = resolve_dtype(dtype)
    family = family_of(config)
    es = torch.empty((), dtype=dtype).element_size()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layer_bytes = sum(p.numel() for p in family.decoder_layers(model)[0].parameters()) * es
    embed = model.get_input_embeddings().weight.numel() * es
    head = model.get_output_embeddings().weight.numel() * es if not config.tie_word_embeddings else 0
    total = sum(p.numel() for p in model.parameters()) * es
    num_layers, kv_heads, head_dim = family.kv_shape(config)
    kv_per_token = 2 * num_layers * kv_heads * head_dim * es
    return ModelSizes(layer_bytes, embed, head, total, kv_per_token, config.hidden_size * es)
