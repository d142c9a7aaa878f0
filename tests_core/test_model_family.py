"""models/family.py: the family registry finds the adapter of every built-in architecture, a second family can be
registered and is then what the library builds over (KV geometry, decode graphs, seeded builds), and a model of no
registered family is a ConfigError that names the supported ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPTNeoXConfig

from djinn_core.errors import ConfigError
from djinn_core.models import (ARCHITECTURES, ModelFamily, architecture_config, build_model, decoder_layers,
                               families, family_of, register_family, unregister_family)
from djinn_core.models.llama import LlamaFamily
from djinn_core.runtime.decode_graphs import DecodeGraphs
from djinn_core.runtime.kv_cache import KVGeometry

pytestmark = pytest.mark.cpu


class GPTNeoXFamily(ModelFamily):
    """A second family, laid out unlike Llama: ``gpt_neox.layers``, ``gpt_neox.final_layer_norm``, ``embed_out``."""

    name = "gpt-neox-test"
    model_types = frozenset({"gpt_neox"})

    def decoder_layers(self, model):
        return model.gpt_neox.layers

    def final_norm(self, model):
        return model.gpt_neox.final_layer_norm

    def lm_head(self, model):
        return model.embed_out

    def rotary_embedding(self, model):
        return model.gpt_neox.rotary_emb

    def kv_shape(self, config):
        return config.num_hidden_layers, config.num_attention_heads, config.hidden_size // config.num_attention_heads

    def graphable_modules(self, layer):
        return []

    def rotary_function(self, model):
        return None


def _neox_config() -> GPTNeoXConfig:
    return GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=128)


@pytest.fixture
def neox_family():
    family = GPTNeoXFamily()
    register_family(family)
    yield family
    unregister_family(family.name)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_named_architecture_is_of_the_llama_family(arch):
    cfg = architecture_config(arch)
    family = family_of(cfg)
    assert isinstance(family, LlamaFamily)
    heads = cfg.num_key_value_heads
    assert family.kv_shape(cfg) == (cfg.num_hidden_layers, heads, cfg.hidden_size // cfg.num_attention_heads)


def test_llama_adapter_finds_the_parts_of_a_built_model(llama_tiny_fp32):
    model = llama_tiny_fp32
    family = family_of(model)
    assert family is family_of(model.config)
    assert family.decoder_layers(model) is model.model.layers is decoder_layers(model)
    assert family.final_norm(model) is model.model.norm
    assert family.lm_head(model) is model.lm_head
    assert family.rotary_embedding(model) is model.model.rotary_emb
    layer = model.model.layers[0]
    assert family.graphable_modules(layer) == [layer.input_layernorm, layer.post_attention_layernorm, layer.mlp]
    home, attr = family.rotary_function(model)
    assert attr == "apply_rotary_pos_emb" and home.__name__ == type(layer.self_attn).__module__


def test_build_model_rebuilds_the_rotary_tables():
    model = build_model("qwen2-tiny", dtype=torch.float32)
    rot = family_of(model).rotary_embedding(model)
    fresh = type(rot)(config=rot.config)
    assert torch.equal(rot.inv_freq, fresh.inv_freq)
    assert torch.equal(rot.original_inv_freq, fresh.original_inv_freq)


def test_an_unknown_model_is_a_config_error_naming_the_supported_families():
    with pytest.raises(ConfigError, match=r"gpt_neox.*supported: llama \(model types llama, mistral, qwen2\)"):
        family_of(_neox_config())
    with pytest.raises(ConfigError, match="not of a supported model family"):
        build_model(_neox_config())
    with pytest.raises(ConfigError, match="not of a supported model family"):
        decoder_layers(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="not of a supported model family"):
        KVGeometry.for_model(_neox_config(), batch=1, capacity=8, dtype=torch.float32)


def test_a_registered_family_is_found_and_used(neox_family):
    cfg = _neox_config()
    assert family_of(cfg) is neox_family and families()[0] is neox_family
    model = build_model(cfg, dtype=torch.float32, seed=1)  # seeded weights and rotary tables through the adapter
    assert family_of(model) is neox_family
    assert decoder_layers(model) is model.gpt_neox.layers and len(decoder_layers(model)) == 3
    rot = neox_family.rotary_embedding(model)
    assert torch.equal(rot.inv_freq, type(rot)(config=cfg).inv_freq)
    out = model(torch.randint(0, 64, (1, 5)))
    assert out.logits.shape == (1, 5, 64) and torch.isfinite(out.logits).all()
    geo = KVGeometry.for_model(cfg, batch=2, capacity=16, dtype=torch.float32)
    assert (geo.num_layers, geo.kv_heads, geo.head_dim) == (3, 4, 8)
    g = DecodeGraphs(model)
    assert g.modules == [] and g.functions == []
    assert isinstance(family_of(architecture_config("llama-tiny")), LlamaFamily)  # the others still match


def test_unregistering_removes_a_family_and_bad_registrations_are_refused():
    family = GPTNeoXFamily()
    register_family(family)
    unregister_family(family.name)
    assert family not in families()
    with pytest.raises(ConfigError, match="not of a supported model family"):
        family_of(_neox_config())
    with pytest.raises(ConfigError, match="needs a ModelFamily"):
        register_family(object())
    nameless = GPTNeoXFamily()
    nameless.name = ""
    with pytest.raises(ConfigError, match="non-empty"):
        register_family(nameless)
    with pytest.raises(TypeError):  # an adapter that leaves a part out cannot be made
        type("Partial", (ModelFamily,), {"name": "partial"})()
