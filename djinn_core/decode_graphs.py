"""CUDA graphs of a decoder's fixed-shape sub-modules, replayed during decode steps.

A decode step of a large model is bound by host work: each Llama decoder layer calls about 65 operators for one
token (torch profiler count), so the GPU waits for the host. The two RMS norms and the MLP of every layer -- about
half of the layer's kernels, and their Python -- see the same input shape at every decode step, unlike attention,
whose key length grows. This module captures each of them once per input shape as a CUDA graph and replays it: one
input copy and one graph launch instead of the module's kernels. On the lent H100 this took the resident
resume-to-next-token of the Llama-2-13B architecture at L=40 (mostly one decode step) from 27.9 to 19.8 ms
(``scripts/probe_next_token.py``, variants ``current`` and ``no_graphs`` in one run).

A replay runs the kernels the eager module would launch, with the same shapes, strides, alignment and weights, so
its output is bitwise equal to the eager one. To keep it so, a call goes through the graph only when all of these
hold, and runs the module eagerly otherwise:

* the graphs are active (:meth:`DecodeGraphs.active`, which a breakpoint session's ``generate`` enters); outside it
  the model is untouched, so a reference run next to a runtime is plain eager PyTorch;
* a single positional CUDA tensor argument, contiguous, at most ``max_tokens`` positions, 512-byte aligned (the
  caching allocator's alignment, which the captured input buffer has: kernels choose vectorised paths by
  alignment);
* no gradient recording, and no hooks on the module (a hook could keep the returned tensor);
* the module's parameters are where they were at capture (a moved or reloaded weight means a new capture).

The returned tensor is the graph's output buffer, overwritten at the graph's next replay: safe for the decoder
layer that calls these modules, which consumes it at once. Only the modules inside decoder layers are wrapped, and
only classes known to be pure functions of their input (:data:`GRAPHABLE`); a mixture-of-experts MLP, with routing
decided on the host, is not among them.

Captures happen on first use (one per module and input shape), on a side stream ordered after the current one,
without a device synchronize; their memory comes from one private pool of the caching allocator (a few MiB).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .models import decoder_layers

log = logging.getLogger(__name__)

# sub-modules of a decoder layer whose forward is a fixed sequence of kernels given the input's shape
GRAPHABLE = frozenset({
    "LlamaRMSNorm", "LlamaMLP", "MistralRMSNorm", "MistralMLP", "Qwen2RMSNorm", "Qwen2MLP",
})
_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp")
_ALIGN = 512


@dataclass(eq=False)
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor
    params: tuple[int, ...]  # the parameters' data pointers at capture


class DecodeGraphs:
    """Graph capture and replay for one model's decoder-layer norms and MLPs (see the module docstring).

    Use :meth:`for_model` (one instance per model, shared by every runtime over it). ``enabled=False`` (or a model
    off CUDA) makes :meth:`active` a no-op.
    """

    _registry: "weakref.WeakKeyDictionary[nn.Module, DecodeGraphs]" = weakref.WeakKeyDictionary()

    def __init__(self, model: nn.Module, *, max_tokens: int = 1, enabled: bool = True):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            from .errors import ConfigError

            raise ConfigError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.max_tokens = max_tokens
        p = next(model.parameters(), None)
        self.enabled = bool(enabled) and p is not None and p.device.type == "cuda"
        self.modules: list[nn.Module] = []
        for layer in decoder_layers(model):
            for part in _LAYER_PARTS:
                m = getattr(layer, part, None)
                if isinstance(m, nn.Module) and type(m).__name__ in GRAPHABLE:
                    self.modules.append(m)
        self._graphs: dict[tuple[int, torch.Size, torch.dtype], _Graph] = {}
        self._failed: set[int] = set()  # modules whose capture failed: always eager
        self._depth = 0
        self._pool: Any = None
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
        """Within this context the wrapped modules replay their graphs where the conditions hold (re-entrant).
        The wrappers are instance attributes installed on entry and removed on exit: outside, the model's modules
        are exactly as they were."""
        if not self.enabled or not self.modules:
            yield
            return
        if self._depth == 0:
            for m in self.modules:
                m.forward = self._wrapper(m, type(m).forward.__get__(m))
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                for m in self.modules:
                    del m.forward

    def clear(self) -> None:
        """Drop every captured graph and its memory (they are captured again on next use)."""
        self._graphs.clear()
        self._failed.clear()
        self._pool = None

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    # -- replay --------------------------------------------------------------------------------------------------
    def _wrapper(self, module: nn.Module, eager: Callable[..., Any]) -> Callable[..., Any]:
        graphs = self._graphs
        mid = id(module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if kwargs or len(args) != 1:
                return eager(*args, **kwargs)
            x = args[0]
            if (not isinstance(x, torch.Tensor) or not x.is_cuda or x.dim() < 2 or x.shape[-2] > self.max_tokens
                    or not x.is_contiguous() or x.data_ptr() % _ALIGN or torch.is_grad_enabled()
                    or module._forward_hooks or module._forward_pre_hooks or mid in self._failed):
                return eager(x)
            g = graphs.get((mid, x.shape, x.dtype))
            if g is not None and g.params != _param_ptrs(module):
                g = None  # the weights moved: capture again
            if g is None:
                g = self._capture(module, eager, x)
                if g is None:
                    return eager(x)
            g.static_in.copy_(x)
            g.graph.replay()
            self.replays += 1
            return g.static_out

        return forward

    def _capture(self, module: nn.Module, eager: Callable[..., Any], x: torch.Tensor) -> _Graph | None:
        cur = torch.cuda.current_stream(x.device)
        if self._side is None:
            self._side = torch.cuda.Stream(x.device)
        side = self._side
        with torch.inference_mode(False):  # a normal tensor: replays may copy into it in or out of inference mode
            static_in = torch.empty_like(x, memory_format=torch.contiguous_format)
        static_in.copy_(x)
        side.wait_stream(cur)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                eager(static_in)  # warm-up on the capture stream (library handles, workspaces)
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    static_out = eager(static_in)
                finally:
                    graph.capture_end()
        except Exception as e:  # an operator that cannot be captured: this module stays eager
            log.warning("decode graph capture of %s failed (%s): it runs eagerly", type(module).__name__, e)
            self._failed.add(id(module))
            cur.wait_stream(side)
            return None
        cur.wait_stream(side)
        if not isinstance(static_out, torch.Tensor):
            self._failed.add(id(module))
            return None
        if self._pool is None:
            self._pool = graph.pool()
        g = _Graph(graph, static_in, static_out, _param_ptrs(module))
        self._graphs[(id(module), x.shape, x.dtype)] = g
        self.captures += 1
        log.debug("captured a decode graph of %s for %s %s", type(module).__name__, tuple(x.shape), x.dtype)
        return g


def _param_ptrs(module: nn.Module) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in module.parameters())
