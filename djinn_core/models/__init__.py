"""Models: model-family adapters, named architectures with seeded random weights, and the one real small model.

One module per job: :mod:`~djinn_core.models.family` (the adapter interface and registry; :mod:`.llama` is the
Llama/Mistral/Qwen2 adapter), :mod:`.architectures` (named configs), :mod:`.builder` (seeded random weights),
:mod:`.sizes` (byte counts), :mod:`.gguf_loader` (GGUF files, SmolLM2), :mod:`.attention` (:class:`exact_attention`),
:mod:`.dtypes`.

Names are re-exported here lazily, so ``from djinn_core.models import ARCHITECTURES`` or ``family_of`` imports
neither torch nor transformers; the names that need them import them on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from djinn_core.models.family import (
    ModelFamily,
    decoder_layers,
    families,
    family_of,
    rebuild_rotary_,
    register_family,
    unregister_family,
)

if TYPE_CHECKING:  # what __getattr__ below imports on first access, for type checkers and editors
    from djinn_core.models.architectures import ARCHITECTURES, architecture_config
    from djinn_core.models.attention import exact_attention
    from djinn_core.models.builder import build_model, init_parameters_
    from djinn_core.models.dtypes import resolve_dtype
    from djinn_core.models.gguf_loader import SMOLLM2_PACKAGE, load_gguf, load_smollm2, smollm2_gguf_path
    from djinn_core.models.llama import LlamaFamily
    from djinn_core.models.sizes import ModelSizes, model_sizes

_LAZY = {
    "ARCHITECTURES": "architectures", "architecture_config": "architectures",
    "resolve_dtype": "dtypes",
    "ModelSizes": "sizes", "model_sizes": "sizes",
    "build_model": "builder", "init_parameters_": "builder",
    "SMOLLM2_PACKAGE": "gguf_loader", "smollm2_gguf_path": "gguf_loader", "load_gguf": "gguf_loader",
    "load_smollm2": "gguf_loader",
    "exact_attention": "attention",
    "LlamaFamily": "llama",
}

__all__ = ["ModelFamily", "decoder_layers", "families", "family_of", "rebuild_rotary_", "register_family",
           "unregister_family", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
