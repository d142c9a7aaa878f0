"""The Djinn RPC wire format: a JSON header frame, then one raw-buffer frame per tensor. Nothing is ever pickled.

A message is a list of byte frames (ZeroMQ multipart)::

    frame 0   UTF-8 JSON object: {"v": 1, "op"|"ok": ..., "id": ..., ..., "tensors": [{"dtype", "shape", "nbytes"}]}
    frame 1+  the raw bytes of each tensor, C-contiguous, in the order of "tensors"

Tensors leave as a zero-copy ``memoryview`` of a contiguous CPU tensor. On the way in, every descriptor is validated
before a byte is interpreted: the dtype name must be in :data:`ALLOWED_DTYPES`, the shape a list of non-negative
ints, ``nbytes == prod(shape) * itemsize == len(frame)``, and the message no larger than the receiver's limit. The
tensor is then rebuilt with ``torch.frombuffer`` over a private, writable copy of the frame.

Everything that can be wrong with a message raises :class:`~djinn_core.errors.ProtocolError`.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from djinn_core.errors import AuthenticationFailed, ProtocolError
from djinn_core.rpc.config import DEFAULT_MAX_HEADER_BYTES
from djinn_core.validation import is_int

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_HEADER_DEPTH = 8  # nesting of JSON objects and arrays in a header (requests use 3: header, args, a list)
MAX_INT_DIGITS = 19  # an int in a header fits a signed 64-bit integer
_INT64 = 1 << 63

# The dtypes a tensor frame may carry (name on the wire -> torch dtype). Anything else is refused.
ALLOWED_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in ALLOWED_DTYPES.items()}
MAX_DIMS = 8
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # built once: json.dumps(**kw) builds one per call


@dataclass
class Message:
    """A decoded message: the JSON header (``tensors`` descriptors removed) and the rebuilt CPU tensors."""

    header: dict[str, Any]
    tensors: list[torch.Tensor] = field(default_factory=list)


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; :class:`ProtocolError` if it may not travel."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot be sent; allowed: {sorted(ALLOWED_DTYPES)}") from None


def tensor_frame(t: torch.Tensor) -> tuple[dict[str, Any], memoryview | bytes]:
    """The descriptor and the raw bytes of ``t`` (copied to the CPU and made contiguous only if needed).

    The returned ``memoryview`` keeps the (possibly new) CPU tensor alive, so it can be handed to ZeroMQ without a
    copy. A CUDA tensor is copied to the host synchronously (the current stream is waited for).
    """
    if not isinstance(t, torch.Tensor):
        raise ProtocolError(f"expected a tensor, got {type(t).__name__}")
    desc = tensor_desc(t)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return desc, b""
    return desc, memoryview(t.reshape(-1).view(torch.uint8).numpy())  # (nbytes,) uint8 over the tensor's storage


class HostStaging:
    """Device tensors to host frames through one reusable pinned buffer, the wait for them done by polling an event.

    ``.cpu()`` copies into pageable memory through the driver's own staging, and its wait for the device can end
    milliseconds after the device work has (``docs/notes/rpc.md``). A copy into pinned memory is one DMA, and polling
    its event sees the end within microseconds. The frames returned are views of the buffer, valid until the next
    call: copy them out first (the server writes them into a shared-memory channel). The copies run on the current
    stream of the tensors' device.

    Args:
        max_bytes: the most one call stages (the buffer grows to what is asked, up to this).
        spin_s: how long to poll before blocking on the event instead.
        warm: called every ``warm_every_s`` while polling (the caller keeps the code that follows the wait warm:
            after milliseconds of polling it runs several times slower, ``docs/notes/rpc.md``).
        block: wait in the CUDA driver (``Event.synchronize``, as ``.cpu()`` waits) instead of polling.
    """

    ALIGN = 64

    def __init__(self, max_bytes: int, *, spin_s: float = 1.0, warm: Callable[[], None] | None = None,
                 warm_every_s: float = 100e-6, block: bool = False):
        self.max_bytes = max_bytes
        self.spin_s = spin_s
        self.block = block
        self.warm = warm
        self.warm_every_s = warm_every_s
        self._buf: torch.Tensor | None = None
        self._event: Any = None

    def _layout(self, tensors: Sequence[torch.Tensor]) -> list[int]:
        offs, off = [], 0
        for t in tensors:
            offs.append(off)
            off += -(-t.numel() * t.element_size() // self.ALIGN) * self.ALIGN
        offs.append(off)
        return offs

    def fits(self, tensors: Sequence[torch.Tensor]) -> bool:
        """All of ``tensors`` are CUDA tensors of one device with a wire dtype, together within ``max_bytes``."""
        if not tensors or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
            return False
        dev = tensors[0].device
        return (all(t.device == dev and t.dtype in _DTYPE_NAMES for t in tensors)
                and self._layout(tensors)[-1] <= self.max_bytes)

    def encode(self, tensors: Sequence[torch.Tensor]) -> tuple[list[dict[str, Any]], list[memoryview | bytes]]:
        """Like :func:`encode_tensors` for tensors that :meth:`fits`; the buffers are views of the staging buffer."""
        staged = self.start(tensors)
        self.wait()
        return staged

    def start(self, tensors: Sequence[torch.Tensor], into: tuple[torch.Tensor, Sequence[int]] | None = None
              ) -> tuple[list[dict[str, Any]], list[memoryview | bytes]]:
        """Queue the copies of ``tensors`` (that :meth:`fits`) into the buffer, or ``into`` host memory the device
        copies into directly (a uint8 tensor over memory :func:`register_host` pinned, and each tensor's byte offset
        in it): their descriptors and the views they fill, which hold their bytes once :meth:`wait` returns."""
        if into is None:
            offs = self._layout(tensors)
            if self._buf is None or self._buf.numel() < offs[-1]:
                self._buf = None
                self._buf = torch.empty(max(offs[-1], 1 << 20), dtype=torch.uint8, pin_memory=True)
            buf = self._buf
        else:
            buf, offs = into
            if len(offs) != len(tensors):
                raise ProtocolError(f"{len(offs)} places for {len(tensors)} tensors")
        dev = tensors[0].device
        stream = torch.cuda.current_stream(dev)
        descs, views = tensor_descs(tensors), []
        for t, d, off in zip(tensors, descs, offs):
            raw = buf[off:off + d["nbytes"]]
            if d["nbytes"]:  # as bytes: a place in a channel need not be aligned to the element size
                raw.copy_(t.detach().contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
            views.append(raw)
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record(stream)
        return descs, [memoryview(v.numpy()) if v.numel() else b"" for v in views]

    def wait(self, warm: bool = True) -> None:
        """Until the copies :meth:`start` queued are done: block on their event (``block``), or poll it (calling the
        ``warm`` given at construction, unless ``warm`` is False), then block."""
        if self.block:
            self._event.synchronize()
            return
        now = time.monotonic()
        deadline, next_warm = now + self.spin_s, now + self.warm_every_s
        while not self._event.query():
            now = time.monotonic()
            if now > deadline:
                self._event.synchronize()
                break
            if warm and self.warm is not None and now >= next_warm:
                self.warm()
                next_warm = time.monotonic() + self.warm_every_s


def tensor_desc(t: torch.Tensor) -> dict[str, Any]:
    """The descriptor of ``t`` as frame 0 lists it (its bytes C-contiguous); :class:`ProtocolError` for a dtype that
    may not travel."""
    return {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "nbytes": t.numel() * t.element_size()}


def tensor_descs(tensors: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """:func:`tensor_desc` of each of ``tensors``."""
    return [tensor_desc(t) for t in tensors]


def register_host(view: memoryview) -> tuple[torch.Tensor, Callable[[], None]] | None:
    """``view``'s memory (writable, e.g. a shared-memory channel's mapping) page-locked in place with
    ``cudaHostRegister``, so that a device-to-host copy lands in it with one DMA: (a uint8 host tensor over it, the
    function that unregisters it), or None where it cannot be (no CUDA, or the driver refused: logged; the caller
    stages through its own pinned buffer instead). The tensor does not keep the memory mapped: unregister, and let
    every such tensor go, before the mapping closes."""
    if not torch.cuda.is_available() or view.readonly or not view.nbytes:
        return None
    region = torch.frombuffer(view, dtype=torch.uint8)
    ptr = region.data_ptr()
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, region.numel(), 0))
    if err != 0:
        _clear_cuda_error()
        log.warning("cudaHostRegister of %d bytes failed (cudaError %d): staged through a pinned buffer instead",
                    region.numel(), err)
        return None
    state = {"region": region}

    def unregister() -> None:
        if state.pop("region", None) is not None:
            try:
                torch.cuda.cudart().cudaHostUnregister(ptr)
            except Exception:  # interpreter shutdown: the driver may already be gone
                pass
    return region, unregister


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a refused call, so no later launch check reports it as its own."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python, present beside CUDA builds of torch
    except ImportError:
        return
    cudart.cudaGetLastError()


def encode_tensors(tensors: Sequence[torch.Tensor]) -> tuple[list[dict[str, Any]], list[memoryview | bytes]]:
    """Descriptors and raw host buffers of ``tensors`` (device tensors are copied to the host here, synchronously)."""
    descs, bufs = [], []
    for t in tensors:
        d, b = tensor_frame(t)
        descs.append(d)
        bufs.append(b)
    return descs, bufs


def encode_header(header: dict[str, Any], descs: list[dict[str, Any]]) -> bytes:
    """Frame 0: ``header`` with the protocol version and the tensor descriptors, as compact JSON."""
    try:
        return _JSON.encode({"v": PROTOCOL_VERSION, **header, "tensors": descs}).encode()
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"header is not JSON-serialisable: {e}") from None


def encode(header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> list[Any]:
    """Frames for ``header`` and ``tensors``: the JSON header (with ``v`` and the descriptors) and raw buffers."""
    descs, bufs = encode_tensors(tensors)
    return [encode_header(header, descs), *bufs]


def _frame_bytes(frame: Any) -> memoryview:
    """A read-only byte view of a ZeroMQ frame, ``bytes`` or buffer."""
    buf = getattr(frame, "buffer", frame)
    try:
        return memoryview(buf).cast("B")
    except TypeError as e:
        raise ProtocolError(f"frame is not a byte buffer: {e}") from None


def _frame_len(frame: Any) -> int:
    """Byte length of a frame (cheap for ``bytes`` and ZeroMQ frames)."""
    if isinstance(frame, (bytes, bytearray)) or hasattr(frame, "buffer"):
        return len(frame)
    return _frame_bytes(frame).nbytes


def _header_bytes(frame: Any) -> bytes:
    raw = getattr(frame, "bytes", None)  # a ZeroMQ frame (cached copy)
    if isinstance(raw, bytes):
        return raw
    return frame if isinstance(frame, bytes) else _frame_bytes(frame).tobytes()


def _json_depth(raw: bytes) -> int:
    """The deepest nesting of JSON objects and arrays in ``raw`` (brackets inside strings not counted)."""
    depth = deepest = 0
    in_str = escaped = False
    for b in raw:
        if in_str:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _bounded_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise ProtocolError(f"header holds an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    value = int(text)
    if not -_INT64 <= value < _INT64:
        raise ProtocolError(f"header holds an integer outside the signed 64-bit range: {text}")
    return value


def _finite_float(text: str) -> float:
    if len(text) > 64:
        raise ProtocolError(f"header holds a number of {len(text)} characters (at most 64)")
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"header holds a number that is not finite: {text}")
    return value


def _no_constant(name: str) -> Any:
    raise ProtocolError(f"header holds {name}, which JSON does not allow")


_DECODER = json.JSONDecoder(parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant)


def check_token(expected: str | None, token: Any) -> None:
    """:class:`AuthenticationFailed` unless ``token`` is ``expected`` (constant-time compare); anything passes when
    no token is expected. Called right after the header parses, before any other field is read."""
    if expected is None:
        return
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(), expected.encode()):
        raise AuthenticationFailed("missing or wrong auth token")


def reply_id(rid: Any) -> int | str | None:
    """A request id fit to echo: an int (64-bit, as the header parser bounds it) or a short string, else None."""
    if is_int(rid) or (isinstance(rid, str) and len(rid) <= 128):
        return rid
    return None


def error_header(rid: Any, type_name: str, message: str) -> dict[str, Any]:
    """The header of an error reply to request ``rid`` (already made fit to echo by :func:`reply_id`)."""
    return {"id": rid, "ok": False, "error": {"type": type_name, "message": message}}


def request_header(body: list[Any] | None, error: Exception | None, *,
                   max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> dict[str, Any]:
    """The header of a request as a transport handed it over: ``error`` (why its frames could not be read) raised,
    an empty message refused, frame 0 parsed by :func:`decode_header`; :class:`ProtocolError` for what is wrong."""
    if error is not None:
        raise error
    if not body:
        raise ProtocolError("empty message")
    return decode_header(body[0], max_header_bytes=max_header_bytes)


def decode_header(frame: Any, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> dict[str, Any]:
    """Parse and check frame 0: a JSON object of at most ``max_header_bytes`` with a known protocol version.

    The header is untrusted: its size is checked before it is read, its nesting depth (at most
    :data:`MAX_HEADER_DEPTH`) before it is parsed, and every number while it is parsed (ints within 64 bits, floats
    finite, no NaN/Infinity). Whatever is wrong raises :class:`ProtocolError`, never anything else.
    """
    size = _frame_len(frame)
    if size > max_header_bytes:
        raise ProtocolError(f"header of {size} bytes exceeds the {max_header_bytes}-byte limit")
    raw = _header_bytes(frame)
    if raw.count(b"[") + raw.count(b"{") > MAX_HEADER_DEPTH and _json_depth(raw) > MAX_HEADER_DEPTH:
        raise ProtocolError(f"header nests deeper than {MAX_HEADER_DEPTH} levels")
    try:
        header = _DECODER.decode(raw.decode("utf-8"))
    except ProtocolError:
        raise
    except UnicodeDecodeError as e:
        raise ProtocolError(f"header is not UTF-8: {e}") from None
    except (ValueError, RecursionError, MemoryError) as e:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"header is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(header).__name__}")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {header.get('v')!r} (this side speaks {PROTOCOL_VERSION})")
    return header


def _check_descriptor(i: int, d: Any) -> tuple[torch.dtype, tuple[int, ...], int]:
    if not isinstance(d, dict):
        raise ProtocolError(f"tensor {i}: descriptor must be an object, got {type(d).__name__}")
    name, shape, nbytes = d.get("dtype"), d.get("shape"), d.get("nbytes")
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise ProtocolError(f"tensor {i}: dtype {name!r} not allowed; allowed: {sorted(ALLOWED_DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(is_int(s) and s >= 0 for s in shape)):
        raise ProtocolError(f"tensor {i}: shape must be a list of at most {MAX_DIMS} ints >= 0, got {shape!r}")
    if not is_int(nbytes):
        raise ProtocolError(f"tensor {i}: nbytes must be an int, got {nbytes!r}")
    dtype = ALLOWED_DTYPES[name]
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise ProtocolError(f"tensor {i}: nbytes {nbytes} != prod(shape {shape}) * itemsize = {expected}")
    return dtype, tuple(shape), nbytes


def decode(frames: Sequence[Any], *, max_bytes: int, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
           header: dict[str, Any] | None = None) -> Message:
    """Validate and decode a message; tensors come back as fresh, writable CPU tensors (a ``bytearray`` frame becomes
    its tensor's storage: the caller hands it over).

    ``max_bytes`` bounds the whole message (header and tensor frames). ``header``: frame 0 already parsed by
    :func:`decode_header` (a server reads it first, to authenticate before anything else is looked at). Raises
    :class:`ProtocolError` on anything malformed, before any tensor is built.
    """
    if not frames:
        raise ProtocolError("empty message")
    total = sum(_frame_len(f) for f in frames)
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the {max_bytes}-byte limit")
    if header is None:
        header = decode_header(frames[0], max_header_bytes=max_header_bytes)
    else:
        header = dict(header)
    descs = header.pop("tensors", [])
    if not isinstance(descs, list):
        raise ProtocolError("'tensors' must be a list of descriptors")
    if len(descs) != len(frames) - 1:
        raise ProtocolError(f"header describes {len(descs)} tensors but {len(frames) - 1} tensor frames came")
    tensors = []
    for i, (d, frame) in enumerate(zip(descs, frames[1:])):
        dtype, shape, nbytes = _check_descriptor(i, d)
        buf = _frame_bytes(frame)
        if buf.nbytes != nbytes:
            raise ProtocolError(f"tensor {i}: frame holds {buf.nbytes} bytes, descriptor says {nbytes}")
        if nbytes == 0:
            # no bytes bound the other dims of an empty tensor: their strides must still fit 64 bits
            if math.prod(d for d in shape if d) * dtype.itemsize >= _INT64:
                raise ProtocolError(f"tensor {i}: empty, but its shape {shape} has strides past 64 bits")
            tensors.append(torch.empty(shape, dtype=dtype))
        else:  # memory we own: a bytearray frame is adopted, any other (ZeroMQ's, read-only) is copied once
            owned = frame if isinstance(frame, bytearray) else bytearray(buf)
            tensors.append(torch.frombuffer(owned, dtype=dtype).view(shape))
    return Message(header, tensors)
