"""Weight streaming: run a decoder model larger than its GPU budget by streaming layer weights through a ring buffer.

Each decoder layer's parameters are packed once, contiguously and with the same offsets for every layer, into host
memory pinned in large segments (:class:`WeightPack`). On the GPU, a ring of ``k = ring_bytes // layer_bytes`` slots
of one layer each receives them. Per decoder layer ``i`` of a forward (hooks on the layers, installed from outside):

    load_weights(j)   copy stream:    wait slot_free[s]; copy the layer in chunks host -> slot s, one event per chunk
                      (issued for every j <= i + prefetch_depth not issued yet, in layer i's forward pre-hook)
    compute(i)        compute stream: wait the chunk events of layer i; bind its parameters to views of its slot;
                      run the layer; record slot_free[s] (forward hook)

Slots are taken in ring order over the whole sequence of loads (``slot = load_number % k``), so a slot is reused by
the load ``k`` loads later, which waits on the ``slot_free`` event recorded after the previous occupant's compute. A
load is issued only after that event has been recorded on the host, hence ``prefetch_depth <= k - 1``: overlapping a
copy with compute needs ``k >= 2`` (with one slot, layer ``i + 1`` cannot be copied before layer ``i`` is done).
Nothing synchronizes the host per layer; only :meth:`StreamedModel.read_timeline` (when asked) and
:meth:`StreamedModel.remove` (teardown) wait, on an event and on the copy stream respectively.

Without CUDA the same code runs with ordinary CPU tensors, synchronous copies and host-clock events, so CPU tests
exercise slot rotation, chunking and parameter binding.

Budget (:func:`plan_budget`): ring + resident (embeddings, head, final norm) + KV cache + activation headroom +
``reserve_bytes`` (CUDA context and anything else the caller counts) must fit ``budget_bytes``; a budget without room
for one slot raises :class:`StreamingBudgetTooSmall` before anything is pinned, and a pack larger than the host's
available RAM raises :class:`InsufficientHostMemory`, also before pinning.
"""

from __future__ import annotations

import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from djinn_core.errors import ConfigError, DeviceUnavailable, InsufficientHostMemory, StreamingBudgetTooSmall
from djinn_core.models import _rebuild_rotary, build_model, decoder_layers, init_parameters_, resolve_dtype

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
PARAM_ALIGNMENT = 512  # offset of each parameter inside a layer: what the CUDA caching allocator gives a tensor
LAYER_ALIGNMENT = 4096  # a layer's stride in the pack and in the ring (page-aligned DMA sources)
DEFAULT_CHUNK_BYTES = 64 * MiB
DEFAULT_SEGMENT_BYTES = 8 * GiB  # host pack pinned in pieces of at most this many bytes (whole layers each)
DEFAULT_CUDA_RESERVE_BYTES = 1 * GiB  # CUDA context + cuBLAS workspaces, outside what the plan otherwise counts
DEFAULT_HOST_RESERVE_BYTES = 4 * GiB  # host RAM left unpinned for the OS, Python and pageable tensors

LayerFill = Callable[[nn.Module, int], None]  # fill(layer, host_set): write a layer's parameters in place


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive int (bytes or count), got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Policy and budget


