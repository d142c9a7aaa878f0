"""Token accuracy: a session paused at layer L, swapped out, resumed and decoded greedily, against the uninterrupted
run of the same prompt (with or without an edit at L). Equality is bitwise: prompt logits, tokens, every decode
step's logits."""

from __future__ import annotations

from typing import Any, Callable

import torch

Run = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (prompt logits, tokens, per-step logits)


def session_run(rt: Any, ids: torch.Tensor, layer: int, new_tokens: int, *,
                edit: Callable[[torch.Tensor], torch.Tensor] | None = None, fork: bool = False) -> Run:
    """Open a session of ``ids`` on ``rt`` (a runtime, or a :class:`~djinn_core.rpc.client.Client`: the same calls),
    run to ``layer`` (with ``fork``, continue in a fork of it and close the parent), apply ``edit`` to the
    checkpoint's hidden state, pause (its state to the host), resume and generate ``new_tokens`` greedily; the
    session is closed."""
    s = rt.open(ids, max_new_tokens=new_tokens)
    ck = s.run_to(layer)
    if fork:
        child = s.fork(1)[0]
        s.close()
        s, ck = child, child.checkpoint
    if edit is not None:
        ck.edit(edit)
    s.pause()
    logits = s.resume()
    tokens, steps = s.generate(new_tokens, return_logits=True)
    s.close()
    return logits, tokens, steps


def bitwise_equal(got: Run, ref: Run) -> dict[str, bool]:
    """Which parts of two runs (as :func:`session_run` and ``djinn_core.runtime.plain_run`` return them) are equal,
    bit for bit."""
    return {"prompt_logits_equal": bool(torch.equal(got[0], ref[0])),
            "tokens_equal": bool(torch.equal(got[1], ref[1])),
            "step_logits_equal": bool(torch.equal(got[2], ref[2]))}


def layers_unequal_to_plain_forward(model: Any, rt: Any, ids: torch.Tensor, new_tokens: int,
                                    ref_logits: torch.Tensor, ref_cache: Any) -> list[int]:
    """Every breakpoint depth 0..num_layers: pause and resume at it, then compare the prompt logits and the whole KV
    state with the uninterrupted forward's (``ref_logits``, ``ref_cache``); returns the depths that differ."""
    n = model.config.num_hidden_layers
    mismatches = []
    for layer in range(n + 1):
        s = rt.open(ids, max_new_tokens=new_tokens)
        s.run_to(layer)
        s.pause()
        logits = s.resume()
        kv_equal = all(torch.equal(s.cache.layers[i].keys, ref_cache.layers[i].keys)
                       and torch.equal(s.cache.layers[i].values, ref_cache.layers[i].values) for i in range(n))
        if not (torch.equal(logits, ref_logits) and kv_equal):
            mismatches.append(layer)
        s.close()
    return mismatches
