"""The host pack: decoder-layer weights packed contiguously in host memory, pinned once, read by the ring's copies.

Each weight set (one layer's parameters) sits at ``layout.stride`` in page-aligned segments of whole layers, pinned
in place with ``cudaHostRegister`` (exactly the bytes asked for, unlike the power-of-two caching host allocator).
Host RAM is checked (:func:`~djinn_core.memory.host_ram.check_host_ram`) before anything is pinned.
"""

from __future__ import annotations

import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from djinn_core.errors import ConfigError, DeviceUnavailable, InsufficientHostMemory
from djinn_core.memory.host_ram import check_host_ram
from djinn_core.models import decoder_layers
from djinn_core.streaming.layout import LAYER_ALIGNMENT, LayerLayout, bind_parameters, restore_parameters
from djinn_core.validation import check_int, check_optional_int

log = logging.getLogger(__name__)

GiB = 1 << 30
DEFAULT_SEGMENT_BYTES = 8 * GiB  # host pack pinned in pieces of at most this many bytes (whole layers each)

LayerFill = Callable[[nn.Module, int], None]  # fill(layer, host_set): write a layer's parameters in place


def _register_host(t: torch.Tensor, registered: list[int]) -> None:
    """Page-lock ``t``'s bytes in place (cudaHostRegister) and append its address to ``registered``."""
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
    if err != 0:
        raise InsufficientHostMemory(f"cudaHostRegister of {t.numel() / GiB:.2f} GiB failed (cudaError {err})")
    registered.append(t.data_ptr())


def _unregister_host(ptrs: list[int]) -> None:
    while ptrs:
        ptr = ptrs.pop()
        try:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:  # interpreter shutdown: the driver may already be gone
            pass


class WeightPack:
    """Decoder-layer weights packed in host memory: ``num_sets`` layers of one :class:`LayerLayout`, each contiguous
    at ``layout.stride``, in segments of whole layers pinned once (``pin=True``) with ``cudaHostRegister``.

    Build one with :func:`pack_layer_weights`. ``ready_event`` (CUDA) is recorded after the pack was filled; a copy
    stream reading it must wait on it first (:class:`~djinn_core.streaming.ring.WeightRing` does).
    """

    def __init__(self, layout: LayerLayout, num_sets: int, *, pin: bool,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, progress: bool = True):
        check_int("num_sets", num_sets, 1)
        check_int("segment_bytes", segment_bytes, 1)
        if pin and not torch.cuda.is_available():
            raise DeviceUnavailable("pinning a weight pack needs CUDA; use pin=False on a machine without a GPU")
        self.layout = layout
        self.num_sets = num_sets
        self.pinned = bool(pin)
        self.ready_event: Any = None
        per_segment = max(1, segment_bytes // layout.stride)
        self._segments: list[torch.Tensor] = []
        self._pinned_ptrs: list[int] = []
        self._finalizer = weakref.finalize(self, _unregister_host, self._pinned_ptrs)
        sizes = [min(per_segment, num_sets - s) for s in range(0, num_sets, per_segment)]
        for n in sizes:
            raw = torch.empty(n * layout.stride + LAYER_ALIGNMENT, dtype=torch.uint8)
            skip = (-raw.data_ptr()) % LAYER_ALIGNMENT  # page-aligned layers
            self._segments.append(raw[skip:skip + n * layout.stride])
        self._per_segment = per_segment
        t0 = time.perf_counter()
        if pin:
            # NOTE: cudaHostRegister releases the GIL: pin segments from a few threads (page faults run in parallel)
            with ThreadPoolExecutor(max_workers=min(4, len(self._segments))) as pool:
                list(tqdm(pool.map(partial(_register_host, registered=self._pinned_ptrs), self._segments),
                          total=len(self._segments), desc="pinning weight pack", unit="seg", disable=not progress))
        self.pin_s = time.perf_counter() - t0
        if pin:
            log.info("pinned %.2f GiB for %d layer weight sets in %d segments in %.1f s (%.2f GiB/s)",
                     self.nbytes / GiB, num_sets, len(self._segments), self.pin_s,
                     self.nbytes / GiB / max(self.pin_s, 1e-9))

    @property
    def nbytes(self) -> int:
        return self.num_sets * self.layout.stride

    def layer(self, index: int) -> torch.Tensor:
        """The packed bytes of weight set ``index`` (uint8, ``layout.used_bytes`` long, pinned when the pack is)."""
        if self._segments is None:
            raise ConfigError("this weight pack has been released")
        if not 0 <= index < self.num_sets:
            raise ConfigError(f"weight set {index} outside 0..{self.num_sets - 1}")
        seg, k = divmod(index, self._per_segment)
        start = k * self.layout.stride
        return self._segments[seg][start:start + self.layout.used_bytes]

    def release(self) -> None:
        """Unpin and free the pack. Every :class:`~djinn_core.streaming.model.StreamedModel` reading it must have been
        removed first."""
        self._finalizer()
        self._segments = None  # type: ignore[assignment]


def check_pack_args(
    model: nn.Module,
    *,
    device: torch.device | str,
    num_sets: int | None,
    pin: bool | None,
    min_free_host_bytes: int | None,
    what: str,
) -> tuple[torch.device, list[nn.Module], int, LayerLayout, bool]:
    """The checks before packing ``model``'s first ``num_sets`` decoder layers (default: all) of ``what`` (e.g.
    "weights", "shards") for ``device``: ``num_sets`` within the layers, ``min_free_host_bytes``, every packed layer
    of layer 0's parameter layout (``ConfigError``), a CUDA ``device`` only with CUDA (``DeviceUnavailable``).
    Returns ``(device, layers, num_sets, layout, pin)``; ``pin`` defaults to ``device`` being CUDA."""
    device = torch.device(device)
    layers = decoder_layers(model)
    num_sets = len(layers) if num_sets is None else check_int("num_sets", num_sets, 1)
    if num_sets > len(layers):
        raise ConfigError(f"num_sets {num_sets} > {len(layers)} decoder layers to take weights from")
    check_optional_int("min_free_host_bytes", min_free_host_bytes)
    layout = LayerLayout.of(layers[0])
    for i in range(1, num_sets):
        if LayerLayout.of(layers[i]).signature() != layout.signature():
            raise ConfigError(f"decoder layer {i} has another parameter layout than layer 0: cannot share a ring")
    pin = device.type == "cuda" if pin is None else bool(pin)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"packing {what} for a CUDA device needs a CUDA GPU; none is available")
    return device, layers, num_sets, layout, pin


