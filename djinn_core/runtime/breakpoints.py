"""Breakpoint sessions: pause a forward pass at decoder layer L, read or edit the hidden state, resume from L.

The model is wrapped from outside; no model code is copied.

* ``run_to(L)`` runs the model's own ``forward`` over the prompt with a removable forward *pre*-hook on decoder layer
  L (on the final norm for ``L == num_layers``). The hook captures layer L's input ``(hidden_states, kwargs)`` and
  raises a private exception that aborts the forward, so layers ``0..L-1`` have written their KV into the session's
  :class:`~djinn_core.runtime.kv_cache.SlabKVCache` and nothing after L ran. The hook is removed in ``finally``.
* ``resume()`` replays ``layers[L:]`` by calling each decoder layer module with the captured kwargs (the session's
  cache substituted), then ``model.model.norm`` and ``model.lm_head`` -- what the Llama/Mistral/Qwen2 causal-LM
  forward does after its layer loop, with full logits (``logits_to_keep=0``). ``generate(n)`` then decodes greedily
  with ordinary ``model(token, past_key_values=cache)`` calls, on CUDA with each layer's norms, MLP and rotary
  embedding replayed as CUDA graphs (:mod:`djinn_core.runtime.decode_graphs`: the same kernels, fewer launches).
* ``pause()`` swaps the checkpoint to the host pool through the :class:`~djinn_core.memory.swap.SwapEngine`: the "head"
  (one allocation packing the hidden state and the captured kwargs tensors), then the KV of layers ``0..L-1``
  (``kv.<i>``, one slab allocation per layer holding K and V). Their slab memory returns to the slab, fenced by the
  swap's last copy. Before freeing anything it keeps one spare slab buffer of the head's size for the runtime.
* A resume brings back the head first: into that spare buffer when the size matches, with one copy on the current
  (compute) stream after its waits (:meth:`~djinn_core.memory.swap.SwapEngine.swap_in_into`), else into a new allocation
  with one copy on the in stream that the current stream then waits for
  (:meth:`~djinn_core.memory.swap.SwapEngine.swap_in_now`). The KV copies follow in layer order on the in stream. Each
  restored cache layer carries a one-shot wait on its own copy's event, run inside
  ``SlabKVLayer.update`` just before that layer's K/V are first used (the first decode step), so the KV restore
  overlaps the continuation's compute and a layer waits for nothing but its own bytes. (This wait is per cache,
  not a hook on the shared model, so two resumed sessions never consume each other's waits.)
* ``fork(n)`` gives n sessions at the same checkpoint, each with its own copy of the hidden state and the KV of
  layers ``0..L-1`` shared copy-on-write (a fork copies a shared layer's prefix into its own block at its first
  write to it).

Streams: all compute and device-to-device copies run on the current stream of the model's device; copies to and from
the host run on the swap engine's side streams, ordered by events. Nothing here calls ``torch.cuda.synchronize()``.
On a CPU model the same code runs with synchronous copies.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from djinn_core.errors import (
    AdmissionRefused,
    CheckpointStateError,
    ConfigError,
    InvalidEdit,
    InvalidLayer,
    SlabExhausted,
    UnknownSession,
)
from djinn_core.runtime.decode_graphs import DecodeGraphs
from djinn_core.memory.host_pool import HostPool
from djinn_core.runtime.kv_cache import KVBlock, KVGeometry, KVHandle, SlabKVCache
from djinn_core.models import decoder_layers, exact_attention
from djinn_core.memory.slab import Slab, SlabTensor, event_pending
from djinn_core.memory.swap import ResidentState, SwapEngine, SwappedState

log = logging.getLogger(__name__)

HIDDEN = "hidden"
HEAD = "head"  # the swap item holding the packed hidden state and layer kwargs
_HEAD_ALIGN = 256  # bytes: every packed tensor starts on this boundary
DEFAULT_HEADROOM_BYTES = 4 << 30  # device memory left outside the slab for activations (default sizing only)


class _StopAtBreakpoint(Exception):
    """Raised by the capture hook to abort the model's forward at the breakpoint (never escapes this module)."""


class SessionState(enum.Enum):
    """Where a session is in its life."""

    OPEN = "open"  # prompt set, nothing computed
    CHECKPOINT = "checkpoint"  # stopped before layer L, state resident: readable, editable, forkable
    PAUSED = "paused"  # checkpoint state on the host
    RUNNING = "running"  # resumed: past layer L, decoding (resident; evictable while no call runs on it)
    SWAPPED = "swapped"  # a decoding session's KV on the host (paused between decode steps, or evicted)
    CLOSED = "closed"  # memory released


# -------------------------------------------------------------------------------------------------------------------
# Capturing and replaying layer L's call, without model code


def model_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family causal LM; raises ConfigError for anything else."""
    layers = decoder_layers(model)
    for attr in ("norm",):
        if not isinstance(getattr(model.model, attr, None), nn.Module):
            raise ConfigError(f"{type(model).__name__}.model has no {attr}: not a Llama-family decoder")
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        raise ConfigError(f"{type(model).__name__} has no lm_head: not a causal LM")
    layer_types = getattr(model.config, "layer_types", None) or []
    if len(set(layer_types)) > 1:
        raise ConfigError(f"mixed layer types {sorted(set(layer_types))} (e.g. alternating sliding windows) are not "
                          "supported: the replay reuses layer L's attention mask for every later layer")
    return layers


def breakpoint_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose input is the hidden state "before layer ``layer``" (the final norm for ``num_layers``)."""
    layers = model_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= len(layers):
        raise InvalidLayer(f"layer must be an int in 0..{len(layers)} (num_layers = after the last layer), "
                           f"got {layer!r}")
    return model.model.norm if layer == len(layers) else layers[layer]


