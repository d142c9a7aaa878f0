"""Capturing and replaying decoder layer L's call, without model code; the uninterrupted reference run.

* :func:`capture_at` runs the model's own ``forward`` with a removable forward *pre*-hook on decoder layer L (on the
  final norm for ``L == num_layers``). The hook captures layer L's input ``(hidden_states, kwargs)`` and raises a
  private exception that aborts the forward, so layers ``0..L-1`` have written their KV into the cache and nothing
  after L ran. The hook is removed in ``finally``.
* :func:`replay_from` calls each decoder layer ``L..`` with the captured kwargs, then the final norm and the LM head
  -- what a causal-LM forward does after its layer loop, with full logits.
* :func:`plain_run` is the reference a breakpoint session must equal bitwise: prefill and greedy decoding with plain
  Hugging Face forwards (optionally with an edit done by a plain pre-hook).

Where the layers, the final norm and the head are is the model family's knowledge
(:func:`djinn_core.models.family_of`), resolved once per model into :class:`ModelParts`. Everything runs on the
current stream of the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from djinn_core.errors import CheckpointStateError, ConfigError, InvalidLayer
from djinn_core.models import family_of
from djinn_core.validation import check_int


class _StopAtBreakpoint(Exception):
    """Raised by the capture hook to abort the model's forward at the breakpoint (never escapes this module)."""


@dataclass(frozen=True)
class ModelParts:
    """The modules a replay runs: the decoder layers, the final norm and the LM head of one causal LM."""

    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def model_parts(model: nn.Module) -> ModelParts:
    """The replayable parts of ``model`` through its family's adapter; ConfigError for a model a replay cannot
    serve (no such family, or mixed layer types)."""
    family = family_of(model)
    parts = ModelParts(family.decoder_layers(model), family.final_norm(model), family.lm_head(model))
    layer_types = getattr(model.config, "layer_types", None) or []
    if len(set(layer_types)) > 1:
        raise ConfigError(f"mixed layer types {sorted(set(layer_types))} (e.g. alternating sliding windows) are not "
                          "supported: the replay reuses layer L's attention mask for every later layer")
    return parts


def model_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM a replay can serve; raises ConfigError for anything else."""
    return model_parts(model).layers


def breakpoint_module(model: nn.Module, layer: int, parts: ModelParts | None = None) -> nn.Module:
    """The module whose input is the hidden state "before layer ``layer``" (the final norm for ``num_layers``);
    :class:`InvalidLayer` outside ``0..num_layers``."""
    parts = model_parts(model) if parts is None else parts
    n = parts.num_layers
    check_int("layer", layer, 0, n, error=InvalidLayer)
    return parts.norm if layer == n else parts.layers[layer]


@dataclass
class Captured:
    """Layer L's input as the model's forward passed it: ``hidden`` (batch, seq, hidden) and the keyword args."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


@torch.no_grad()
def capture_at(model: nn.Module, input_ids: torch.Tensor, cache: Any, layer: int,
               parts: ModelParts | None = None, *, prepend: bool = False) -> Captured:
    """Run ``model`` on ``input_ids`` with ``cache`` and stop before ``layer``; layers ``0..layer-1`` fill ``cache``.

    Uses a forward pre-hook on the breakpoint module, removed before returning (also on error); with ``prepend`` it
    runs before the module's other pre-hooks (a streamed layer's weight load never starts for a layer that does not
    run).
    """
    target = breakpoint_module(model, layer, parts)
    box: list[Captured] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        box.append(Captured(hidden, dict(kwargs)))
        raise _StopAtBreakpoint

    handle = target.register_forward_pre_hook(hook, with_kwargs=True, prepend=prepend)
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
                parts: ModelParts | None = None) -> torch.Tensor:
    """Run decoder layers ``layer..``, the final norm and the LM head on ``hidden``; return full logits (batch, seq,
    vocab).

    ``kwargs`` (the layers' call arguments) may be None when no layer is left; ``parts``: the model's
    :class:`ModelParts`, if the caller has them (default: looked up and checked)."""
    parts = model_parts(model) if parts is None else parts
    layers = parts.layers
    for i in range(layer, len(layers)):
        hidden = _layer_output(layers[i](hidden, **kwargs))
    return parts.head(parts.norm(hidden))


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
    tokens, steps = greedy(model, cache, prompt_logits[:, -1], max_new_tokens)
    return prompt_logits, tokens, steps


def decode_step(model: nn.Module, cache: Any, tokens: torch.Tensor) -> torch.Tensor:
    """One decoding forward of ``tokens`` (batch, s) on ``cache``; returns the last position's logits (batch, vocab).

    Runs under ``torch.inference_mode``: the same kernels as ``no_grad`` (bitwise equal results) with less host work
    per operator, which is what bounds a large model's decode step. The logits are an inference tensor: read it, or
    clone it before an in-place edit outside inference mode.
    """
    with torch.inference_mode():
        return model(tokens, past_key_values=cache, use_cache=True).logits[:, -1]


def greedy(model: nn.Module, cache: Any, logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` greedy tokens starting from ``logits`` (batch, vocab) of the last position; returns (tokens (batch, n),
    the logits that chose each (batch, n, vocab))."""
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
