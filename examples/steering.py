"""Steer SmolLM2 toward pirate speech at a breakpoint: pause before layer 13, fork, add a steering vector, resume.

Runs on the CPU in about a minute (most of it loading the model), from the repository root:
    .venv/bin/python examples/steering.py [--layer 13] [--tokens 80] [--strengths 0 4 5 7]

The recipe is contrastive activation addition (ActAdd, Turner et al. 2023; CAA, Rimsky et al. 2024). The steering
vector ``v`` is the mean, over a few contrastive prompt pairs ("Talk like a pirate." / "Talk normally.", ...), of the
difference of their mean hidden states entering layer L. The question's forward pass pauses before layer L once;
each fork adds ``strength * v`` to every prompt position of its checkpoint and resumes from layer L (layers below it
never run again). Decoding is greedy and stops at the end-of-turn token; strength 0 is the unsteered answer.
"""

from __future__ import annotations

import argparse
import re
from typing import NamedTuple

import torch

from djinn_core.models import load_smollm2
from djinn_core.runtime import BreakpointRuntime, BreakpointSession

PROMPT = "Describe your morning in one sentence."
LAYER = 13  # of 30: the breakpoint; the steering vector is taken entering this layer
# (toward, away from): same chat format, the concept in the first, a neutral counterpart in the second
PIRATE_PAIRS = (
    ("Talk like a pirate.", "Talk normally."),
    ("Speak like a pirate, arr!", "Speak like a teacher."),
    ("Answer as a pirate captain.", "Answer as a helpful assistant."),
)
STRENGTHS = (0.0, 4.0, 5.0, 7.0)
MAX_TOKENS = 80  # per answer; each answer at the strengths above ends before it
# words that mark the concept in an answer (counted, never used to steer)
PIRATE_WORDS = frozenset(
    "pirate pirates arr arrr matey ahoy ye yer aye avast treasure ship ships captain crew sail sailing sailin "
    "seas sea plunder plundering landlubber landlubbers grog booty plank".split())


class Turn(NamedTuple):
    """One assistant turn: generated token ids (the end-of-turn token included when reached), the text before the
    end-of-turn token (special tokens skipped), and whether the end-of-turn token came within the budget."""

    tokens: list[int]
    text: str
    ended: bool


def chat_ids(tok, text: str) -> torch.Tensor:
    """``text`` as one user message through the tokenizer's chat template, ready for the answer: (1, seq) ids."""
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
    return tok(rendered, return_tensors="pt").input_ids


def end_of_turn_ids(tok) -> frozenset[int]:
    """Ids that end an assistant turn: ``<|im_end|>`` (ChatML) and the tokenizer's EOS (the GGUF's tokenizer names
    ``<|im_start|>``, which could only open a next turn)."""
    ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    return frozenset(i for i in ids if i is not None and i != tok.unk_token_id)


def concept_count(text: str, words: frozenset[str] = PIRATE_WORDS) -> int:
    """How many words of ``text`` (lower-cased, apostrophes dropped) are in ``words``."""
    return sum(w.replace("'", "") in words for w in re.findall(r"[a-z']+", text.lower()))


@torch.no_grad()
def steering_vector(rt: BreakpointRuntime, tok, layer: int, pairs=PIRATE_PAIRS) -> torch.Tensor:
    """Mean over ``pairs`` of (mean hidden state of the first prompt - that of the second) entering ``layer``:
    a (hidden,) tensor on the runtime's device, in the hidden state's units.

    Position 0 is left out of the means: it is the attention sink, whose hidden state is two orders of magnitude
    larger than the others from layer 12 on (norm about 25,000 against about 150). It is the same in both prompts,
    but in means over prompts of different lengths its shares differ, and that difference would swamp the direction.
    """
    def mean_hidden(text: str) -> torch.Tensor:
        s = rt.open(chat_ids(tok, text).to(rt.device), max_new_tokens=0)
        try:
            return s.run_to(layer).hidden[0, 1:].mean(dim=0).clone()
        finally:
            s.close()

    return torch.stack([mean_hidden(toward) - mean_hidden(away) for toward, away in pairs]).mean(dim=0)


def generate_turn(session: BreakpointSession, tok, max_tokens: int) -> Turn:
    """Greedy tokens from a resumed session, one at a time, until an end-of-turn token or ``max_tokens``."""
    stop = end_of_turn_ids(tok)
    tokens: list[int] = []
    while len(tokens) < max_tokens:
        tokens.append(int(session.generate(1)[0, 0]))
        if tokens[-1] in stop:
            break
    ended = bool(tokens) and tokens[-1] in stop
    text = tok.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True).strip()
    return Turn(tokens, text, ended)


def steer(layer: int | None = None, tokens: int = MAX_TOKENS, strengths=STRENGTHS, model_and_tok=None,
          prompt: str = PROMPT, pairs=PIRATE_PAIRS) -> dict[float, Turn]:
    """Return ``{strength: Turn}`` for one fork per strength; strength 0 is the unsteered answer."""
    model, tok = model_and_tok or load_smollm2()
    layer = LAYER if layer is None else layer
    rt = BreakpointRuntime(model)  # on the CPU: a 256 MiB slab
    try:
        v = steering_vector(rt, tok, layer, pairs)
        session = rt.open(chat_ids(tok, prompt).to(rt.device), max_new_tokens=tokens)
        session.run_to(layer)          # layers 0..layer-1 run once, for every fork
        session.pause()                # the checkpoint goes to the host pool
        forks = session.fork(len(strengths))   # restores it; KV of layers < layer shared copy-on-write
        answers = {}
        for strength, fork in zip(strengths, forks):
            fork.checkpoint.hidden.add_(strength * v)   # in place, every prompt position
            fork.resume()              # continues from `layer`; layers before it are never recomputed
            answers[strength] = generate_turn(fork, tok, tokens)
        return answers
    finally:
        rt.close_all()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=None, help=f"breakpoint layer (default: {LAYER})")
    p.add_argument("--tokens", type=int, default=MAX_TOKENS, help="most tokens per answer")
    p.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    p.add_argument("--prompt", default=PROMPT)
    args = p.parse_args()
    answers = steer(args.layer, args.tokens, tuple(args.strengths), prompt=args.prompt)
    print(f"prompt: {args.prompt}")
    for strength, turn in answers.items():
        label = "unsteered" if strength == 0 else f"strength {strength:g}"
        cut = "" if turn.ended else " [cut at --tokens]"
        print(f"[{label:>11}] " + turn.text.replace("\n", "\n" + " " * 14) + cut)


if __name__ == "__main__":
    main()
