"""Seeded random weights: build a causal LM from a config on ``meta`` and materialise it on its device.

Nothing here downloads anything. A model is built on the ``meta`` device and materialised directly on the target
device (no CPU detour for a GPU model); every parameter is drawn from a generator seeded by the model seed and the
parameter's qualified name, so the same (seed, name, device type) always gives the same tensor, whichever order or
subset of modules is materialised. That is what lets a streamed model and a resident one hold identical weights.
"""

from __future__ import annotations

import hashlib
import logging
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from djinn_core.errors import ConfigError
from djinn_core.models.architectures import architecture_config
from djinn_core.models.dtypes import resolve_dtype
from djinn_core.models.family import family_of, rebuild_rotary_
from djinn_core.validation import check_device, check_int, check_optional_int

log = logging.getLogger(__name__)


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
                # NOTE: CPU normal_ has no half kernel on every build: draw in fp32 then cast (deterministic too)
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g))
            else:
                p.normal_(0.0, std, generator=g)
    return module


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
    ``meta`` (for a caller that materialises layer by layer, e.g. into pinned host memory). The config must be of a
    registered model family (:func:`~djinn_core.models.family.family_of`); ``device='cuda'`` on a machine without a
    GPU is :class:`~djinn_core.errors.DeviceUnavailable`.
    """
    if isinstance(config, str):
        config = architecture_config(config, num_layers=num_layers)
    elif check_optional_int("num_layers", num_layers, minimum=1) is not None:
        config = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": num_layers})
    family_of(config)  # an unsupported family fails here, before anything is built
    check_int("seed", seed, minimum=None)
    dtype = resolve_dtype(dtype)
    device = check_device(device)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    if materialize:
        model.to_empty(device=device)
        init_parameters_(model, seed)
        rebuild_rotary_(model, device)
        log.info("built %s (%d layers, %s) on %s in %.2f s", config.model_type, config.num_hidden_layers, dtype,
                 device, time.perf_counter() - t0)
    return model
