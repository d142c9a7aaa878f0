"""The CUDA driver calls a restore's critical path makes, through ``ctypes`` on ``libcuda`` (no compiled extension).

A breakpoint restore is host-bound: every call made before the head's copy is issued adds to the resume latency
(measurements: ``docs/notes/runtime.md``), and ``Tensor.copy_`` spends most of its time outside the copy itself
(dispatch, TensorIterator, the pinned-pointer lookup, the host allocator's event bookkeeping). :class:`DriverCopier` issues the same stream-ordered operations --
waits on events, one host-to-device ``cuMemcpyHtoDAsync`` from pinned memory, an event record -- as three kinds of
driver calls on the raw handles torch already owns (``torch.cuda.Event.cuda_event``, the current stream's handle).
Ordering and bytes are the same as ``copy_(non_blocking=True)`` on the current stream; the memory on both sides
belongs to Djinn's slab and host pool, which keep it alive behind events.

:func:`driver_copier` returns None where the driver cannot be used (no CUDA, no ``libcuda``), and callers keep the
torch path. Errors are raised as :class:`~djinn_core.errors.CudaDriverError` with the driver's name for the code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable, Sequence

import torch

from djinn_core.errors import CudaDriverError

log = logging.getLogger(__name__)

CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_CONTEXT = 201

_LIB_NAMES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")


def _load_libcuda() -> ctypes.CDLL | None:
    names = list(_LIB_NAMES)
    found = ctypes.util.find_library("cuda")
    if found:
        names.append(found)
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class DriverCopier:
    """Stream-ordered host-to-device copies and event waits/records through the CUDA driver, for one device.

    ``h2d(dst, src, nbytes, stream, waits, record)``: ``stream`` waits for each event handle in ``waits``, copies
    ``nbytes`` from pinned host address ``src`` to device address ``dst``, then records event handle ``record`` (if
    not 0) on it. ``wait(stream, event)``: one stream wait. All handles are plain integers (``Event.cuda_event``,
    ``Stream.cuda_stream``).
    """

    def __init__(self, lib: ctypes.CDLL, device: torch.device):
        self.device = device
        self._index = device.index if device.index is not None else torch.cuda.current_device()
        u64, vp, uint = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint
        self._copy = lib.cuMemcpyHtoDAsync_v2
        self._copy.argtypes = (u64, vp, ctypes.c_size_t, vp)
        self._copy.restype = ctypes.c_int
        self._wait = lib.cuStreamWaitEvent
        self._wait.argtypes = (vp, vp, uint)
        self._wait.restype = ctypes.c_int
        self._record = lib.cuEventRecord
        self._record.argtypes = (vp, vp)
        self._record.restype = ctypes.c_int
        self._error_name = lib.cuGetErrorName
        self._error_name.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p))
        self._error_name.restype = ctypes.c_int
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self._raw_stream = raw if raw is not None else (lambda i: torch.cuda.current_stream(i).cuda_stream)

    def current_stream(self) -> int:
        """The raw handle of the current stream of this copier's device (what ``copy_`` would be issued on)."""
        return self._raw_stream(self._index)

    def h2d(self, dst: int, src: int, nbytes: int, stream: int, waits: Sequence[int] = (), record: int = 0) -> None:
        rc = self._issue(dst, src, nbytes, stream, waits, record)
        if rc:
            self._check(rc, lambda: self._issue(dst, src, nbytes, stream, waits, record),
                        f"host-to-device copy of {nbytes} bytes")

    def wait(self, stream: int, event: int) -> None:
        """``stream`` waits for event handle ``event`` (0: an event never recorded, nothing to wait for)."""
        if event:
            rc = self._wait(stream, event, 0)
            if rc:
                self._check(rc, lambda: self._wait(stream, event, 0), "stream wait")

    def _check(self, rc: int, again: Callable[[], int], what: str) -> None:
        """A call returned ``rc`` != success: on CUDA_ERROR_INVALID_CONTEXT (this thread never made the device's
        primary context current; torch does it on first use, and nothing was issued, since the first call is the one
        that failed) make it current and run ``again``; raise on any remaining error."""
        if rc == CUDA_ERROR_INVALID_CONTEXT:
            torch.cuda.set_device(self._index)
            rc = again()
        if rc != CUDA_SUCCESS:
            raise CudaDriverError(f"{what} failed: {self.error_name(rc)} ({rc})")

    def _issue(self, dst: int, src: int, nbytes: int, stream: int, waits: Sequence[int], record: int) -> int:
        for ev in waits:
            rc = self._wait(stream, ev, 0)
            if rc:
                return rc
        rc = self._copy(dst, src, nbytes, stream)
        if rc:
            return rc
        return self._record(record, stream) if record else CUDA_SUCCESS

    def error_name(self, rc: int) -> str:
        name = ctypes.c_char_p()
        if self._error_name(rc, ctypes.byref(name)) != CUDA_SUCCESS or not name.value:
            return "CUDA_ERROR_UNKNOWN"
        return name.value.decode()


_LIB: list[ctypes.CDLL | None] = []  # loaded once per process


def driver_copier(device: torch.device) -> DriverCopier | None:
    """A :class:`DriverCopier` for ``device``, or None where it cannot be used (not CUDA, or no ``libcuda``)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if not _LIB:
        _LIB.append(_load_libcuda())
        if _LIB[0] is None:
            log.warning("libcuda not found: restores copy through torch (slower host path)")
    lib = _LIB[0]
    if lib is None:
        return None
    try:
        return DriverCopier(lib, device)
    except AttributeError as e:  # a driver without one of the entry points
        log.warning("CUDA driver lacks %s: restores copy through torch", e)
        return None