def pack_layer_weights(
    model: nn.Module,
    *,
    device: torch.device | str,
    fill: LayerFill | None = None,
    num_sets: int | None = None,
    pin: bool | None = None,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    min_free_host_bytes: int | None = None,
    progress: bool = True,
) -> WeightPack:
    """Pack the weights of ``model``'s first ``num_sets`` decoder layers (default: all) into host memory.

    With ``fill=None`` the layers' own parameters are copied (they must not be on ``meta``). With ``fill``, each layer
    is materialised on ``device`` (a GPU staging slot, or the pack itself on a CPU) and ``fill(layer, index)`` writes
    its parameters in place -- e.g. ``init_parameters_(layer, seed, prefix=f"model.layers.{index}.")`` -- then it is
    copied device-to-host into the pack on the current stream. The model's own parameters are left as they were.
    Host RAM is checked (:class:`InsufficientHostMemory`, keeping ``min_free_host_bytes`` available; default
    :func:`~djinn_core.memory.host_ram.default_min_free_host_bytes`) before anything is pinned. ``pin`` defaults to
    ``device`` being CUDA.
    """
    device, layers, num_sets, layout, pin = check_pack_args(model, device=device, num_sets=num_sets, pin=pin,
                                                            min_free_host_bytes=min_free_host_bytes, what="weights")
    check_host_ram(num_sets * layout.stride, f"a pack of {num_sets} layer weight sets",
                   min_free_host_bytes=min_free_host_bytes)
    pack = WeightPack(layout, num_sets, pin=pin, segment_bytes=segment_bytes, progress=progress)
    staging = None
    if fill is not None and device.type == "cuda":
        staging = torch.empty(layout.stride, dtype=torch.uint8, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in tqdm(range(num_sets), desc="packing layer weights", unit="layer", disable=not progress):
            dst = pack.layer(i)
            layer = layers[i]
            if fill is None:
                for view, (name, p) in zip(layout.views(dst), layer.named_parameters()):
                    if p.is_meta:
                        raise ConfigError(f"layer {i} parameter {name} is on meta: pass fill= to materialise it")
                    view.copy_(p.detach(), non_blocking=pack.pinned)
                continue
            target = staging if staging is not None else dst
            originals = bind_parameters(layer, layout.views(target))
            try:
                fill(layer, i)
            finally:
                restore_parameters(layer, originals)
            if staging is not None:  # D2H on the current stream; the next fill overwrites staging after it
                dst.copy_(staging[:layout.used_bytes], non_blocking=pack.pinned)
    if torch.cuda.is_available() and (staging is not None or pack.pinned):
        pack.ready_event = torch.cuda.Event()
        pack.ready_event.record(torch.cuda.current_stream(device if device.type == "cuda" else None))
    if staging is not None:  # back to the driver: a VRAM split counts the ring, not the allocator's cache of this slot
        staging = target = None  # (resident modules placed later would otherwise split the cached slot)
        torch.cuda.empty_cache()
    log.info("packed %d layer weight sets (%.2f GiB) in %.1f s", num_sets, pack.nbytes / GiB, time.perf_counter() - t0)
    return pack


__all__ = ["DEFAULT_SEGMENT_BYTES", "LayerFill", "WeightPack", "pack_layer_weights"]
