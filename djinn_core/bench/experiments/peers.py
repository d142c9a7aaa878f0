"""The peers the streaming claims are measured against, set up one way for every experiment that runs them.

DeepSpeed ZeRO-Inference (ZeRO-3 with parameters offloaded to pinned host memory, prefetching ahead of compute) is
the peer to beat (``../shared/PEERS.md``: 46.6-49.6 GB/s on the lent GPUs). It is not a dependency: on the GPU machine
``scripts/gpu_peers_setup.sh`` installs it from carried files. A claim against a peer that did not run fails: it
neither skips nor passes (:func:`import_deepspeed` raises :class:`~djinn_core.errors.PeerUnavailable`, which the
tests turn into a failure).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator

import torch

from djinn_core.errors import DjinnError


class PeerUnavailable(DjinnError):
    """A peer a claim is measured against cannot run on this machine (not installed, or it fails to load)."""


def import_deepspeed() -> Any:
    """The ``deepspeed`` module; :class:`PeerUnavailable` saying why when it cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import deepspeed
    except Exception as e:  # not installed (see scripts/gpu_peers_setup.sh), or it fails to load here
        raise PeerUnavailable(f"DeepSpeed cannot be imported on this machine ({type(e).__name__}: {e}); carry .whl "
                              "and source scripts/gpu_peers_setup.sh to run this peer") from e
    return deepspeed


def zero_inference_config(hidden_size: int, *, micro_batch: int = 1) -> dict[str, Any]:
    """ZeRO-3 with every parameter offloaded to pinned host memory and 8 prefetch buffers (``../shared/PEERS.md``);
    parameters smaller than 10 hidden rows (norms) stay on the GPU."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "fp16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu", "pin_memory": True, "buffer_count": 8},
            "stage3_prefetch_bucket_size": 2e9,
            "stage3_max_live_parameters": 4e9,
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "overlap_comm": True,
        },
    }


@contextlib.contextmanager
def zero_inference(model: torch.nn.Module, *, micro_batch: int = 1) -> Iterator[tuple[torch.nn.Module, dict]]:
    """``model`` (built on the GPU) under DeepSpeed ZeRO-Inference, as ``(module, config)``; torch.distributed (one
    process) is set up for it and torn down after, with the engine."""
    deepspeed = import_deepspeed()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("DJINN_PEER_PORT", "29517"), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    config = zero_inference_config(model.config.hidden_size, micro_batch=micro_batch)
    engine = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = deepspeed.initialize(model=model, config=config)[0]
            engine.module.eval()
            yield engine.module, {**config, "deepspeed_version": deepspeed.__version__}
    finally:
        del engine
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


__all__ = ["PeerUnavailable", "import_deepspeed", "zero_inference", "zero_inference_config"]
