"""Weight dtypes by name."""

from __future__ import annotations

import torch

from djinn_core.errors import ConfigError

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
