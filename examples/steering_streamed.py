"""Steer a streamed model at a breakpoint: the pirate recipe of ``examples/steering.py``, with the decoder layers
streamed through a weight ring under one VRAM budget (issue 21).

On the CPU (default): SmolLM2-135M-Instruct with its real weights (from the GGUF), its 30 decoder layers streamed
through a 2-slot ring; the budget (default 384MiB) is split by the ring-first policy between the ring, the resident
modules, the activation headroom and the session slab (on the CPU nothing caps the allocator: the budget sizes the
ring and the slab). The answers are those of the resident model, bit for bit. From the repository root:
    .venv/bin/python examples/steering_streamed.py [--layer 13] [--tokens 80] [--strengths 0 4 5 7]

On a GPU, the 70B architecture under 24 GiB:
    .venv/bin/python examples/steering_streamed.py --device cuda --arch llama2-70b --vram-budget 24GiB [--host-sets 8]
This builds the Llama-2-70B architecture with SEEDED RANDOM WEIGHTS (there is no 70B checkpoint here) and a byte-level
stand-in tokenizer: it demonstrates the mechanics and the cost -- the breakpoint prefill streams layers 0..L-1 once,
each fork's resume streams only layers L..n-1, every decode step streams every layer -- and THE TEXT IS MEANINGLESS.
The allocator is capped at the budget (as ``djinn serve --vram-budget`` does). The pack holds every layer's weights in
pinned host RAM (1.7 GiB a layer in fp16): on a host with less than ~150 GiB free, pass ``--num-layers 48`` or
``--host-sets 8`` (layer i streams weight set i % 8). ``--arch llama-tiny --device cpu`` runs the same path in
seconds.

The recipe (ActAdd / CAA) is the one of ``examples/steering.py``, whose helpers this imports: the steering vector is
the mean difference of contrastive prompts' hidden states entering layer L; the question pauses before layer L once;
each fork adds ``strength * v`` to its checkpoint and resumes from L. What this adds is the streaming cost of each step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steering import (LAYER, MAX_TOKENS, PIRATE_PAIRS, PROMPT, STRENGTHS, Turn,  # noqa: E402
                      chat_ids, concept_count, generate_turn, steering_vector)

from djinn_core.runtime.streamed import StreamedBreakpointRuntime  # noqa: E402
from djinn_core.streaming.budget_split import RingFirstSplit  # noqa: E402

CPU_BUDGET = "384MiB"
CPU_SLOTS = 2  # a tiny ring: every layer's slot is reused 15 times a pass on SmolLM2
SESSION_TOKENS = 256  # prompt + answer, the most one session must fit in the slab (CPU)


class ByteTokenizer:
    """A stand-in tokenizer for a model with random weights and no tokenizer of its own: UTF-8 bytes as ids 3..258
    and a plain chat template. Enough for the recipe's helpers; what it decodes is as meaningless as the weights."""

    unk_token_id, eos_token_id, offset = 0, 2, 3

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text: str, return_tensors: str = "pt") -> SimpleNamespace:
        return SimpleNamespace(input_ids=torch.tensor([[b + self.offset for b in text.encode()]]))

    def convert_tokens_to_ids(self, token: str) -> None:
        return None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < 256 + self.offset)
        return data.decode("utf-8", errors="replace")


def build(arch: str | None = None, *, device: str = "cpu", vram_budget: str | None = None,
          num_layers: int | None = None, host_sets: int | None = None, ring_slots: int | None = None,
          session_tokens: int | None = None,
          model_and_tok: Any = None) -> tuple[StreamedBreakpointRuntime, Any, dict[str, Any]]:
    """``(runtime, tokenizer, budget facts)``: SmolLM2 (``arch=None``; ``model_and_tok`` reuses a loaded one) or an
    architecture with seeded random weights, streamed on ``device`` under ``vram_budget``."""
    from djinn_core.memory.vram_budget import cap_allocator, card_total_bytes, parse_budget, resolve_budget
    from djinn_core.rpc.loading import stream_model
    from djinn_core.runtime.streamed import build_streamed_runtime
    from djinn_core.streaming.builder import DEFAULT_CUDA_OVERHEAD_BYTES
    from djinn_core.validation import check_device

    dev = check_device(device)
    spec = vram_budget or (CPU_BUDGET if dev.type == "cpu" else "24GiB")
    facts: dict[str, Any] = {"budget": spec}
    overhead = 0
    if dev.type == "cuda":  # enforced: torch's allocator capped at the budget less the CUDA context
        budget = resolve_budget(spec, "--vram-budget", card_total_bytes(dev.index or 0))
        facts["enforcement"] = cap_allocator(budget.bytes, dev)
        budget_bytes = budget.bytes
        overhead = max(int(facts["enforcement"]["outside_allocator_bytes"]), DEFAULT_CUDA_OVERHEAD_BYTES)
    else:
        budget_bytes, _ = parse_budget(spec)
        if budget_bytes is None:
            raise SystemExit("--vram-budget card needs a CUDA device")
    shape = dict(ring_slots=ring_slots or (CPU_SLOTS if dev.type == "cpu" else 4),
                 session_tokens=session_tokens or (SESSION_TOKENS if dev.type == "cpu" else 2048))
    split = RingFirstSplit(device_overhead_bytes=overhead, **shape)
    if arch is None:
        from djinn_core.models import load_smollm2

        model, tok = model_and_tok or load_smollm2(dtype=torch.float32, device="cpu")
        rt = stream_model(model, budget_bytes=budget_bytes, split=split, device=dev, progress=False)
    else:
        dtype = torch.float32 if dev.type == "cpu" else torch.float16
        rt = build_streamed_runtime(arch, budget_bytes=budget_bytes, split=split, device=dev, dtype=dtype, seed=0,
                                    num_layers=num_layers, host_sets=host_sets)
        tok = ByteTokenizer()
    return rt, tok, facts


