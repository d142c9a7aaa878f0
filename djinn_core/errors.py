"""Typed errors raised by djinn_core.

Every error a caller can provoke with bad input derives from :class:`DjinnError`, and each also derives from the
built-in exception a Python programmer would expect (``ValueError`` for a bad argument, ``MemoryError`` for an
exhausted pool, ``KeyError`` for an unknown handle), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class DjinnError(Exception):
    """Base class of every error raised by djinn_core."""


class ConfigError(DjinnError, ValueError):
    """A configuration or argument is invalid (negative bytes, wrong dtype, inconsistent sizes)."""


class DeviceUnavailable(DjinnError, RuntimeError):
    """The operation needs hardware (a CUDA GPU, NVML) that this machine does not have."""


class SlabExhausted(DjinnError, MemoryError):
    """The GPU slab cannot satisfy an allocation. Carries the requested and free byte counts."""

    def __init__(self, requested: int, free: int, capacity: int, message: str | None = None):
        self.requested = requested
        self.free = free
        self.capacity = capacity
        super().__init__(
            message
            or f"slab exhausted: requested {requested} bytes, {free} free of {capacity} bytes capacity"
        )


class HostPoolExhausted(DjinnError, MemoryError):
    """The pinned host pool cannot satisfy an allocation."""

    def __init__(self, requested: int, free: int, capacity: int):
        self.requested = requested
        self.free = free
        self.capacity = capacity
        super().__init__(f"host pool exhausted: requested {requested} bytes, {free} free of {capacity} bytes")


class InsufficientHostMemory(DjinnError, MemoryError):
    """Host RAM is too small for what was asked to be pinned or packed (checked before pinning)."""


class DoubleFree(DjinnError, ValueError):
    """An allocation was freed twice."""


class UnknownAllocation(DjinnError, KeyError):
    """A handle that this allocator never issued (or issued by another allocator)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown allocation"


class UnknownSession(DjinnError, KeyError):
    """A session id that is not (or no longer) known: never opened, or already freed."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown session"


class BudgetTooSmall(DjinnError, ValueError):
    """A memory budget that cannot hold the minimum working set (weights, one layer, activations)."""


class AdmissionRefused(DjinnError, MemoryError):
    """A session can never be admitted: alone it needs more than the whole budget."""


class InvalidLayer(DjinnError, IndexError):
    """A layer index outside ``0 .. num_layers``."""


class InvalidEdit(DjinnError, ValueError):
    """An edit of a hidden state with the wrong shape, dtype or device; the checkpoint is left intact."""


class CheckpointStateError(DjinnError, RuntimeError):
    """An operation on a checkpoint or session in the wrong state (resumed twice, freed, not paused)."""


class CacheCapacityExceeded(DjinnError, ValueError):
    """More tokens than a session's KV cache was sized for (prompt + ``max_new_tokens``)."""


class ChecksumMismatch(DjinnError, RuntimeError):
    """Debug-mode checksums of a swapped item differ before swap-out and after swap-in: bytes were lost or corrupted."""
