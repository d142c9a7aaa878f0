"""exp2-only fixtures: the pinned host pack of Llama-2-70B layers, built once per session and shared by every test;
the tiny CPU pack the plumbing versions stream from, and exp4's tiny streamed runtime over it."""

from __future__ import annotations

import logging

import psutil
import pytest
import torch

from djinn_core.bench.experiments.exp2_streaming import ARCH, HOST_LAYERS, PEER_MIN_FREE_HOST_BYTES, fill_seeded
from djinn_core.models import build_model, decoder_layers
from djinn_core.streaming import LayerLayout, pack_layer_weights

log = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def llama70b_host_pack(cuda_device: torch.device):
    """Up to 48 distinct Llama-2-70B decoder layers (random fp16, seed 0: the weights build_model gives) packed in
    pinned host memory, ~77 GiB, pinned once (about a minute). Fewer layers if the host cannot spare the RAM while
    leaving room for the peers' copies of a 6-layer model."""
    meta = build_model(ARCH, num_layers=HOST_LAYERS, materialize=False)
    stride = LayerLayout.of(decoder_layers(meta)[0]).stride
    fit = (psutil.virtual_memory().available - PEER_MIN_FREE_HOST_BYTES) // stride
    n = int(min(HOST_LAYERS, fit))
    if n < 2:
        # the streaming claims need this pack: a machine that cannot pin it fails them, it does not skip them
        pytest.fail(f"host RAM too small for a 70B weight pack ({psutil.virtual_memory().available / 2**30:.1f} GiB "
                    "available)")
    if n < HOST_LAYERS:
        log.warning("host RAM fits %d of the %d requested 70B layers", n, HOST_LAYERS)
    pack = pack_layer_weights(meta, device=cuda_device, fill=fill_seeded, num_sets=n)
    yield pack
    pack.release()


@pytest.fixture(scope="module")
def tiny_pack():
    """The CPU plumbing versions' pack: a 5-layer llama-tiny (fp32, seed 0: the weights build_model gives), unpinned,
    built once per test module."""
    meta = build_model("llama-tiny", num_layers=5, dtype=torch.float32, materialize=False)
    pack = pack_layer_weights(meta, device="cpu", fill=fill_seeded, progress=False)
    yield pack
    pack.release()


@pytest.fixture
def tiny_runtime(tiny_pack):
    """exp4's plumbing runtime: ``tiny_runtime(**kw)`` opens sessions over a 5-layer llama-tiny streamed from
    ``tiny_pack`` through 2 ring slots under a 64 MiB budget (a context manager, as
    :func:`~djinn_core.bench.experiments.exp4_streamed_sessions.streamed_runtime`)."""
    from djinn_core.bench.experiments.exp4_streamed_sessions import streamed_runtime

    def make(**kw):
        return streamed_runtime(tiny_pack, torch.device("cpu"), num_layers=5, budget_bytes=64 << 20, ring_slots=2,
                                session_tokens=40, chunk_bytes=64 << 10, host_pool_bytes=8 << 20, arch="llama-tiny",
                                dtype=torch.float32, activation_headroom_bytes=1 << 20, **kw)

    return make
