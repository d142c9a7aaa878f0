"""The one host-RAM check: before pinning or packing ``nbytes`` of host memory, make sure the host can spare them.

Every pinned allocation of the library (the :class:`~djinn_core.memory.host_pool.HostPool`, the weight-streaming
pack) asks :func:`check_host_ram` first, so an impossible request fails fast with
:class:`~djinn_core.errors.InsufficientHostMemory` instead of driving the host into swap (pinned pages cannot be
swapped out: the OOM killer comes instead).
"""

from __future__ import annotations

import psutil

from djinn_core.errors import InsufficientHostMemory
from djinn_core.validation import check_optional_int

GiB = 1 << 30
# NOTE: host RAM left available after pinning, for the OS, Python and pageable tensors (a model's CPU copies, the
# tokenizer); capped at a quarter of the host's RAM so that a small machine can still pin something.
DEFAULT_MIN_FREE_HOST_BYTES = 4 * GiB


def default_min_free_host_bytes(total_bytes: int | None = None) -> int:
    """The host RAM (bytes) that must stay available when the caller does not say: 4 GiB, at most a quarter of
    ``total_bytes`` (default: this host's RAM)."""
    if total_bytes is None:
        total_bytes = psutil.virtual_memory().total
    return min(DEFAULT_MIN_FREE_HOST_BYTES, total_bytes // 4)


def check_host_ram(nbytes: int, what: str, *, min_free_host_bytes: int | None = None) -> None:
    """Raise :class:`InsufficientHostMemory` unless ``nbytes`` fit in the host's available RAM with
    ``min_free_host_bytes`` (default :func:`default_min_free_host_bytes`) still available afterwards.

    ``what`` names the request in the message (e.g. ``"host pool"``). Reads ``psutil.virtual_memory()`` once.
    """
    check_optional_int("min_free_host_bytes", min_free_host_bytes)
    vm = psutil.virtual_memory()
    keep = default_min_free_host_bytes(vm.total) if min_free_host_bytes is None else min_free_host_bytes
    if nbytes + keep > vm.available:
        raise InsufficientHostMemory(
            f"{what} of {nbytes / GiB:.2f} GiB does not fit: {vm.available / GiB:.2f} GiB of host RAM available, "
            f"{keep / GiB:.2f} GiB must stay free (min_free_host_bytes); nothing was pinned")


__all__ = ["DEFAULT_MIN_FREE_HOST_BYTES", "check_host_ram", "default_min_free_host_bytes"]