@dataclass(frozen=True, kw_only=True)
class StreamingPolicy:
    """How weights are streamed. Validated at construction.

    ``chunk_bytes``: copy granularity inside a layer (one ``copy_`` and one CUDA event per chunk).
    ``ring_bytes``: GPU bytes for weights in flight; the ring holds ``ring_bytes // layer_bytes`` whole-layer slots.
    ``prefetch_depth``: how many layers ahead of the computing one have their copies issued; ``None`` is as deep as the
    ring allows (``slots - 1``); it must be ``<= slots - 1`` (checked when the layer size is known).
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ring_bytes: int
    prefetch_depth: int | None = None

    def __post_init__(self) -> None:
        _positive_int("chunk_bytes", self.chunk_bytes)
        _positive_int("ring_bytes", self.ring_bytes)
        if self.ring_bytes < self.chunk_bytes:
            raise ConfigError(f"ring_bytes ({self.ring_bytes}) is smaller than one chunk ({self.chunk_bytes} bytes): "
                              "the ring must hold at least one whole layer, and a layer at least one chunk")
        if self.prefetch_depth is not None and (
                isinstance(self.prefetch_depth, bool) or not isinstance(self.prefetch_depth, int)
                or self.prefetch_depth < 0):
            raise ConfigError(f"prefetch_depth must be None or an int >= 0, got {self.prefetch_depth!r}")

    def slots(self, layer_bytes: int) -> int:
        """Whole-layer ring slots for layers of ``layer_bytes``; a ring smaller than one layer is a ConfigError."""
        k = self.ring_bytes // _positive_int("layer_bytes", layer_bytes)
        if k < 1:
            raise ConfigError(f"ring_bytes ({self.ring_bytes}) cannot hold one layer ({layer_bytes} bytes); "
                              "one slot streams without overlap, overlap needs >= 2 slots")
        return k

    def depth(self, slots: int) -> int:
        """The prefetch depth used with ``slots`` ring slots (``slots - 1`` unless set lower)."""
        if self.prefetch_depth is None:
            return slots - 1
        if self.prefetch_depth > slots - 1:
            raise ConfigError(f"prefetch_depth {self.prefetch_depth} needs {self.prefetch_depth + 1} ring slots; the "
                              f"ring has {slots} (a load may only reuse a slot whose layer has been computed)")
        return self.prefetch_depth


@dataclass(frozen=True)
class StreamingBudget:
    """A VRAM plan for streaming, in bytes: what stays resident and how many ring slots fit beside it."""

    budget_bytes: int
    layer_bytes: int  # one ring slot (a layer's packed stride)
    resident_bytes: int  # embeddings, head, final norm: stay on the device
    kv_bytes: int  # KV cache for batch x max_tokens, all layers, plus one layer's growth transient
    activation_bytes: int  # conservative estimate for the largest prefill (see activation_bytes())
    reserve_bytes: int  # counted by the caller: CUDA context, workspaces
    slots: int

    @property
    def ring_bytes(self) -> int:
        return self.slots * self.layer_bytes

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + self.ring_bytes

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "ring_bytes": self.ring_bytes, "planned_bytes": self.planned_bytes}


def activation_bytes(config: Any, *, tokens: int, batch: int = 1, dtype: torch.dtype | str = torch.float16,
                     fused_attention: bool = True) -> int:
    """A conservative estimate of the activation bytes of one Llama-family forward over ``batch x tokens``.

    Residual stream and RMSNorm fp32 temporaries, plus the largest of: attention (q/k/v before and after rotary, the
    GQA repeat of k/v, the output; with ``fused_attention=False`` also the explicit scores and fp32 softmax), the MLP
    (gate, up and their product), the head (logits and an fp32 copy). Times 1.25 plus 64 MiB for allocator rounding.
    """
    es = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    _positive_int("tokens", tokens)
    _positive_int("batch", batch)
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    nh = config.num_attention_heads
    kvh = getattr(config, "num_key_value_heads", None) or nh
    hd = getattr(config, "head_dim", None) or h // nh
    t = tokens * batch
    stream = 4 * t * h * es + 3 * t * h * 4
    attn = 2 * t * (nh + 2 * kvh) * hd * es + 2 * t * nh * hd * es + t * nh * hd * es
    if not fused_attention:
        attn += batch * nh * tokens * tokens * (es + 4)
    mlp = 3 * t * inter * es
    head = t * vocab * (es + 4)
    return int(1.25 * (stream + max(attn, mlp, head))) + 64 * MiB


def _kv_bytes(config: Any, *, tokens: int, batch: int, es: int) -> int:
    nh = config.num_attention_heads
    kvh = getattr(config, "num_key_value_heads", None) or nh
    hd = getattr(config, "head_dim", None) or config.hidden_size // nh
    per_layer = 2 * kvh * hd * es * tokens * batch  # (batch, kv_heads, tokens, head_dim), K and V
    return per_layer * (config.num_hidden_layers + 1)  # + one layer's transient while a DynamicCache grows


def _resident_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module outside the decoder layers that directly owns tensors."""
    layer_ids = {id(m) for m in decoder_layers(model).modules()}
    out = []
    for name, mod in model.named_modules():
        if id(mod) in layer_ids:
            continue
        if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
            out.append((name, mod))
    return out


