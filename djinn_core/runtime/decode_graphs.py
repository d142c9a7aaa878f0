"""CUDA graphs of a decoder's fixed-shape pieces, replayed during decode steps.

A decode step of a large model is bound by host work: a decoder layer calls tens of operators for one token, so the
GPU waits for the host. Some pieces of every layer see the same input shapes at every decode step, unlike attention
itself, whose key length grows: in a Llama layer the two RMS norms and the MLP (modules), and the rotary embedding of
the query and key (``apply_rotary_pos_emb``, a function the attention module looks up in its modeling module at call
time). Together they are more than half of the layer's kernels. This module captures each once per input shape as a
CUDA graph and replays it: input copies and one graph launch instead of the kernels and their Python. One rotary
graph serves every layer; its ``cos`` and ``sin`` inputs, the same tensors for all layers of a step, are copied in
once per step. Which modules and which function those are is the model family's knowledge
(:meth:`~djinn_core.models.family.ModelFamily.graphable_modules` and
:meth:`~djinn_core.models.family.ModelFamily.rotary_function`), asked once at construction. What the graphs save is
in ``docs/notes/models.md``.

Where the family knows a decoder layer's forward op for op
(:meth:`~djinn_core.models.family.ModelFamily.decode_layer_split`: Llama, Mistral and Qwen2 layers), the whole layer
replays instead as two graphs around its attention: before it, the input norm, the projections and the rotary
embedding; after it, the output projection, both residuals, the second norm and the MLP. Only the cache update and
the attention run eagerly.
A layer's first graph reads the previous layer's output in place (it was captured on that buffer), and every
layer's first graph reads the step's ``cos`` and ``sin`` from one shared pair of buffers, copied in once per step.
The per-module graphs then serve only a layer that cannot take that path (a hook on one of its modules, say).

A replay runs the kernels the eager code would launch, with the same shapes, strides, alignment and weights, so
its output is bitwise equal to the eager one. To keep it so, a call goes through a graph only when all of these
hold, and runs eagerly otherwise:

* the graphs are active (:meth:`DecodeGraphs.active`, which a breakpoint session's ``generate`` enters); outside it
  the model is untouched, so a reference run next to a runtime is plain eager PyTorch;
* positional CUDA tensor arguments only (one for a module, ``q, k, cos, sin`` for the rotary function), each
  contiguous, at most ``max_tokens`` positions, 512-byte aligned (the caching allocator's alignment, which the
  captured input buffers have: kernels choose vectorised paths by alignment);
* no gradient recording, and no hooks on the module (a hook could keep the returned tensor); for a split layer, none
  on any of its modules and no global forward hook, and its cache is a
  :class:`~djinn_core.runtime.kv_cache.SlabKVCache` (which copies the key and value in);
* the module's parameters are where they were at capture (a moved or reloaded weight means a new capture; for a
  split layer, any of the layer's).

Returned tensors are the graph's output buffers, overwritten at its next replay: safe for the decoder layer, which
consumes them at once, and for a cache that copies K/V in (:class:`~djinn_core.runtime.kv_cache.SlabKVCache`, what the
runtime decodes with) -- not for one that keeps the key tensor it is handed. Only modules inside decoder layers are
wrapped, and only those the family knows to be pure functions of their input's shape; a mixture-of-experts MLP, with
routing decided on the host, is not among them. The rotary wrapper replaces a name in a modeling module for the
duration of :meth:`DecodeGraphs.active`, so it is process-wide while active: the runtime decodes on one thread.

Captures happen on first use (one per module or function and input shapes), on a side stream ordered after the
current one, without a device synchronize; their memory comes from private pools of the caching allocator: one for
the per-module graphs, one per generation of the split layers' graphs (:class:`_Generation`).
"""

from __future__ import annotations

import contextlib
import logging
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from djinn_core.models import family_of
from djinn_core.models.family import LayerSplit
from djinn_core.runtime.kv_cache import SlabKVCache
from djinn_core.validation import check_int

log = logging.getLogger(__name__)

_ALIGN = 512


@dataclass(eq=False)
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    static_in: tuple[torch.Tensor, ...]
    static_out: Any  # a tensor, or a tuple of tensors
    params: tuple[int, ...]  # the module's parameters' data pointers at capture (empty for a function)


@dataclass(eq=False)
class _Pool:
    """A private memory pool of the caching allocator, shared by the graphs captured into it (None before the
    first)."""

    handle: Any = None