@dataclass
class Captured:
    """Layer L's input as the model's forward passed it: ``hidden`` (batch, seq, hidden) and the keyword args."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


@torch.no_grad()
def capture_at(model: nn.Module, input_ids: torch.Tensor, cache: Any, layer: int) -> Captured:
    """Run ``model`` on ``input_ids`` with ``cache`` and stop before ``layer``; layers ``0..layer-1`` fill ``cache``.

    Uses a forward pre-hook on the breakpoint module, removed before returning (also on error).
    """
    target = breakpoint_module(model, layer)
    box: list[Captured] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        box.append(Captured(hidden, dict(kwargs)))
        raise _StopAtBreakpoint

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids, past_key_values=cache, use_cache=True)
    except _StopAtBreakpoint:
        pass
    finally:
        handle.remove()
    if not box:  # pragma: no cover - the forward always reaches the breakpoint module
        raise CheckpointStateError(f"the forward never reached layer {layer}")
    return box[0]


def _layer_output(out: Any) -> torch.Tensor:
    """A decoder layer returns a tensor in transformers 5.x; older ones return a tuple whose first item is it."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def replay_from(model: nn.Module, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any] | None,
                layers: nn.ModuleList | None = None) -> torch.Tensor:
    """Run ``layers[layer:]``, the final norm and the LM head on ``hidden``; return full logits (batch, seq, vocab).

    ``kwargs`` (the layers' call arguments) may be None when no layer is left; ``layers``: the model's decoder
    layers, if the caller has them (default: looked up and checked)."""
    layers = model_layers(model) if layers is None else layers
    for i in range(layer, len(layers)):
        hidden = _layer_output(layers[i](hidden, **kwargs))
    hidden = model.model.norm(hidden)
    return model.lm_head(hidden)


# -------------------------------------------------------------------------------------------------------------------
# Reference: an uninterrupted run, optionally with a plain forward pre-hook doing an edit