def _resident_param_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for _, mod in _resident_modules(model):
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def plan_budget(
    model: nn.Module,
    budget_bytes: int,
    *,
    max_tokens: int,
    prefill_tokens: int | None = None,
    batch: int = 1,
    reserve_bytes: int = 0,
    max_slots: int | None = None,
    fused_attention: bool = True,
) -> StreamingBudget:
    """Plan a VRAM budget for streaming ``model`` (meta or materialised): as many ring slots as fit.

    Raises :class:`StreamingBudgetTooSmall` (a ConfigError) when not even one slot fits beside the resident weights,
    a KV cache of ``batch x max_tokens``, the activations of a ``prefill_tokens`` (default ``max_tokens``) prefill and
    ``reserve_bytes``. Nothing is allocated.
    """
    _positive_int("budget_bytes", budget_bytes)
    _positive_int("max_tokens", max_tokens)
    if isinstance(reserve_bytes, bool) or not isinstance(reserve_bytes, int) or reserve_bytes < 0:
        raise ConfigError(f"reserve_bytes must be an int >= 0, got {reserve_bytes!r}")
    if max_slots is not None:
        _positive_int("max_slots", max_slots)
    layout = LayerLayout.of(decoder_layers(model)[0])
    config = model.config
    kv = _kv_bytes(config, tokens=max_tokens, batch=batch, es=layout.element_size)
    act = activation_bytes(config, tokens=prefill_tokens or max_tokens, batch=batch, dtype=layout.dtype,
                           fused_attention=fused_attention)
    resident = _resident_param_bytes(model)
    fixed = resident + kv + act + reserve_bytes
    slots = max(0, budget_bytes - fixed) // layout.stride
    if max_slots is not None:
        slots = min(slots, max_slots)
    if slots < 1:
        raise StreamingBudgetTooSmall(
            f"a VRAM budget of {budget_bytes / GiB:.2f} GiB cannot hold one layer ({layout.stride / GiB:.3f} GiB) "
            f"plus resident weights {resident / GiB:.3f} GiB, KV cache {kv / GiB:.3f} GiB "
            f"({batch}x{max_tokens} tokens), activations {act / GiB:.3f} GiB and reserve {reserve_bytes / GiB:.3f} GiB; "
            f"it needs at least {(fixed + layout.stride) / GiB:.2f} GiB (>= 2 slots, "
            f"{(fixed + 2 * layout.stride) / GiB:.2f} GiB, to overlap copies with compute)")
    plan = StreamingBudget(budget_bytes, layout.stride, resident, kv, act, reserve_bytes, slots)
    log.info("streaming budget %.2f GiB: %d ring slots of %.3f GiB, resident %.3f, KV %.3f, activations %.3f, "
             "reserve %.3f GiB", budget_bytes / GiB, slots, layout.stride / GiB, resident / GiB, kv / GiB, act / GiB,
             reserve_bytes / GiB)
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Layer layout and the host pack


@dataclass(frozen=True)
class ParamEntry:
    """One parameter of a decoder layer inside its packed bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class LayerLayout:
    """Byte layout of one decoder layer's parameters, identical for every layer of a model.

    ``used_bytes``: end of the last parameter (the bytes copied per layer); ``stride``: bytes a layer occupies in the
    pack and in a ring slot (``used_bytes`` rounded up to 4 KiB). Parameters sit at 512-byte-aligned offsets, in the
    layer's ``named_parameters`` order.
    """

    entries: tuple[ParamEntry, ...]
    used_bytes: int
    stride: int

    @classmethod
    def of(cls, layer: nn.Module) -> "LayerLayout":
        entries = []
        offset = 0
        for name, p in layer.named_parameters():
            offset = _round_up(offset, PARAM_ALIGNMENT)
            nbytes = p.numel() * p.element_size()
            entries.append(ParamEntry(name, tuple(p.shape), p.dtype, offset, nbytes))
            offset += nbytes
        if not entries:
            raise ConfigError(f"{type(layer).__name__} has no parameters to stream")
        for name, b in layer.named_buffers():
            if b.is_meta:
                raise ConfigError(f"decoder-layer buffer {name} is on the meta device; layer buffers are not streamed")
        return cls(tuple(entries), offset, _round_up(offset, LAYER_ALIGNMENT))

    @property
    def param_bytes(self) -> int:
        """Weight bytes of one layer (without alignment padding): what a bandwidth figure should count."""
        return sum(e.nbytes for e in self.entries)

    @property
    def dtype(self) -> torch.dtype:
        return self.entries[0].dtype

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def signature(self) -> tuple:
        return tuple((e.name, e.shape, e.dtype, e.offset) for e in self.entries)

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of each parameter inside ``buf`` (a uint8 tensor of at least ``used_bytes``), in order."""
        return [buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]

    def chunks(self, chunk_bytes: int) -> tuple[tuple[int, int], ...]:
        """Byte ranges ``[start, stop)`` covering ``used_bytes`` in pieces of at most ``chunk_bytes``."""
        _positive_int("chunk_bytes", chunk_bytes)
        return tuple((a, min(a + chunk_bytes, self.used_bytes)) for a in range(0, self.used_bytes, chunk_bytes))


