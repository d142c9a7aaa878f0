"""The one host-RAM check (memory/host_ram.py), and that the host pool and the streaming pack both go through it."""

from __future__ import annotations

import pytest

from djinn_core.errors import ConfigError, InsufficientHostMemory
from djinn_core.memory import host_ram
from djinn_core.memory.host_pool import HostPool
from djinn_core.models import build_model
from djinn_core.streaming import pack_layer_weights

pytestmark = pytest.mark.cpu

GiB, MiB = 1 << 30, 1 << 20


class _Host:
    """A fake ``psutil.virtual_memory()``: 16 GiB of RAM, ``available`` of it available."""

    def __init__(self, available: int):
        self.available = available
        self.total = 16 * GiB


@pytest.fixture
def host(monkeypatch):
    def set_available(available: int) -> None:
        monkeypatch.setattr(host_ram.psutil, "virtual_memory", lambda: _Host(available))
    return set_available


def test_a_request_fits_only_with_the_minimum_left_free(host):
    host(10 * GiB)
    host_ram.check_host_ram(6 * GiB, "a test")  # default: 4 GiB (a quarter of 16 GiB is more) stays free
    with pytest.raises(InsufficientHostMemory, match=r"a test of 6\.00 GiB does not fit: 10\.00 GiB .* 4\.00 GiB must"):
        host_ram.check_host_ram(6 * GiB + 1, "a test")
    host_ram.check_host_ram(9 * GiB, "a test", min_free_host_bytes=GiB)
    with pytest.raises(InsufficientHostMemory, match="nothing was pinned"):
        host_ram.check_host_ram(9 * GiB + 1, "a test", min_free_host_bytes=GiB)


def test_the_default_minimum_is_capped_at_a_quarter_of_ram(monkeypatch):
    class Small:
        total, available = 8 * GiB, 8 * GiB
    monkeypatch.setattr(host_ram.psutil, "virtual_memory", lambda: Small())
    assert host_ram.default_min_free_host_bytes() == 2 * GiB
    host_ram.check_host_ram(6 * GiB, "a test")


@pytest.mark.parametrize("bad", [-1, 1.5, "1GiB", True])
def test_a_bad_minimum_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="min_free_host_bytes"):
        host_ram.check_host_ram(1, "a test", min_free_host_bytes=bad)


def test_the_host_pool_and_the_weight_pack_use_the_same_check(host):
    host(4 * GiB + MiB)  # 1 MiB above the default minimum
    HostPool(MiB // 2, pin=False)
    with pytest.raises(InsufficientHostMemory, match="host pool"):
        HostPool(MiB + 4096, pin=False)
    model = build_model("llama-tiny", num_layers=2, materialize=False)
    with pytest.raises(InsufficientHostMemory, match="layer weight sets"):
        pack_layer_weights(model, device="cpu", min_free_host_bytes=5 * GiB, progress=False)
