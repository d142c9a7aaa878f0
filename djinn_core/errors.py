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


class CudaDriverError(DjinnError, RuntimeError):
    """A CUDA driver call made through :mod:`djinn_core.memory.cuda_driver` failed (carries the driver's error name)."""


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


class StreamingBudgetTooSmall(BudgetTooSmall, ConfigError):
    """A weight-streaming VRAM budget that cannot hold one layer's ring slot next to the resident weights, the KV
    cache and the activations (raised before anything is pinned). Both a :class:`BudgetTooSmall` and a
    :class:`ConfigError`."""


class ProtocolError(DjinnError, ValueError):
    """A malformed RPC message: not a JSON header, a missing or ill-typed field, a tensor whose dtype is not allowed or
    whose byte count does not match its shape, or a request larger than the server accepts."""


class AuthenticationFailed(DjinnError, PermissionError):
    """An RPC request without the server's auth token, or with a wrong one."""


class SessionLimitReached(DjinnError, RuntimeError):
    """The server already holds as many sessions as it is configured to (in total or for this client)."""


class ServerUnavailable(DjinnError, ConnectionError):
    """No answer from a Djinn server within the client's timeout, or the server is shutting down."""


class WorkerLost(DjinnError, ConnectionError):
    """A session's worker behind a ``djinn route`` router stopped answering (timed out, shut down, or its process is
    gone): that session is lost. Sessions on the other workers are unaffected, and new sessions open on them."""


class RemoteError(DjinnError, RuntimeError):
    """An error raised on a Djinn server while executing a request, carried back to the client.

    ``remote_type`` is the server-side exception's class name and ``remote_message`` its message. The client raises a
    subclass that also derives from the matching class of this module when there is one (a remote ``InvalidLayer`` is
    both a ``RemoteError`` and an ``InvalidLayer``), so the same ``except`` works against a local or a remote session.
    """

    def __init__(self, message: str, remote_type: str = "RemoteError"):
        Exception.__init__(self, message)  # not super(): a remote subclass's other base may need other arguments
        self.remote_type = remote_type
        self.remote_message = message

    def __str__(self) -> str:
        return f"{self.remote_type} (remote): {self.remote_message}"