def _sync(rt: StreamedBreakpointRuntime) -> float:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    return time.perf_counter()


def steer_streamed(rt: StreamedBreakpointRuntime, tok, layer: int, tokens: int = MAX_TOKENS, strengths=STRENGTHS,
                   prompt: str = PROMPT, pairs=PIRATE_PAIRS) -> tuple[dict[float, Turn], dict[str, Any]]:
    """``({strength: Turn}, costs)``: :func:`steering.steer`'s recipe on ``rt``, and what each step streamed."""
    sm = rt.streamed
    costs: dict[str, Any] = {"layer": layer, "layers": sm.num_layers, "layer_bytes": sm.layout.used_bytes,
                             "forks": []}
    t = _sync(rt)
    v = steering_vector(rt, tok, layer, pairs)
    costs["steering_vector_s"] = _sync(rt) - t
    session = rt.open(chat_ids(tok, prompt).to(rt.device), max_new_tokens=tokens)
    before, t = sm.bytes_streamed, _sync(rt)
    session.run_to(layer)          # layers 0..layer-1 stream once, for every fork
    costs["run_to"] = {"bytes": sm.bytes_streamed - before, "s": _sync(rt) - t}
    session.pause()
    forks = session.fork(len(strengths))
    answers = {}
    for strength, fork in zip(strengths, forks):
        fork.checkpoint.hidden.add_(strength * v)
        before, t = sm.bytes_streamed, _sync(rt)
        fork.resume()              # streams layers layer..n-1 only; the head is resident
        resume = {"strength": strength, "resume_bytes": sm.bytes_streamed - before, "resume_s": _sync(rt) - t}
        before, t = sm.bytes_streamed, _sync(rt)
        answers[strength] = turn = generate_turn(fork, tok, tokens)
        steps = max(1, len(turn.tokens) - 1)  # the first token comes from the resume's logits
        resume.update(decode_bytes_per_token=(sm.bytes_streamed - before) / steps,
                      decode_s_per_token=(_sync(rt) - t) / steps, tokens=len(turn.tokens))
        costs["forks"].append(resume)
        fork.close()
    session.close()
    return answers, costs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", help="an architecture with seeded random weights (e.g. llama2-70b, llama-tiny); "
                                  "default: SmolLM2-135M-Instruct's real weights")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--vram-budget", help=f"the one budget the ring, slab and activations share (default: {CPU_BUDGET} "
                                         "on the CPU, 24GiB on CUDA, where the allocator is capped at it)")
    p.add_argument("--num-layers", type=int, help="with --arch: truncate to this many decoder layers")
    p.add_argument("--host-sets", type=int, help="with --arch: pack this many weight sets (layer i streams i %% n)")
    p.add_argument("--ring-slots", type=int, help=f"ring slots (default {CPU_SLOTS} on the CPU, 4 on CUDA)")
    p.add_argument("--session-tokens", type=int, help="tokens one session must fit in the slab")
    p.add_argument("--layer", type=int, default=None,
                   help=f"breakpoint layer (default: {LAYER} on SmolLM2, half the layers of an --arch)")
    p.add_argument("--tokens", type=int, default=MAX_TOKENS, help="most tokens per answer")
    p.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    p.add_argument("--prompt", default=PROMPT)
    args = p.parse_args(argv)
    rt, tok, facts = build(args.arch, device=args.device, vram_budget=args.vram_budget, num_layers=args.num_layers,
                           host_sets=args.host_sets, ring_slots=args.ring_slots, session_tokens=args.session_tokens)
    try:
        layer = args.layer if args.layer is not None else (LAYER if args.arch is None else rt.streamed.num_layers // 2)
        answers, costs = steer_streamed(rt, tok, layer, args.tokens, tuple(args.strengths), args.prompt)
        split = rt.split.to_dict()
    finally:
        rt.release()
    mib = 1 << 20
    print(f"model: {args.arch or 'smollm2 (real weights)'} on {args.device}, {costs['layers']} layers streamed "
          f"through {split['slots']} slots of {split['layer_bytes'] / mib:.1f} MiB under {facts['budget']}: slab "
          f"{split['slab_bytes'] / mib:.1f} MiB ({split['sessions_resident']} sessions of {split['session_tokens']} "
          f"tokens)")
    if args.arch is not None:
        print("random weights and a byte-level stand-in tokenizer: the text below is meaningless; the costs are not")
    n, lb = costs["layers"], costs["layer_bytes"]
    print(f"breakpoint before layer {layer}: run_to streamed {costs['run_to']['bytes'] / lb:.0f} layers "
          f"({costs['run_to']['s']:.2f} s); each fork's resume streams layers {layer}..{n - 1}")
    print(f"prompt: {args.prompt}")
    for strength, turn in answers.items():
        c = next(f for f in costs["forks"] if f["strength"] == strength)
        label = "unsteered" if strength == 0 else f"strength {strength:g}"
        cut = "" if turn.ended else " [cut at --tokens]"
        print(f"[{label:>11}] resume: {c['resume_bytes'] / lb:.0f} layers in {c['resume_s']:.2f} s; decode: "
              f"{c['decode_bytes_per_token'] / lb:.0f} layers, {c['decode_s_per_token'] * 1e3:.0f} ms per token; "
              f"pirate words: {concept_count(turn.text)}")
        more = " ..." if len(turn.tokens) > 16 else ""
        text = turn.text if args.arch is None else f"token ids {turn.tokens[:16]}{more}"
        print(" " * 14 + text.replace("\n", "\n" + " " * 14) + cut)


if __name__ == "__main__":
    main()
