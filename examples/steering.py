"""Steer SmolLM2 at a breakpoint: pause at a middle layer, add a steering vector, resume -- one fork per strength.

Runs on the CPU in about a minute, from the repository root:
    PYTHONPATH=. .venv/bin/python examples/steering.py [--layer 15] [--tokens 32]

The steering vector is the difference of the mean hidden states of two short prompts at the same layer
("Talk like a pirate." minus "Talk like a scientist."), a common recipe for activation steering.
"""

from __future__ import annotations

import argparse

import torch

from djinn_core.runtime import BreakpointRuntime
from djinn_core.models import load_smollm2

PROMPT = "Describe the ocean in one sentence."


def chat_ids(tok, text: str) -> torch.Tensor:
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
    return tok(rendered, return_tensors="pt").input_ids


def mean_hidden(rt: BreakpointRuntime, ids: torch.Tensor, layer: int) -> torch.Tensor:
    s = rt.open(ids, max_new_tokens=0)
    h = s.run_to(layer).hidden.mean(dim=1)[0].clone()  # (hidden,)
    s.close()
    return h


def steer(layer: int | None = None, tokens: int = 32, strengths=(0.0, 8.0, 16.0), model_and_tok=None) -> dict:
    """Return {strength: answer}; strength 0.0 is the unsteered answer."""
    model, tok = model_and_tok or load_smollm2()
    layer = model.config.num_hidden_layers // 2 if layer is None else layer
    rt = BreakpointRuntime(model, budget_bytes=256 << 20)
    direction = (mean_hidden(rt, chat_ids(tok, "Talk like a pirate."), layer)
                 - mean_hidden(rt, chat_ids(tok, "Talk like a scientist."), layer))
    direction = direction / direction.norm()

    session = rt.open(chat_ids(tok, PROMPT), max_new_tokens=tokens)
    session.run_to(layer)          # layers 0..layer-1 run once, for every fork
    session.pause()                # the checkpoint goes to the host pool
    forks = session.fork(len(strengths))   # restores it; KV of layers < layer shared copy-on-write
    answers = {}
    for strength, fork in zip(strengths, forks):
        fork.checkpoint.hidden.add_(strength * direction)   # in place, every position
        fork.resume()              # continues from `layer`; layers before it are never recomputed
        answers[strength] = tok.decode(fork.generate(tokens)[0], skip_special_tokens=True)
    rt.close_all()
    return answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=None, help="breakpoint layer (default: the middle one)")
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    answers = steer(args.layer, args.tokens)
    width = max(len(f"{s:g}") for s in answers)
    print(f"prompt: {PROMPT}")
    for strength, text in answers.items():
        label = "unsteered" if strength == 0 else f"strength {strength:g}"
        print(f"[{label:>{width + 9}}] {text!r}")


if __name__ == "__main__":
    main()
