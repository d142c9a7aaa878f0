"""Named architectures: published hyper-parameters (the models' ``config.json`` values) to build with random weights.

Importing this module is cheap (no torch, no transformers): the command line lists :data:`ARCHITECTURES` from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from djinn_core.errors import ConfigError
from djinn_core.validation import check_optional_int

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Random weights, real shapes.
ARCHITECTURES: dict[str, dict] = {
    "llama-tiny": dict(
        model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "mistral-tiny": dict(
        model_type="mistral", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
        sliding_window=None,
    ),
    "qwen2-tiny": dict(
        model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        use_sliding_window=False,
    ),
    "llama2-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "llama2-13b": dict(
        model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "llama2-70b": dict(
        model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
}


def architecture_config(name: str, num_layers: int | None = None, attn_implementation: str = "sdpa") -> "PretrainedConfig":
    """The config of a named architecture (see :data:`ARCHITECTURES`), optionally truncated to ``num_layers``."""
    from transformers import AutoConfig

    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    params = dict(ARCHITECTURES[name])
    model_type = params.pop("model_type")
    if check_optional_int("num_layers", num_layers, minimum=1) is not None:
        params["num_hidden_layers"] = num_layers
    cfg = AutoConfig.for_model(model_type, **params)
    cfg._attn_implementation = attn_implementation
    cfg.use_cache = True
    return cfg