def check_host_memory(nbytes: int, *, reserve_bytes: int = DEFAULT_HOST_RESERVE_BYTES) -> None:
    """Raise :class:`InsufficientHostMemory` unless ``nbytes`` fit in available host RAM minus ``reserve_bytes``."""
    avail = psutil.virtual_memory().available
    if nbytes + reserve_bytes > avail:
        raise InsufficientHostMemory(
            f"packing {nbytes / GiB:.2f} GiB of layer weights needs that much host RAM plus a reserve of "
            f"{reserve_bytes / GiB:.2f} GiB; only {avail / GiB:.2f} GiB are available (nothing was pinned)")


def _swap_parameters(layer: nn.Module, tensors: Sequence[torch.Tensor]) -> dict[str, nn.Parameter]:
    """Replace ``layer``'s parameters (in ``named_parameters`` order) by Parameters over ``tensors``; return the
    originals by qualified name, for :func:`_restore_parameters`."""
    originals = {}
    for (name, p), t in zip(list(layer.named_parameters()), tensors):
        owner_name, _, attr = name.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        originals[name] = p
        owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
    return originals


def _restore_parameters(layer: nn.Module, originals: dict[str, nn.Parameter]) -> None:
    for name, p in originals.items():
        owner_name, _, attr = name.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        owner._parameters[attr] = p