@torch.no_grad()
def plain_run(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    cache: Any = None,
    layer: int | None = None,
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The uninterrupted reference: prefill + greedy decoding with plain HF forwards.

    With ``edit``, a plain forward pre-hook on the breakpoint module of ``layer`` replaces its input by
    ``edit(hidden)`` during the prefill only. Returns ``(prompt_logits (batch, seq, vocab), tokens (batch, n),
    step_logits (batch, n, vocab))`` where ``step_logits[:, k]`` are the logits that chose ``tokens[:, k]``.
    ``cache``: any transformers Cache (default: a ``DynamicCache``).
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if cache is None else cache
    handle = None
    if edit is not None:
        target = breakpoint_module(model, layer)

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            return (edit(args[0]), *args[1:]), kwargs

        handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        prompt_logits = model(input_ids, past_key_values=cache, use_cache=True).logits
    finally:
        if handle is not None:
            handle.remove()
    tokens, steps = _greedy(model, cache, prompt_logits[:, -1], max_new_tokens)
    return prompt_logits, tokens, steps


def decode_step(model: nn.Module, cache: Any, tokens: torch.Tensor) -> torch.Tensor:
    """One decoding forward of ``tokens`` (batch, s) on ``cache``; returns the last position's logits (batch, vocab).

    Runs under ``torch.inference_mode``: the same kernels as ``no_grad`` (bitwise equal results) with less host work
    per operator. A decode step of a large model is bound by that host work (a Llama layer calls about 65 operators
    per step), and a resume's first step runs it while the restore's copies load the host.
    The logits are an inference tensor: read it, or clone it before an in-place edit outside inference mode.
    """
    with torch.inference_mode():
        return model(tokens, past_key_values=cache, use_cache=True).logits[:, -1]


def _greedy(model: nn.Module, cache: Any, logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` greedy tokens starting from ``logits`` (batch, vocab) of the last position; returns (tokens, logits)."""
    toks: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    for k in range(n):
        steps.append(logits)
        tok = logits.argmax(-1, keepdim=True)  # (batch, 1)
        toks.append(tok)
        if k + 1 < n:
            logits = decode_step(model, cache, tok)
    if not toks:
        b = logits.shape[0]
        return (torch.empty(b, 0, dtype=torch.long, device=logits.device),
                torch.empty(b, 0, logits.shape[-1], dtype=logits.dtype, device=logits.device))
    return torch.cat(toks, 1), torch.stack(steps, 1)


# -------------------------------------------------------------------------------------------------------------------
# Captured kwargs <-> named slab items


def _flatten_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split layer kwargs into tensors named ``arg.<key>`` / ``arg.<key>.<i>`` and a template for the rest."""
    tensors: dict[str, torch.Tensor] = {}
    template: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "past_key_values":
            template[key] = None  # substituted by the session's own cache at replay
        elif isinstance(value, torch.Tensor):
            tensors[f"arg.{key}"] = value
            template[key] = ("tensor", f"arg.{key}")
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            names = [f"arg.{key}.{i}" for i in range(len(value))]
            tensors.update(zip(names, value))
            template[key] = ("tensors", type(value), names)
        else:
            template[key] = ("value", value)
    return tensors, template


def _rebuild_kwargs(template: dict[str, Any], tensors: dict[str, torch.Tensor], cache: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, spec in template.items():
        if key == "past_key_values":
            out[key] = cache
        elif spec[0] == "tensor":
            out[key] = tensors[spec[1]]
        elif spec[0] == "tensors":
            out[key] = spec[1](tensors[n] for n in spec[2])
        else:
            out[key] = spec[1]
    return out


# -------------------------------------------------------------------------------------------------------------------
# Sessions


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic collector off for a short critical section (restored as it was, also on error)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


_Layout = dict[str, tuple[int, int, tuple[int, ...], torch.dtype]]  # name -> (byte offset, nbytes, shape, dtype)


class _PackedHead:
    """A checkpoint's head -- the hidden state first, then the captured layer kwargs tensors -- in one slab
    allocation (uint8), so a pause moves it as one item and a restore brings it back with one copy, before anything
    else."""

    def __init__(self, buf: SlabTensor, layout: _Layout):
        self.buf = buf
        self.layout = layout

    @staticmethod
    def plan(tensors: dict[str, torch.Tensor]) -> tuple[_Layout, int]:
        """(layout, total bytes) packing ``tensors`` in order, each aligned to ``_HEAD_ALIGN`` bytes."""
        layout, off = {}, 0
        for name, t in tensors.items():
            off = -(-off // _HEAD_ALIGN) * _HEAD_ALIGN
            nbytes = t.numel() * t.element_size()
            layout[name] = (off, nbytes, tuple(t.shape), t.dtype)
            off += nbytes
        return layout, max(off, 1)

    def _slice(self, raw: torch.Tensor, name: str) -> torch.Tensor:
        off, n, shape, dtype = self.layout[name]
        return raw[off: off + n].view(dtype).view(shape)

    def view(self, name: str) -> torch.Tensor:
        return self._slice(self.buf.view(), name)

    def views(self) -> dict[str, torch.Tensor]:
        raw = self.buf.view()
        return {name: self._slice(raw, name) for name in self.layout}

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes


class _SlabKVAllocator:
    """KV blocks of one session, from the runtime's slab."""

    def __init__(self, runtime: "BreakpointRuntime", session_id: int):
        self.runtime = runtime
        self.session_id = session_id

    def allocate_kv(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> KVHandle:
        return self.runtime._allocate(self.session_id, name, shape, dtype)

    def free_kv(self, handle: KVHandle) -> None:
        if isinstance(handle, SlabTensor) and handle.alive:
            self.runtime.slab.free(handle)


class Checkpoint:
    """A session stopped before layer ``layer``. ``hidden`` is the live state (batch, seq, hidden), editable in place.

    A view taken from ``hidden`` is valid until the next slab allocation (the slab may compact): read it again
    rather than keeping it.
    """

    def __init__(self, session: "BreakpointSession"):
        self._session = session
        self.layer = session.layer

    @property
    def session_id(self) -> int:
        return self._session.id

    @property
    def shape(self) -> tuple[int, ...]:
        return self._session._head_layout[HIDDEN][2]

    @property
    def hidden(self) -> torch.Tensor:
        """The hidden state entering layer ``layer``, (batch, seq, hidden) on the model's device; in-place edits stick."""
        s = self._session
        s._require(SessionState.CHECKPOINT, "read the checkpoint's hidden state")
        if s._checkpoint is not self:
            raise CheckpointStateError("this checkpoint has been superseded")
        return s._head.view(HIDDEN)

    def edit(self, edit: torch.Tensor | Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Replace the hidden state by a tensor of the same shape, dtype and device, or by ``edit(copy)``.

        A callable gets a copy of the hidden state and returns the new one (or None after editing the copy in
        place). The result is validated before anything is written, so on :class:`InvalidEdit` (or any error
        raised by the callable) the checkpoint is intact. The write is one copy on the current stream.
        """
        dst = self.hidden
        if callable(edit) and not isinstance(edit, torch.Tensor):
            scratch = dst.clone()
            new = edit(scratch)
            new = scratch if new is None else new
        else:
            new = edit
        if not isinstance(new, torch.Tensor):
            raise InvalidEdit(f"an edit must be a tensor (or a callable returning one), got {type(new).__name__}")
        problems = []
        if tuple(new.shape) != tuple(dst.shape):
            problems.append(f"shape {tuple(new.shape)} != {tuple(dst.shape)}")
        if new.dtype != dst.dtype:
            problems.append(f"dtype {new.dtype} != {dst.dtype}")
        if new.device != dst.device:
            problems.append(f"device {new.device} != {dst.device}")
        if problems:
            raise InvalidEdit("edit rejected, checkpoint unchanged: " + "; ".join(problems))
        if new.data_ptr() != dst.data_ptr():
            dst.copy_(new)
        self._session.runtime._touch(self._session)

    def __repr__(self) -> str:
        return f"Checkpoint(session={self.session_id}, layer={self.layer}, state={self._session.state.value})"


class BreakpointSession:
    """One prompt's breakpoint session. Create with :meth:`BreakpointRuntime.open`.

    Life: ``run_to(L)`` -> CHECKPOINT -> [``pause()`` -> PAUSED -> ``restore()`` -> CHECKPOINT]* -> ``resume()``
    -> RUNNING (``generate(n)`` any number of times) -> ``close()``. ``resume()`` also works from PAUSED directly.
    """

    def __init__(self, runtime: "BreakpointRuntime", session_id: int, input_ids: torch.Tensor, max_new_tokens: int):
        self.runtime = runtime
        self.id = session_id
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.state = SessionState.OPEN
        self.layer: int | None = None
        b, s = input_ids.shape
        self.geometry = KVGeometry.for_model(runtime.model.config, batch=b, capacity=s + max_new_tokens,
                                             dtype=runtime.dtype)
        self.cache = SlabKVCache(self.geometry, _SlabKVAllocator(runtime, session_id))
        self._head: _PackedHead | None = None  # resident checkpoint head (hidden state + layer kwargs)
        self._head_layout: _Layout = {}
        self._template: dict[str, Any] = {}
        self._swapped: SwappedState | None = None
        self._checkpoint: Checkpoint | None = None
        self._next_logits: torch.Tensor | None = None  # (batch, vocab) of the last position, not yet consumed
        self.generated: list[torch.Tensor] = []
        self.ready_event: Any = None  # CUDA event: the resumed state is usable by layer L on the current stream
        self._ready_next: Any = None  # the event a restore records as ready_event (created at pause)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _require(self, state: SessionState | tuple[SessionState, ...], what: str) -> None:
        states = state if isinstance(state, tuple) else (state,)
        if self.state not in states:
            raise CheckpointStateError(f"session {self.id} is {self.state.value}; cannot {what} "
                                       f"(needs {' or '.join(s.value for s in states)})")

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    def _head_tensors(self) -> dict[str, torch.Tensor]:
        return self._head.views()

    def _replay_kwargs(self) -> dict[str, Any]:
        return _rebuild_kwargs(self._template, self._head_tensors(), self.cache)

    # -- running to a breakpoint ---------------------------------------------------------------------------------
    @torch.no_grad()
    def run_to(self, layer: int) -> Checkpoint:
        """Prefill the prompt through layers ``0..layer-1`` and stop before ``layer`` (0..num_layers).

        Allocates the session's whole KV cache (prompt + ``max_new_tokens``) first, so no slab allocation happens
        during compute. Raises :class:`InvalidLayer` for a layer out of range (session unchanged).
        """
        self._require(SessionState.OPEN, "run_to")
        breakpoint_module(self.runtime.model, layer)  # validates the layer
        need = self.geometry.block_bytes * self.num_layers  # what it holds once resumed (the KV of every layer)
        if need > self.runtime.slab.capacity:  # Admission.NEVER: no eviction can make it fit
            raise AdmissionRefused(f"session {self.id} needs {need} bytes of KV ({self.num_layers} layers x "
                                   f"{self.geometry.block_bytes} bytes) but the whole slab holds "
                                   f"{self.runtime.slab.capacity} bytes; it can never be admitted")
        self.cache.allocate(range(layer))
        try:
            with exact_attention():
                cap = capture_at(self.runtime.model, self.input_ids, self.cache, layer)
            tensors, template = _flatten_kwargs(cap.kwargs)
            tensors = {HIDDEN: cap.hidden, **tensors}
            layout, nbytes = _PackedHead.plan(tensors)
            head = _PackedHead(self.runtime._allocate(self.id, HEAD, (nbytes,), torch.uint8), layout)
            views = head.views()
            for name, t in tensors.items():
                views[name].copy_(t)  # current stream
        except BaseException:
            self.cache.reset()
            raise
        self._head, self._template, self._head_layout = head, template, layout
        self.layer = layer
        self.state = SessionState.CHECKPOINT
        self._checkpoint = Checkpoint(self)
        self.runtime._touch(self)
        self.runtime._replenish(self.id)
        log.debug("session %d: checkpoint before layer %d", self.id, layer)
        return self._checkpoint

    @property
    def checkpoint(self) -> Checkpoint:
        self._require((SessionState.CHECKPOINT, SessionState.PAUSED), "get its checkpoint")
        assert self._checkpoint is not None
        return self._checkpoint

    # -- pause / restore -----------------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes a pause moves to the host: hidden state, captured kwargs tensors and KV blocks of layers < L."""
        self._require((SessionState.CHECKPOINT, SessionState.PAUSED, SessionState.SWAPPED, SessionState.RUNNING),
                      "size its state")
        if self._swapped is not None:
            return self._swapped.nbytes
        if self.state is SessionState.RUNNING:
            return self.cache.resident_bytes()
        return self._head.nbytes + self.layer * self.geometry.block_bytes

    def pause(self) -> None:
        """Move the session's state to the host pool (async, on the swap engine's out stream); free its slab memory.

        At a checkpoint: the hidden state, the layer kwargs and the KV of layers ``0..L-1`` (state PAUSED). While
        decoding: the KV of every layer written so far (state SWAPPED; ``resume()`` or ``generate()`` brings it
        back). KV blocks shared with a fork are first copied into blocks of this session's own (current stream), so
        the other sessions keep theirs.
        """
        if self.state is SessionState.RUNNING:
            self._swap_out_decoding()
            return
        self._require(SessionState.CHECKPOINT, "pause")
        self.cache.wait_ready()  # a restored-but-unused KV block may still be arriving
        self._unshare()
        self.runtime._prepare_spare_head(self._head.nbytes)  # before this pause frees anything (no fence on it)
        items: dict[str, SlabTensor] = {HEAD: self._head.buf}
        for i in range(self.layer):
            items[f"kv.{i}"] = self.cache.layers[i].block.handle
        self._swapped = self.runtime.swap.swap_out(items, free_source=True)
        self._ready_next = self.runtime._spare_event()
        self.cache.release(range(self.layer, self.num_layers))  # empty blocks of a restored checkpoint
        for i in range(self.layer):
            self.cache.detach(i)  # freed by the swap engine, fenced by its copy
        self._head = None
        self.state = SessionState.PAUSED
        self.runtime._touch(self)
        log.debug("session %d: paused (%d bytes to host)", self.id, self._swapped.nbytes)

    def _unshare(self, layers: range | None = None) -> None:
        for i in (range(self.layer) if layers is None else layers):
            layer = self.cache.layers[i]
            if layer.shared:
                layer._copy_on_write()

    def _swap_out_decoding(self) -> None:
        """Pause between decode steps: every layer's KV block to the host (one item ``kv.<i>`` per layer)."""
        self.cache.wait_ready()
        layers = [i for i, layer in enumerate(self.cache.layers) if layer.block is not None]
        self._unshare(range(self.num_layers))
        items = {f"kv.{i}": self.cache.layers[i].block.handle for i in layers}
        self._swapped = self.runtime.swap.swap_out(items, free_source=True)
        for i in layers:
            self.cache.detach(i)  # freed by the swap engine, fenced by its copy
        self.state = SessionState.SWAPPED
        self.runtime._touch(self)
        log.debug("session %d: swapped out while decoding (%d bytes to host)", self.id, self._swapped.nbytes)

    def _swap_in_decoding(self) -> None:
        """Bring a SWAPPED session's KV back in layer order; each layer waits for its own copy at first use."""
        state = self._swapped
        names = [f"kv.{i}" for i in range(self.num_layers) if f"kv.{i}" in state.names]
        need = state.slab_bytes()
        self.runtime._make_room(self.id, need)
        rs = self.runtime.swap.swap_in(state, order=names)
        alloc = self.cache.allocator
        for name in names:
            i = int(name.split(".")[1])
            self.cache.attach(i, KVBlock(rs.tensors[name], alloc))
            self.cache.layers[i].before_use = (lambda n=name: rs.wait(n))
        self._swapped = None
        self.state = SessionState.RUNNING
        log.debug("session %d: swapped back in (%d bytes)", self.id, need)

    def restore(self) -> Checkpoint:
        """Bring a paused checkpoint back: the packed head (hidden state and layer kwargs) first, with one copy, then
        the KV of layers ``0..L-1`` in layer order.

        Returns once the current stream waits for the head; ``ready_event`` is recorded there. The KV copies stay in
        flight on the swap engine's in stream; each cache layer waits for its own copy just before its first use.
        Only O(1) host work precedes the head's copy (the room needed was computed at pause). No-op on a resident
        checkpoint.
        """
        if self.state is SessionState.CHECKPOINT:
            return self._checkpoint
        self._require(SessionState.PAUSED, "restore")
        self._restore_head()
        self._restore_kv()
        return self._checkpoint

    def _restore_head(self) -> None:
        """PAUSED -> CHECKPOINT with only the head resident; the KV of layers ``0..L-1`` stays in ``_swapped``
        until :meth:`_restore_kv` (layers ``>= L`` never read it, so a resume runs them first).

        The head lands in the runtime's spare head buffer when it has the right size -- one copy on the current
        stream after its waits (:meth:`~djinn_core.memory.swap.SwapEngine.swap_in_into`) -- else in a new allocation
        (:meth:`~djinn_core.memory.swap.SwapEngine.swap_in_now`); either way ``ready_event`` is recorded on the current
        stream right behind the copy."""
        rt = self.runtime
        state = self._swapped
        with _gc_paused():  # no collection between the call and the head's copy: it would sit on the critical path
            rt.trace_point("restore.start")
            spare = rt._take_spare_head(state.items[HEAD].nbytes)
            if spare is not None:  # the head lands in the runtime's spare buffer: no allocation before the copy
                head, deps = spare
                self.ready_event = rt.swap.swap_in_into(state, HEAD, head, deps, event=self._ready_next)
            else:
                rt._make_room(self.id, state.slab_bytes((HEAD,)))  # bookkeeping, unless a session must be evicted
                rt.trace_point("restore.room")
                head, self.ready_event = rt.swap.swap_in_now(state, HEAD, event=self._ready_next)
            self._ready_next = None
            rt.trace_point("restore.ready")
        self._head = _PackedHead(head, self._head_layout)
        self._swapped = state if state.items else None
        self.state = SessionState.CHECKPOINT
        rt._touch(self)

    def _restore_kv(self, after: Any = None) -> None:
        """Issue the copies of the KV still on the host (kv.0 .. kv.L-1, in the order they went out); each layer
        waits for its own copy at first use."""
        if self._swapped is not None:
            self.runtime._make_room(self.id, self._swapped.slab_bytes())  # the continuation may have taken it
            self._attach_kv(self.runtime.swap.swap_in(self._swapped, after=after))
            self._swapped = None
            self.runtime.trace_point("restore.kv_issued")

    def _attach_kv(self, rs: ResidentState) -> None:
        alloc = self.cache.allocator
        for i in range(self.layer):
            name = f"kv.{i}"
            self.cache.attach(i, KVBlock(rs.tensors[name], alloc))
            self.cache.layers[i].before_use = (lambda n=name: rs.wait(n))

    # -- resume / generate ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def resume(self) -> torch.Tensor | None:
        """Continue from layer L (restoring first if paused); return full logits of the prompt (batch, seq, vocab).

        Layers ``0..L-1`` are never recomputed. The returned logits' last position gives the first new token.
        On a SWAPPED session (paused or evicted between decode steps) it brings the KV back, layer by layer behind
        events, and returns None; ``generate`` then continues where it stopped.
        """
        if self.state is SessionState.SWAPPED:
            with self.runtime._in_call(self):
                self._swap_in_decoding()
            return None
        self._require((SessionState.CHECKPOINT, SessionState.PAUSED), "resume")
        with self.runtime._in_call(self):
            if self.state is SessionState.PAUSED:
                self._restore_head()
            # the KV copies of layers < L are issued next, right behind the head on the in stream, so the link
            # never idles between them (at deep L the restore is bound by the link); layers L.. follow at once --
            # they never read that KV, so they compute while it streams in. The copies wait only for the work
            # queued before them (``before``), and the first decode step waits only for what it uses. The cost:
            # the continuation's first kernel waits for the host work (per restored layer), which matters
            # only where the continuation, not the link, bounds the resume.
            before = self.runtime._record_event()
            self._restore_kv(after=before)
            logits = self._continue(free_head=False)
            self._free_head()
            return logits

    def _continue(self, free_head: bool = True) -> torch.Tensor:
        self.state = SessionState.RUNNING  # not evictable from here on
        self.runtime._touch(self)
        self.cache.allocate(range(self.layer, self.num_layers))
        layers = self.runtime.layers
        kwargs = self._replay_kwargs() if self.layer < len(layers) else None  # none needed past the last layer
        with exact_attention():
            logits = replay_from(self.runtime.model, self.layer, self._head.view(HIDDEN), kwargs, layers)
        if free_head:
            self._free_head()
        self.state = SessionState.RUNNING
        self._checkpoint = None
        self._next_logits = logits[:, -1]
        return logits

    def _free_head(self) -> None:
        self.runtime.slab.free(self._head.buf, after=self.runtime._record_event())
        self._head = None

    @torch.no_grad()
    def generate(self, n: int, *, return_logits: bool = False):
        """Decode ``n`` greedy tokens after the resumed position; returns token ids (batch, n).

        With ``return_logits`` also the logits that chose each token (batch, n, vocab). Raises
        :class:`~djinn_core.errors.CacheCapacityExceeded` past ``max_new_tokens`` in total.
        """
        if self.state is SessionState.SWAPPED:  # paused or evicted between decode steps: bring the KV back first
            self.resume()
        self._require(SessionState.RUNNING, "generate (resume first)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"n must be an int >= 0, got {n!r}")
        done = sum(t.shape[1] for t in self.generated)
        if done + n > self.max_new_tokens:
            from djinn_core.errors import CacheCapacityExceeded

            raise CacheCapacityExceeded(f"session {self.id}: {done} + {n} tokens exceed max_new_tokens="
                                        f"{self.max_new_tokens}")
        if n == 0:
            empty = torch.empty(self.input_ids.shape[0], 0, dtype=torch.long, device=self.runtime.device)
            vocab = self.runtime.model.config.vocab_size
            return (empty, torch.empty(*empty.shape, vocab, device=self.runtime.device)) if return_logits else empty
        logits = self._next_logits
        with self.runtime._in_call(self), exact_attention(), self.runtime._decode_graphs():
            if self.generated:  # the last token chosen earlier has not been fed yet
                logits = decode_step(self.runtime.model, self.cache, self.generated[-1][:, -1:])
            tokens, steps = _greedy(self.runtime.model, self.cache, logits, n)
        self.generated.append(tokens)
        self._next_logits = None
        return (tokens, steps) if return_logits else tokens

    # -- fork / close --------------------------------------------------------------------------------------------
    def fork(self, n: int) -> list["BreakpointSession"]:
        """``n`` new sessions at this checkpoint (restored first if paused): own hidden state, KV of layers
        ``0..L-1`` shared copy-on-write. Each can be edited, paused, resumed and closed independently."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"fork needs n >= 1, got {n!r}")
        self._require((SessionState.CHECKPOINT, SessionState.PAUSED), "fork")
        with self.runtime._in_call(self):  # the children's allocations never evict their parent
            self.restore()
            self.cache.wait_ready()  # the children read these blocks on the current stream
            return [self.runtime._fork_from(self) for _ in range(n)]

    def close(self) -> None:
        """Release everything the session holds (slab blocks, host blocks). Idempotent."""
        if self.state is SessionState.CLOSED:
            return
        if self._swapped is not None:
            self.runtime.swap.release(self._swapped)
            self._swapped = None
        if self._head is not None:
            self._free_head()
        self.cache.release()
        self.state = SessionState.CLOSED
        self._checkpoint = None
        self.runtime._forget(self)

    def __repr__(self) -> str:
        return f"BreakpointSession(id={self.id}, state={self.state.value}, layer={self.layer})"


# -------------------------------------------------------------------------------------------------------------------
# Runtime


class BreakpointRuntime:
    """Breakpoint sessions over one Llama-family model, with their state in a slab and a host pool.

    Args:
        model: a Hugging Face Llama / Mistral / Qwen2 causal LM (eval mode), on a CUDA device or the CPU.
        slab: the device slab for session state; default ``budget_bytes`` bytes, or half the free device memory
            (leaving ``DEFAULT_HEADROOM_BYTES``); on the CPU, 256 MiB.
        host_pool: the host pool paused sessions live in; default as large as the slab (pinned on CUDA).
        budget_bytes: slab size when ``slab`` is not given.
        swap: a SwapEngine over ``slab`` and ``host_pool`` (default: a new one).
        reserve_bytes: eviction policy. 0 (default): evict idle sessions (least recently used first) only when an
            allocation or a restore does not fit. > 0: also, after every call on a session, evict idle sessions
            until this many slab bytes are free, with the eviction's copies ordered after the restores already in
            flight -- so the next restore of up to ``reserve_bytes`` finds its room ready, shares the host link with
            no eviction, and no eviction sits on its critical path. One session's state is the natural value.
        decode_graphs: replay each decoder layer's norms, MLP and rotary embedding as CUDA graphs during
            ``generate`` (bitwise equal to eager; see :mod:`djinn_core.runtime.decode_graphs`). On by default on CUDA; the
            graphs are shared by every runtime over the same model.
    """

    def __init__(self, model: nn.Module, *, slab: Slab | None = None, host_pool: HostPool | None = None,
                 budget_bytes: int | None = None, swap: SwapEngine | None = None, trace: bool = False,
                 reserve_bytes: int = 0, decode_graphs: bool = True):
        self.layers = model_layers(model)  # checked once: the decoder layers every replay runs
        if isinstance(reserve_bytes, bool) or not isinstance(reserve_bytes, int) or reserve_bytes < 0:
            raise ConfigError(f"reserve_bytes must be an int >= 0, got {reserve_bytes!r}")
        self.reserve_bytes = reserve_bytes
        self.trace = bool(trace)
        self.trace_log: list[tuple[str, float, Any]] = []
        # one spare slab buffer (and its fences) where the next restore's head lands without an allocation
        self._spare_head: tuple[SlabTensor, list[Any]] | None = None
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if slab is None:
            if budget_bytes is not None:
                slab = Slab(budget_bytes, self.device)
            elif self.device.type == "cuda":
                slab = Slab.from_free_memory(0.5, DEFAULT_HEADROOM_BYTES, self.device)
            else:
                slab = Slab(256 << 20, self.device)
        if slab.device != self.device:
            raise ConfigError(f"slab on {slab.device}, model on {self.device}")
        self.slab = slab
        if swap is None:
            host_pool = host_pool or HostPool(slab.capacity, chunk_bytes=min(1 << 30, max(slab.capacity, 256)))
            swap = SwapEngine(slab, host_pool)
        self.swap = swap
        self.host_pool = swap.host_pool
        self.sessions: dict[int, BreakpointSession] = {}
        self._ids = itertools.count(1)
        self._idle: dict[int, None] = {}  # resident idle sessions, least recently used first (evictable)
        self._busy: set[int] = set()  # sessions inside a call (never evicted)
        self.evictions = 0
        self.graphs = DecodeGraphs.for_model(model) if decode_graphs and self.device.type == "cuda" else None

    # -- public --------------------------------------------------------------------------------------------------
    def open(self, input_ids: torch.Tensor, *, max_new_tokens: int = 64) -> BreakpointSession:
        """A new session over ``input_ids`` (batch, seq) of token ids; KV capacity ``seq + max_new_tokens``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ConfigError("input_ids must be a (batch, seq) torch.long tensor")
        if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ConfigError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        sid = next(self._ids)
        s = BreakpointSession(self, sid, input_ids.to(self.device), max_new_tokens)
        self.sessions[sid] = s
        return s

    def session(self, session_id: int) -> BreakpointSession:
        """The open session ``session_id``; :class:`UnknownSession` if never opened or closed."""
        try:
            return self.sessions[session_id]
        except (KeyError, TypeError):
            raise UnknownSession(f"no open breakpoint session {session_id!r}") from None

    def close(self, session_id: int) -> None:
        self.session(session_id).close()

    def close_all(self) -> None:
        for s in list(self.sessions.values()):
            s.close()
        self._drop_spare_head()

    def __iter__(self) -> Iterator[BreakpointSession]:
        return iter(list(self.sessions.values()))

    # -- internal ------------------------------------------------------------------------------------------------
    def _decode_graphs(self) -> contextlib.AbstractContextManager:
        return self.graphs.active() if self.graphs is not None else contextlib.nullcontext()

    def trace_point(self, label: str) -> None:
        """With ``trace`` on, record (label, host time, a timing event on the current stream) into ``trace_log``:
        where a restore spends its time, on the host and on the device. Off by default (no cost)."""
        if self.trace:
            self.trace_log.append((label, time.perf_counter(), self._record_event()))

    @property
    def spare_bytes(self) -> int:
        """Slab bytes held by the runtime's spare head buffer (0 or one paused head's size), not by any session."""
        return 0 if self._spare_head is None else self.slab.aligned_size(self._spare_head[0].nbytes)

    def _prepare_spare_head(self, nbytes: int) -> None:
        """Keep one spare slab buffer of ``nbytes`` for the next restore's head (policy: one, sized like the last
        head paused). Called at pause, off the critical path; takes only memory that is free now (never evicts),
        and hands its fences to the restore that uses it (no wait here). Not in checksum mode (its restores go
        through the verified path)."""
        if self.swap.checksums:
            return
        spare = self._spare_head
        if spare is not None:
            if spare[0].nbytes == nbytes:
                return
            self._drop_spare_head()
        if self.slab.free_bytes < self.slab.aligned_size(nbytes) + self.reserve_bytes:
            return
        deps: list[Any] = []
        buf = self.slab.allocate((nbytes,), torch.uint8, tag="spare-head", fences=deps)
        # fences already passed cost nothing to drop now; each one kept is a stream wait on the restore's path
        self._spare_head = (buf, [ev for ev in deps if event_pending(ev)])
        self._spare_head[0].view()  # the view is cached until the slab compacts: a restore just reuses it

    def _take_spare_head(self, nbytes: int) -> tuple[SlabTensor, list[Any]] | None:
        """The spare head buffer and the events it must wait for, if it has exactly ``nbytes``; it then belongs
        to the caller (a slab allocation like any other)."""
        spare = self._spare_head
        if spare is None or spare[0].nbytes != nbytes:
            return None
        self._spare_head = None
        return spare

    def _drop_spare_head(self) -> bool:
        """Free the spare head buffer (slab memory is needed elsewhere); False when there was none."""
        spare, self._spare_head = self._spare_head, None
        if spare is None:
            return False
        buf, deps = spare
        # never used by any stream; its fences were never waited for: free it behind them again
        for ev in deps[:-1]:
            self.slab.fence(buf, ev)
        self.slab.free(buf, after=deps[-1] if deps else self._record_event())
        return True

    def _spare_event(self) -> Any:
        """A timing-enabled CUDA event whose driver object already exists (recorded once on the swap engine's out
        stream), to be recorded again on a critical path without creating it there; None on the CPU."""
        if self.device.type != "cuda":
            return None
        ev = torch.cuda.Event(enable_timing=True)  # ready_event is timed by the resume-latency experiment
        ev.record(self.swap.out_stream)
        return ev

    def _record_event(self) -> Any:
        if self.device.type != "cuda":
            return None
        ev = torch.cuda.Event(enable_timing=True)  # ready_event is timed by the resume-latency experiment
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _allocate(self, session_id: int, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> SlabTensor:
        """A slab tensor for ``session_id``; when the slab is full, evict idle sessions (LRU) until it fits.

        A session inside a call (``_busy``) is never evicted, nor is the requesting one. Raises SlabExhausted when
        nothing is left to evict.
        """
        tried: set[int] = {session_id}
        while True:
            try:
                return self.slab.allocate(shape, dtype, tag=f"s{session_id}.{name}")
            except SlabExhausted:
                if not self._drop_spare_head() and not self._evict_one(session_id, tried):
                    raise

    def _make_room(self, session_id: int, nbytes: int) -> None:
        """Evict idle sessions (LRU) until ``nbytes`` fit in the slab's free total (compaction does the rest)."""
        tried: set[int] = {session_id}
        if nbytes > self.slab.free_bytes:
            self._drop_spare_head()
        while nbytes > self.slab.free_bytes:
            if not self._evict_one(session_id, tried):
                st = self.slab.stats
                raise SlabExhausted(nbytes, st.free, st.capacity)

    def _evict_one(self, for_session: int, tried: set[int]) -> bool:
        """Pause the least recently used idle session not in ``tried``; False when there is none."""
        while True:
            victim = next((v for v in self._idle if v not in tried and v not in self._busy), None)
            if victim is None:
                return False
            tried.add(victim)
            log.info("slab full: evicting idle session %d to make room for session %d", victim, for_session)
            try:
                self.sessions[victim].pause()
                self.evictions += 1
                return True
            except SlabExhausted:  # its shared KV would need copies first; try the next one
                continue

    @contextlib.contextmanager
    def _in_call(self, session: BreakpointSession) -> Iterator[None]:
        """While a call runs on ``session`` it is never evicted; afterwards it is the most recently used."""
        self._busy.add(session.id)
        try:
            yield
        finally:
            self._busy.discard(session.id)
            self._touch(session)
        self._replenish(session.id)

    def _replenish(self, session_id: int) -> None:
        """With ``reserve_bytes``: evict idle sessions other than ``session_id`` (LRU first) until that much of the
        slab is free, each eviction's copies ordered after every restore copy already issued."""
        if self.reserve_bytes <= 0 or self.slab.free_bytes >= self.reserve_bytes:
            return
        self._drop_spare_head()  # the reserve comes first
        tried = {session_id}
        while self.slab.free_bytes < min(self.reserve_bytes, self.slab.capacity):
            self.swap.order_out_after_in()
            if not self._evict_one(session_id, tried):
                return

    def _touch(self, session: BreakpointSession) -> None:
        """Record a use: a resident checkpoint or decoding session becomes the most recently used idle one."""
        self._idle.pop(session.id, None)
        if session.state in (SessionState.CHECKPOINT, SessionState.RUNNING):
            self._idle[session.id] = None

    def _forget(self, session: BreakpointSession) -> None:
        self._idle.pop(session.id, None)
        self.sessions.pop(session.id, None)

    def _fork_from(self, parent: BreakpointSession) -> BreakpointSession:
        child = self.open(parent.input_ids, max_new_tokens=parent.max_new_tokens)
        try:
            buf = self._allocate(child.id, HEAD, (parent._head.nbytes,), torch.uint8)
            buf.view().copy_(parent._head.buf.view())  # current stream
            head = _PackedHead(buf, parent._head_layout)
            child.cache.share_prefix(parent.cache, range(parent.layer))
        except BaseException:
            child.close()
            raise
        child._head, child._template, child._head_layout = head, dict(parent._template), parent._head_layout
        child.layer = parent.layer
        child.state = SessionState.CHECKPOINT
        child._checkpoint = Checkpoint(child)
        self._touch(child)
        return child
