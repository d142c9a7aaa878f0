"""The streamed steering example (``examples/steering_streamed.py``, issue 21 item 5) on the CPU: its answers are those
of the resident model bit for bit -- SmolLM2's real weights through a 2-slot ring against ``examples/steering.py`` on
the resident model, and a random-weight architecture against a plain run -- and each step streams what it should: the
breakpoint prefill layers 0..L-1, each fork's resume layers L..n-1, each decode step every layer."""

from __future__ import annotations

import pytest
import torch

from djinn_core.models import build_model
from djinn_core.runtime import plain_run
from fixtures.examples import load_example


@pytest.fixture(scope="module")
def example():
    return load_example("steering_streamed")


def _check_costs(costs, layer: int) -> None:
    n, lb = costs["layers"], costs["layer_bytes"]
    assert costs["run_to"]["bytes"] == layer * lb  # nothing prefetched past the breakpoint
    for fork in costs["forks"]:
        assert fork["resume_bytes"] == (n - layer) * lb  # the layers after the breakpoint only; the head is resident
        if fork["tokens"] > 1:
            assert fork["decode_bytes_per_token"] == n * lb


@pytest.mark.cpu
def test_a_random_architecture_streams_what_each_step_needs_and_matches_a_plain_run(example, capsys):
    rt, tok, _ = example.build("llama-tiny", device="cpu", vram_budget="128MiB")
    model = rt.model
    try:
        answers, costs = example.steer_streamed(rt, tok, 3, tokens=8, strengths=(0.0, 6.0))
        assert rt.split.slots == example.CPU_SLOTS < rt.streamed.num_layers  # the ring is reused within a pass
    finally:
        rt.release()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    _check_costs(costs, 3)
    resident = build_model("llama-tiny", dtype=torch.float32, seed=0)
    ids = example.chat_ids(tok, example.PROMPT)
    unsteered = answers[0.0].tokens
    assert unsteered == plain_run(resident, ids, len(unsteered))[1][0].tolist()  # bitwise: same greedy tokens
    example.main(["--arch", "llama-tiny", "--vram-budget", "128MiB", "--tokens", "4", "--strengths", "0", "5"])
    out = capsys.readouterr().out
    assert "meaningless" in out and "token ids" in out and "resume: 3 layers" in out


@pytest.mark.cpu
@pytest.mark.slow
def test_smollm2_streamed_through_a_tiny_ring_answers_as_the_resident_example(example, smollm2_cpu):
    resident_example = load_example("steering")
    strengths, tokens = (0.0, max(resident_example.STRENGTHS)), 40
    expect = resident_example.steer(strengths=strengths, tokens=tokens, model_and_tok=smollm2_cpu)
    rt, tok, _ = example.build(device="cpu", model_and_tok=smollm2_cpu)
    try:
        assert rt.split.slots == 2 and rt.streamed.num_layers == 30
        answers, costs = example.steer_streamed(rt, tok, example.LAYER, tokens=tokens, strengths=strengths)
    finally:
        rt.release()
    model = smollm2_cpu[0]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())  # the model is whole again
    _check_costs(costs, example.LAYER)
    for s in strengths:
        assert answers[s] == expect[s], s  # the same tokens, text and end, bit for bit
    assert example.concept_count(answers[strengths[1]].text) > example.concept_count(answers[0.0].text)