def _register_host(t: torch.Tensor, registered: list[int]) -> None:
    """Page-lock ``t``'s bytes in place (cudaHostRegister: pinned exactly, unlike the power-of-two caching host
    allocator) and append its address to ``registered``."""
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
    stream reading it must wait on it first (:class:`StreamedModel` does).
    """

    def __init__(self, layout: LayerLayout, num_sets: int, *, pin: bool,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, progress: bool = True):
        _positive_int("num_sets", num_sets)
        _positive_int("segment_bytes", segment_bytes)
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
            # cudaHostRegister releases the GIL: pin segments from a few threads (page faults run in parallel)
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
        """Unpin and free the pack. Every :class:`StreamedModel` reading it must have been removed first."""
        self._finalizer()
        self._segments = None  # type: ignore[assignment]


def pack_layer_weights(
    model: nn.Module,
    *,
    device: torch.device | str,
    fill: LayerFill | None = None,
    num_sets: int | None = None,
    pin: bool | None = None,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    host_reserve_bytes: int = DEFAULT_HOST_RESERVE_BYTES,
    progress: bool = True,
) -> WeightPack:
    """Pack the weights of ``model``'s first ``num_sets`` decoder layers (default: all) into host memory.

    With ``fill=None`` the layers' own parameters are copied (they must not be on ``meta``). With ``fill``, each layer
    is materialised on ``device`` (a GPU staging slot, or the pack itself on a CPU) and ``fill(layer, index)`` writes
    its parameters in place -- e.g. ``init_parameters_(layer, seed, prefix=f"model.layers.{index}.")`` -- then it is
    copied device-to-host into the pack on the current stream. The model's own parameters are left as they were.
    Host RAM is checked (:class:`InsufficientHostMemory`) before anything is pinned. ``pin`` defaults to
    ``device`` being CUDA.
    """
    device = torch.device(device)
    layers = decoder_layers(model)
    num_sets = len(layers) if num_sets is None else _positive_int("num_sets", num_sets)
    if num_sets > len(layers):
        raise ConfigError(f"num_sets {num_sets} > {len(layers)} decoder layers to take weights from")
    layout = LayerLayout.of(layers[0])
    for i in range(1, num_sets):
        if LayerLayout.of(layers[i]).signature() != layout.signature():
            raise ConfigError(f"decoder layer {i} has another parameter layout than layer 0: cannot share a ring")
    pin = device.type == "cuda" if pin is None else bool(pin)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("packing weights for a CUDA device needs a CUDA GPU; none is available")
    check_host_memory(num_sets * layout.stride, reserve_bytes=host_reserve_bytes)
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
            originals = _swap_parameters(layer, layout.views(target))
            try:
                fill(layer, i)
            finally:
                _restore_parameters(layer, originals)
            if staging is not None:  # D2H on the current stream; the next fill overwrites staging after it
                dst.copy_(staging[:layout.used_bytes], non_blocking=pack.pinned)
    if torch.cuda.is_available() and (staging is not None or pack.pinned):
        pack.ready_event = torch.cuda.Event()
        pack.ready_event.record(torch.cuda.current_stream(device if device.type == "cuda" else None))
    log.info("packed %d layer weight sets (%.2f GiB) in %.1f s", num_sets, pack.nbytes / GiB, time.perf_counter() - t0)
    return pack


# ---------------------------------------------------------------------------------------------------------------
# The streamed model


class _HostEvent:
    """CPU stand-in for a CUDA event: records the host clock; waiting is a no-op (CPU copies are synchronous)."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t: float | None = None

    def record(self, stream: Any = None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_HostEvent") -> float:
        if self.t is None or end.t is None:
            raise ConfigError("event not recorded")
        return (end.t - self.t) * 1e3


@dataclass
class _LayerMarks:
    layer: int
    host_set: int
    slot: int
    copy_start: Any
    copy_end: Any
    compute_start: Any = None
    compute_end: Any = None


@dataclass
class _Pass:
    """State of one pass over the layers (one forward): which slot each issued layer occupies."""

    slot_of: dict[int, int] = field(default_factory=dict)
    issued_through: int = -1
    origin: Any = None
    marks: dict[int, _LayerMarks] = field(default_factory=dict)


class StreamedModel:
    """Wraps a Hugging Face decoder model so its layers' weights stream from a :class:`WeightPack` through a ring.

    The model's non-layer modules (embeddings, head, final norm, rotary) must already be on ``device`` (see
    :func:`place_resident_`); its decoder layers may be on ``meta``: while wrapped, their parameters are Parameters
    on ``device`` whose ``.data`` is rebound to ring-slot views before each layer runs. Layer ``i`` streams host weight
    set ``layer_sets[i]`` (default ``i``; a set may serve several layers). Call the model as usual, or this object.
    :meth:`remove` takes the hooks off and restores the original parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        pack: WeightPack,
        policy: StreamingPolicy,
        *,
        device: torch.device | str,
        layer_sets: Sequence[int] | None = None,
        budget: StreamingBudget | None = None,
        record_timeline: bool = False,
        owns_pack: bool = False,
    ):
        if not isinstance(policy, StreamingPolicy):
            raise ConfigError(f"policy must be a StreamingPolicy, got {type(policy).__name__}")
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        if self._cuda and not torch.cuda.is_available():
            raise DeviceUnavailable("streaming to a CUDA device needs a CUDA GPU; none is available")
        if self._cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self._cuda and not pack.pinned:
            log.warning("streaming from an unpinned pack: copies are staged by the driver and not asynchronous")
        self.model = model
        self.pack = pack
        self.policy = policy
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        layout = pack.layout
        for i, layer in enumerate(self.layers):
            if LayerLayout.of(layer).signature() != layout.signature():
                raise ConfigError(f"decoder layer {i} does not match the weight pack's layout")
        self.layout = layout
        sets = list(range(self.num_layers)) if layer_sets is None else [int(s) for s in layer_sets]
        if len(sets) != self.num_layers:
            raise ConfigError(f"layer_sets has {len(sets)} entries for {self.num_layers} decoder layers")
        bad = [s for s in sets if not 0 <= s < pack.num_sets]
        if bad:
            raise ConfigError(f"layer_sets name weight sets {bad[:5]} outside the pack's 0..{pack.num_sets - 1}")
        self.layer_sets = tuple(sets)
        self.slots = policy.slots(layout.stride)
        self.depth = policy.depth(self.slots)
        if budget is not None and self.slots * layout.stride > budget.ring_bytes:
            raise StreamingBudgetTooSmall(
                f"a ring of {self.slots} slots ({self.slots * layout.stride / GiB:.2f} GiB) exceeds the budget's ring "
                f"allowance of {budget.ring_bytes / GiB:.2f} GiB ({budget.slots} slots)")
        if self.slots < 2:
            log.warning("one ring slot: every layer's copy waits for the previous layer's compute (no overlap)")
        self.chunks = layout.chunks(policy.chunk_bytes)
        self.budget = budget
        self.record_timeline = bool(record_timeline)
        self._owns_pack = owns_pack

        # ring: k slots of one layer each (allocated on the current stream, written by the copy stream)
        self.ring = torch.empty(self.slots * layout.stride, dtype=torch.uint8, device=self.device)
        slot_bufs = [self.ring[s * layout.stride:(s + 1) * layout.stride] for s in range(self.slots)]
        self._slot_views = [layout.views(b) for b in slot_bufs]
        self._slot_chunks = [[b[a:z] for a, z in self.chunks] for b in slot_bufs]
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        if self._cuda:
            self.ring.record_stream(self._copy_stream)
        self._chunk_events = [[self._event() for _ in self.chunks] for _ in range(self.slots)]
        self._slot_free = [self._event() for _ in range(self.slots)]
        self._waited_for_pack = False
        self._next_slot = 0
        self._expect = 0
        self._pass = _Pass()
        self._last_marks: dict[int, _LayerMarks] | None = None
        self._last_origin: Any = None
        self.bytes_streamed = 0  # bytes of copies issued (host -> ring), counted on the host
        self.layers_streamed = 0
        self.passes = 0

        # the layers' parameters become device Parameters bound to slot views; the originals are kept to restore
        self._originals: list[dict[str, nn.Parameter]] = []
        self._params: list[list[nn.Parameter]] = []
        self._hooks = []
        for i, layer in enumerate(self.layers):
            self._originals.append(_swap_parameters(layer, self._slot_views[i % self.slots]))
            self._params.append([p for _, p in layer.named_parameters()])
            self._hooks.append(layer.register_forward_pre_hook(partial(self._before_layer, i)))
            self._hooks.append(layer.register_forward_hook(partial(self._after_layer, i), always_call=True))
        log.info("streaming %d layers (%d weight sets, %.3f GiB each) through %d slots (%.2f GiB), %d chunks of <= "
                 "%.0f MiB per layer, prefetch depth %d", self.num_layers, pack.num_sets, layout.stride / GiB,
                 self.slots, self.ring_bytes / GiB, len(self.chunks), policy.chunk_bytes / MiB, self.depth)

    # -- small device helpers ------------------------------------------------------------------------------------
    def _event(self, timing: bool = False) -> Any:
        return torch.cuda.Event(enable_timing=timing) if self._cuda else _HostEvent()

    def _compute_stream(self) -> Any:
        return torch.cuda.current_stream(self.device) if self._cuda else None

    @property
    def ring_bytes(self) -> int:
        return self.ring.numel() if self.ring is not None else 0

    @property
    def bytes_per_pass(self) -> int:
        """Weight bytes (without padding) streamed by one full forward: layers x layer parameter bytes."""
        return self.num_layers * self.layout.param_bytes

    # -- the per-layer steps ---------------------------------------------------------------------------------------
    def _load_weights(self, j: int) -> None:
        """Issue layer ``j``'s copy into the next ring slot, on the copy stream, one event per chunk."""
        s = self._next_slot
        self._next_slot = (s + 1) % self.slots
        self._pass.slot_of[j] = s
        self._pass.issued_through = j
        host = self.pack.layer(self.layer_sets[j])
        copy_stream = self._copy_stream
        with torch.cuda.stream(copy_stream) if self._cuda else nullcontext():
            if self._cuda:
                if not self._waited_for_pack and self.pack.ready_event is not None:
                    copy_stream.wait_event(self.pack.ready_event)
                    self._waited_for_pack = True
                copy_stream.wait_event(self._slot_free[s])  # the previous occupant's compute is done
            marks = None
            if self.record_timeline:
                marks = _LayerMarks(j, self.layer_sets[j], s, self._event(True), self._event(True))
                marks.copy_start.record(copy_stream)
                self._pass.marks[j] = marks
            for (a, z), dst, ev in zip(self.chunks, self._slot_chunks[s], self._chunk_events[s]):
                dst.copy_(host[a:z], non_blocking=self._cuda)
                ev.record(copy_stream)
            if marks is not None:
                marks.copy_end.record(copy_stream)
        self.bytes_streamed += self.layout.used_bytes
        self.layers_streamed += 1

    def _begin_pass(self, i: int) -> None:
        self._pass = _Pass(issued_through=i - 1)
        self.passes += 1
        if self.record_timeline:
            self._pass.origin = self._event(True)
            self._pass.origin.record(self._compute_stream())

    def _before_layer(self, i: int, module: nn.Module, args: Any) -> None:
        if i == 0 or i != self._expect:
            self._begin_pass(i)
        self._expect = i + 1
        last = min(i + self.depth, self.num_layers - 1)
        while self._pass.issued_through < last:
            self._load_weights(self._pass.issued_through + 1)
        slot = self._pass.slot_of[i]
        stream = self._compute_stream()
        if stream is not None:
            for ev in self._chunk_events[slot]:
                stream.wait_event(ev)
        marks = self._pass.marks.get(i)
        if marks is not None:
            marks.compute_start = self._event(True)
            marks.compute_start.record(stream)
        for p, view in zip(self._params[i], self._slot_views[slot]):
            p.data = view

    def _after_layer(self, i: int, module: nn.Module, args: Any, output: Any) -> None:
        slot = self._pass.slot_of.get(i)
        if slot is None:
            return
        stream = self._compute_stream()
        self._slot_free[slot].record(stream)
        marks = self._pass.marks.get(i)
        if marks is not None:
            marks.compute_end = self._event(True)
            marks.compute_end.record(stream)
        if i == self.num_layers - 1:
            self._last_marks, self._last_origin = self._pass.marks, self._pass.origin

    # -- public ----------------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def read_timeline(self) -> list[dict[str, Any]]:
        """Per-layer copy and compute intervals of the last complete forward, in ms from its start on the compute
        stream (needs ``record_timeline=True``). Blocks until that forward's last event has completed."""
        if not self.record_timeline:
            raise ConfigError("construct the StreamedModel with record_timeline=True to read a timeline")
        if not self._last_marks:
            raise ConfigError("no complete forward has been recorded yet")
        marks = [self._last_marks[i] for i in sorted(self._last_marks)]
        for m in marks:  # copy_end follows the last chunk event that compute waited on: wait for each too
            m.copy_end.synchronize()
            if m.compute_end is not None:
                m.compute_end.synchronize()
        origin = self._last_origin
        rows = []
        for m in marks:
            row = {"layer": m.layer, "host_set": m.host_set, "slot": m.slot,
                   "copy_start_ms": origin.elapsed_time(m.copy_start), "copy_end_ms": origin.elapsed_time(m.copy_end),
                   "compute_start_ms": None, "compute_end_ms": None}
            if m.compute_end is not None:
                row["compute_start_ms"] = origin.elapsed_time(m.compute_start)
                row["compute_end_ms"] = origin.elapsed_time(m.compute_end)
            rows.append(row)
        return rows

    def stats(self) -> dict[str, Any]:
        return {"layers": self.num_layers, "weight_sets": self.pack.num_sets, "layer_bytes": self.layout.stride,
                "layer_param_bytes": self.layout.param_bytes, "slots": self.slots, "ring_bytes": self.ring_bytes,
                "chunk_bytes": self.policy.chunk_bytes, "chunks_per_layer": len(self.chunks),
                "prefetch_depth": self.depth, "bytes_streamed": self.bytes_streamed,
                "layers_streamed": self.layers_streamed, "passes": self.passes,
                "budget": self.budget.to_dict() if self.budget else None}

    def remove(self) -> nn.Module:
        """Take the hooks off, restore the layers' original parameters and free the ring; returns the model.

        Teardown only: waits for the copy stream, so no copy still writes the ring or reads the pack afterwards.
        """
        if self.ring is None:
            return self.model
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for layer, originals in zip(self.layers, self._originals):
            _restore_parameters(layer, originals)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        self._params = []
        self._slot_views = []
        self._slot_chunks = []
        self.ring = None  # type: ignore[assignment]
        if self._owns_pack:
            self.pack.release()
        return self.model

    def __enter__(self) -> "StreamedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# ---------------------------------------------------------------------------------------------------------------
# Building a streamed model from an architecture


def place_resident_(model: nn.Module, device: torch.device | str, *, seed: int | None = None) -> int:
    """Put everything outside the decoder layers (embeddings, head, final norm, rotary) on ``device``.

    Parameters on ``meta`` are materialised and filled with :func:`init_parameters_` under ``seed`` (as
    ``build_model`` would); others are moved. Returns the resident parameter bytes.
    """
    device = torch.device(device)
    rebuild_rotary = False
    with torch.no_grad():
        for name, mod in _resident_modules(model):
            prefix = f"{name}." if name else ""
            fresh = [p for p in mod.parameters(recurse=False) if p.is_meta]
            if fresh:
                if seed is None:
                    raise ConfigError(f"{name} has parameters on meta: pass seed= to materialise them")
                if any(True for _ in mod.children()) and any(True for c in mod.children() for _ in c.parameters()):
                    raise ConfigError(f"{name} owns parameters and has children with parameters: unsupported")
                mod.to_empty(device=device, recurse=False)
                init_parameters_(mod, seed, prefix=prefix)
            else:
                for attr, p in list(mod._parameters.items()):
                    if p is not None and p.device != device:
                        mod._parameters[attr] = nn.Parameter(p.detach().to(device), requires_grad=False)
            for attr, b in list(mod._buffers.items()):
                if b is None:
                    continue
                if b.is_meta:
                    if not type(mod).__name__.endswith("RotaryEmbedding"):
                        raise ConfigError(f"buffer {prefix}{attr} is on meta and is not a rotary table")
                    rebuild_rotary = True
                elif b.device != device:
                    mod._buffers[attr] = b.to(device)
    if rebuild_rotary:
        _rebuild_rotary(model, device)
    return _resident_param_bytes(model)


def build_streamed_model(
    config: Any,
    *,
    budget_bytes: int,
    device: torch.device | str = "cuda",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prefetch_depth: int | None = None,
    policy: StreamingPolicy | None = None,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float16,
    num_layers: int | None = None,
    host_sets: int | None = None,
    batch: int = 1,
    max_tokens: int = 2048,
    prefill_tokens: int | None = None,
    reserve_bytes: int | None = None,
    max_slots: int | None = None,
    host_reserve_bytes: int = DEFAULT_HOST_RESERVE_BYTES,
    record_timeline: bool = False,
    progress: bool = True,
) -> StreamedModel:
    """Build an architecture (name or config) with seeded random weights, streamed under ``budget_bytes`` of VRAM.

    Checks, in order and before pinning anything: the budget (:class:`StreamingBudgetTooSmall`), the policy against
    the layer size (``ConfigError``), the host RAM for the pack (:class:`InsufficientHostMemory`). Then pins and fills
    the pack (layers materialised on ``device`` with ``init_parameters_`` and copied to the host), materialises the
    resident modules on ``device``, and wraps. The weights are bit-identical to ``build_model(config, device=device,
    seed=seed)``. ``host_sets`` packs fewer distinct weight sets than layers; layer ``i`` then streams set
    ``i % host_sets`` (a deeper model from a smaller host). ``policy`` defaults to the plan's whole ring with
    ``chunk_bytes``/``prefetch_depth``; ``reserve_bytes`` defaults to 1 GiB on CUDA (context, workspaces), 0 on CPU.
    """
    device = torch.device(device)
    model = build_model(config, dtype=dtype, num_layers=num_layers, materialize=False)
    if reserve_bytes is None:
        reserve_bytes = DEFAULT_CUDA_RESERVE_BYTES if device.type == "cuda" else 0
    plan = plan_budget(model, budget_bytes, max_tokens=max_tokens, prefill_tokens=prefill_tokens, batch=batch,
                       reserve_bytes=reserve_bytes, max_slots=max_slots, fused_attention=device.type == "cuda")
    if policy is None:
        policy = StreamingPolicy(chunk_bytes=min(chunk_bytes, plan.ring_bytes), ring_bytes=plan.ring_bytes,
                                 prefetch_depth=prefetch_depth)
    slots = policy.slots(plan.layer_bytes)
    policy.depth(slots)
    if slots * plan.layer_bytes > plan.ring_bytes:
        raise StreamingBudgetTooSmall(f"the policy's ring ({slots} slots, {slots * plan.layer_bytes / GiB:.2f} GiB) "
                                      f"exceeds the budget's ring allowance ({plan.ring_bytes / GiB:.2f} GiB)")
    n_layers = len(decoder_layers(model))
    n_sets = n_layers if host_sets is None else _positive_int("host_sets", host_sets)
    if n_sets > n_layers:
        raise ConfigError(f"host_sets {n_sets} > {n_layers} layers")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("build_streamed_model(device='cuda') needs a CUDA GPU; none is available")
    fill = partial(_init_layer, seed)
    pack = pack_layer_weights(model, device=device, fill=fill, num_sets=n_sets, host_reserve_bytes=host_reserve_bytes,
                              progress=progress)
    try:
        place_resident_(model, device, seed=seed)
        return StreamedModel(model, pack, policy, device=device, layer_sets=[i % n_sets for i in range(n_layers)],
                             budget=plan, record_timeline=record_timeline, owns_pack=True)
    except BaseException:
        pack.release()
        raise


def _init_layer(seed: int, layer: nn.Module, index: int) -> None:
    init_parameters_(layer, seed, prefix=f"model.layers.{index}.")


def oversubscription(model_weight_bytes: int, budget_bytes: int) -> float:
    """How many times the model's weights exceed the VRAM budget."""
    return _positive_int("model_weight_bytes", model_weight_bytes) / _positive_int("budget_bytes", budget_bytes)


__all__ = [
    "DEFAULT_CHUNK_BYTES", "LayerLayout", "ParamEntry", "StreamedModel", "StreamingBudget", "StreamingPolicy",
    "WeightPack", "activation_bytes", "build_streamed_model", "check_host_memory", "oversubscription",
    "pack_layer_weights", "place_resident_", "plan_budget",
]