@dataclass(eq=False)
class _Generation:
    """The split layers' graphs of one input shape, captured in layer order into one pool of their own.

    Graphs sharing a pool may reuse each other's freed capture memory: a graph captured later may place its output
    where an earlier one keeps intermediates. That is safe only if the graphs replay in the order they were captured,
    which a decode step's layer order gives as long as captures happened in layer order too. A capture out of that
    order (a layer that was hooked at first, or whose weights moved) starts a new generation instead."""

    pool: _Pool
    last: int = -1  # index of the split layer captured last
    keys: list = field(default_factory=list)  # its graphs' keys in DecodeGraphs._graphs


def _buffer(x: Any) -> bool:
    """A CUDA tensor a graph's input buffer may take the place of: contiguous and allocator-aligned."""
    return isinstance(x, torch.Tensor) and x.is_cuda and x.is_contiguous() and not x.data_ptr() % _ALIGN


def _eligible(x: Any, max_tokens: int) -> bool:
    """A CUDA tensor a graph may stand in for: a :func:`_buffer` of at most ``max_tokens`` positions."""
    return _buffer(x) and x.dim() >= 2 and x.shape[-2] <= max_tokens


class DecodeGraphs:
    """Graph capture and replay for one model's decoder layers: split layers as two graphs around their attention,
    else their norms, MLPs and rotary embedding (see the module docstring).

    Use :meth:`for_model` (one instance per model, shared by every runtime over it). ``enabled=False`` (or a model
    off CUDA) makes :meth:`active` a no-op; ``split_layers=False`` keeps every layer on the per-module graphs.
    """

    _registry: "weakref.WeakKeyDictionary[nn.Module, DecodeGraphs]" = weakref.WeakKeyDictionary()

    def __init__(self, model: nn.Module, *, max_tokens: int = 1, enabled: bool = True, split_layers: bool = True):
        self.max_tokens = check_int("max_tokens", max_tokens, minimum=1)
        p = next(model.parameters(), None)
        self.enabled = bool(enabled) and p is not None and p.device.type == "cuda"
        family = family_of(model)
        self.modules: list[nn.Module] = [m for layer in family.decoder_layers(model)
                                         for m in family.graphable_modules(layer)]
        # (python module, attribute): the rotary function the decoder layers' attention looks up at call time
        rotary = family.rotary_function(model)
        self.functions: list[tuple[types.ModuleType, str]] = [] if rotary is None else [rotary]
        # decoder layers whose whole decode step but the attention replays as two graphs (LayerSplit)
        self.splits: list[tuple[nn.Module, LayerSplit]] = []
        for layer in family.decoder_layers(model) if split_layers else ():
            split = family.decode_layer_split(layer, rotary)
            if split is not None:
                self.splits.append((layer, split))
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._last: dict[int, tuple[torch.Tensor, Any]] = {}  # id(static input) -> (it, the tensor last copied in)
        self._shared: dict[tuple[Any, ...], torch.Tensor] = {}  # static inputs every layer's graph reads (cos, sin)
        self._outputs: dict[int, torch.Tensor] = {}  # id -> a layer graph's output (the next layer's static input)
        self._rotary: Any = None  # the rotary function in effect when the graphs became active (what layers call)
        self._failed: set[int] = set()  # ids of modules / functions whose capture failed: always eager
        self._depth = 0
        self._saved: list[tuple[types.ModuleType, str, Any]] = []
        self._pool = _Pool()  # the per-module and rotary graphs'
        self._generations: dict[tuple[Any, ...], _Generation] = {}  # the split layers' graphs, per input shape
        self._side: torch.cuda.Stream | None = None
        self.captures = 0
        self.replays = 0

    @classmethod
    def for_model(cls, model: nn.Module) -> "DecodeGraphs":
        g = cls._registry.get(model)
        if g is None:
            g = cls._registry[model] = cls(model)
        return g

    # -- activation ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within this context the wrapped modules and functions replay their graphs where the conditions hold
        (re-entrant). The wrappers are installed on entry and removed on exit: instance attributes of the modules,
        and the rotary function's name in its modeling module. Outside, everything is exactly as it was."""
        if not self.enabled or not (self.modules or self.functions):
            yield
            return
        if self._depth == 0:
            for m in self.modules:
                m.forward = self._module_wrapper(m, type(m).forward.__get__(m))
            for home, name in self.functions:
                orig = getattr(home, name)
                self._saved.append((home, name, orig))
                self._rotary = orig
                setattr(home, name, self._rotary_wrapper(orig, name))
            if self._rotary is not None:
                for idx, (layer, split) in enumerate(self.splits):
                    layer.forward = self._layer_wrapper(idx, layer, split, type(layer).forward.__get__(layer))
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                for m in self.modules:
                    del m.forward
                for layer, _ in self.splits:
                    layer.__dict__.pop("forward", None)
                while self._saved:
                    home, name, orig = self._saved.pop()
                    setattr(home, name, orig)

    def clear(self) -> None:
        """Drop every captured graph and its memory (they are captured again on next use)."""
        self._graphs.clear()
        self._failed.clear()
        self._last.clear()
        self._shared.clear()
        self._outputs.clear()
        self._generations.clear()
        self._pool = _Pool()

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    # -- replay --------------------------------------------------------------------------------------------------
    def _layer_wrapper(self, idx: int, layer: nn.Module, split: LayerSplit,
                       eager: Callable[..., Any]) -> Callable[..., Any]:
        """A decoder layer's decode step as ``pre`` graph, eager ``attend``, ``post`` graph (:class:`LayerSplit`).
        The ``pre`` graph reads the previous layer's ``post`` output in place (captured on it), and every layer's
        ``pre`` graph reads the step's ``cos`` and ``sin`` from one pair of buffers, copied in once per step.
        ``idx``: the layer's place among the split layers (captures go in that order, see :class:`_Generation`)."""
        lid = id(layer)
        mods = split.modules()
        what = type(layer).__name__

        def forward(*args: Any, **kwargs: Any) -> Any:
            bound = split.bind(args, kwargs)
            if bound is None or lid in self._failed or torch.is_grad_enabled():
                return eager(*args, **kwargs)
            h, cos, sin, ctx = bound
            mt = self.max_tokens
            if (not (_eligible(h, mt) and _eligible(cos, mt) and _eligible(sin, mt)) or _hooked(mods)
                    or not isinstance(split.cache(ctx), SlabKVCache)):
                return eager(*args, **kwargs)
            shape = (h.shape, h.dtype, cos.shape, cos.dtype, sin.shape)
            key, pkey = (lid, "pre", shape), (lid, "post", shape)
            weights = split.weights()
            g = self._graphs.get(key)
            if g is None or g.params != weights:  # not captured yet, or a weight moved since
                gen = self._generation(shape, idx)
                rotary = self._rotary
                static = (h if self._outputs.get(id(h)) is h else None,
                          self._shared_input(("cos", cos.shape, cos.dtype), cos),
                          self._shared_input(("sin", sin.shape, sin.dtype), sin))
                g = self._capture(key, lambda *a: split.pre(*a, rotary), (h, cos, sin), weights,
                                  f"{what} (before attention)", static=static, pool=gen.pool)
                if g is None:
                    return eager(*args, **kwargs)
                gen.keys.append(key)
            q, k, v = self._replay(g, (h, cos, sin), shared=(1, 2))
            attn = split.attend(q, k, v, ctx)
            resid = g.static_in[0]  # h, as the pre graph read it
            if not _buffer(attn):  # the attention's output cannot stand in for a graph input: eager from now on
                self._failed.add(lid)
                return split.post(attn, resid)
            gp = self._graphs.get(pkey)
            if gp is None or gp.static_in[0].shape != attn.shape:
                gen = self._generations.get(shape)
                if gp is not None or gen is None or gen.last != idx:
                    # not right behind its pre graph: run it eagerly now, capture every layer afresh next step
                    self._drop(shape)
                    return split.post(attn, resid)
                gp = self._capture(pkey, split.post, (attn, resid), weights, f"{what} (after attention)",
                                   static=(None, resid), pool=gen.pool)
                if gp is None:
                    return split.post(attn, resid)
                gen.keys.append(pkey)
                self._outputs[id(gp.static_out)] = gp.static_out
            return self._replay(gp, (attn, resid))

        return forward

    def _generation(self, shape: tuple[Any, ...], idx: int) -> _Generation:
        """The generation the split layer ``idx`` captures into for inputs of ``shape``: the current one while
        captures follow layer order, else a new one (the old one's graphs dropped)."""
        gen = self._generations.get(shape)
        if gen is None or idx <= gen.last:
            self._drop(shape)
            gen = self._generations[shape] = _Generation(_Pool())
        gen.last = idx
        return gen

    def _drop(self, shape: tuple[Any, ...]) -> None:
        gen = self._generations.pop(shape, None)
        for key in gen.keys if gen is not None else ():
            g = self._graphs.pop(key, None)
            if g is not None:
                self._outputs.pop(id(g.static_out), None)

    def _shared_input(self, key: tuple[Any, ...], like: torch.Tensor) -> torch.Tensor:
        t = self._shared.get(key)
        if t is None:
            with torch.inference_mode(False):
                t = self._shared[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return t

    def _module_wrapper(self, module: nn.Module, eager: Callable[..., Any]) -> Callable[..., Any]:
        mid = id(module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if kwargs or len(args) != 1:
                return eager(*args, **kwargs)
            x = args[0]
            if (not _eligible(x, self.max_tokens) or torch.is_grad_enabled() or module._forward_hooks
                    or module._forward_pre_hooks or mid in self._failed):
                return eager(x)
            key = (mid, x.shape, x.dtype)
            g = self._graphs.get(key)
            if g is not None and g.params != _param_ptrs(module):
                g = None  # the weights moved: capture again
            if g is None:
                g = self._capture(key, eager, (x,), _param_ptrs(module), type(module).__name__)
                if g is None:
                    return eager(x)
            return self._replay(g, (x,))

        return forward

    def _rotary_wrapper(self, eager: Callable[..., Any], what: str) -> Callable[..., Any]:
        """The rotary function ``fn(q, k, cos, sin)``: one graph per shape serves every layer. ``cos`` and ``sin`` are
        the same tensors for all layers of a step, so they are copied in only when a different tensor comes."""
        fid = id(eager)

        def rotary(*args: Any, **kwargs: Any) -> Any:
            if (kwargs or len(args) != 4 or fid in self._failed or torch.is_grad_enabled()
                    or not all(_eligible(a, self.max_tokens) for a in args)):
                return eager(*args, **kwargs)
            key = (fid, *((a.shape, a.dtype) for a in args))
            g = self._graphs.get(key)
            if g is None:
                g = self._capture(key, eager, args, (), what)
                if g is None:
                    return eager(*args)
            return self._replay(g, args, shared=(2, 3))

        return rotary

    def _replay(self, g: _Graph, args: tuple[torch.Tensor, ...], shared: tuple[int, ...] = ()) -> Any:
        last = self._last
        for i, (dst, src) in enumerate(zip(g.static_in, args)):
            if src is dst:
                continue  # the graph reads it in place (the previous layer graph's output)
            if i in shared:
                prev = last.get(id(dst))
                if prev is not None and prev[1] is src:
                    continue  # copied in for an earlier layer of this step, and held since (so not reused)
                last[id(dst)] = (dst, src)
            dst.copy_(src)
        g.graph.replay()
        self.replays += 1
        return g.static_out

    def _capture(self, key: tuple[Any, ...], eager: Callable[..., Any], args: tuple[torch.Tensor, ...],
                 params: tuple[int, ...], what: str, static: tuple[torch.Tensor | None, ...] = (),
                 pool: _Pool | None = None) -> _Graph | None:
        """Capture ``eager(*args)`` as a graph over static copies of ``args``; ``static[i]``, where given, is the
        buffer the graph reads input ``i`` from instead of a new one (shared, or another graph's output). The
        graph's memory comes from ``pool`` (default: the per-module graphs' pool)."""
        pool = self._pool if pool is None else pool
        x = args[0]
        cur = torch.cuda.current_stream(x.device)
        if self._side is None:
            self._side = torch.cuda.Stream(x.device)
        side = self._side
        given = tuple(static) + (None,) * (len(args) - len(static))
        with torch.inference_mode(False):  # normal tensors: replays may copy into them in or out of inference mode
            static_in = tuple(torch.empty_like(a, memory_format=torch.contiguous_format) if s is None else s
                              for a, s in zip(args, given))
        for dst, src in zip(static_in, args):
            if dst is not src:
                dst.copy_(src)
                self._last.pop(id(dst), None)
        side.wait_stream(cur)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                eager(*static_in)  # warm-up on the capture stream (library handles, workspaces)
                graph.capture_begin(pool=pool.handle, capture_error_mode="thread_local")
                try:
                    static_out = eager(*static_in)
                finally:
                    graph.capture_end()
        except Exception as e:  # an operator that cannot be captured: this one stays eager
            log.warning("decode graph capture of %s failed (%s): it runs eagerly", what, e)
            self._failed.add(key[0])
            cur.wait_stream(side)
            return None
        cur.wait_stream(side)
        outs = static_out if isinstance(static_out, tuple) else (static_out,)
        if not outs or not all(isinstance(t, torch.Tensor) for t in outs):
            self._failed.add(key[0])
            return None
        if pool.handle is None:
            pool.handle = graph.pool()
        g = _Graph(graph, static_in, static_out, params)
        self._graphs[key] = g
        self.captures += 1
        log.debug("captured a decode graph of %s for %s", what, [tuple(a.shape) for a in args])
        return g


def _hooked(modules: tuple[nn.Module, ...]) -> bool:
    """Whether a forward hook (global, or on one of ``modules``) would see the calls a graph stands in for."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _param_ptrs(module: nn.Module) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in module.parameters())
