"""The steering example steers: its answers stop at end-of-turn, its strength-0 fork is the unsteered run bitwise, its
steered fork is the run with the same edit bitwise and speaks more of the concept; and the same edit written with
nnsight 0.8.1 gives the same logits as Djinn's."""

from __future__ import annotations

import time

import pytest
import torch

from djinn_core.runtime import BreakpointRuntime, plain_run
from fixtures.examples import load_example


@pytest.fixture(scope="module")
def example():
    return load_example("steering")


@pytest.fixture(scope="module")
def steered(example, smollm2_cpu):
    """The example's answers at strength 0 and at its strongest strength (the default layer, prompt and pairs)."""
    strong = max(example.STRENGTHS)
    answers = example.steer(strengths=(0.0, strong), model_and_tok=smollm2_cpu)
    return answers[0.0], answers[strong], strong


def _reference_tokens(example, smollm2_cpu, n: int, strength: float) -> list[int]:
    """``n`` greedy tokens of an uninterrupted run of the example's prompt; with ``strength`` != 0 its prefill adds
    ``strength * v`` to the hidden state entering the example's layer (a plain forward pre-hook, no breakpoint)."""
    model, tok = smollm2_cpu
    layer = example.LAYER
    edit = None
    if strength:
        rt = BreakpointRuntime(model)
        try:
            v = example.steering_vector(rt, tok, layer)
        finally:
            rt.close_all()
        edit = lambda h: h + strength * v  # noqa: E731
    _, tokens, _ = plain_run(model, example.chat_ids(tok, example.PROMPT), n, layer=layer, edit=edit)
    return tokens[0].tolist()


@pytest.mark.cpu
@pytest.mark.slow
def test_answers_stop_at_end_of_turn_with_clean_text(example, steered, smollm2_cpu):
    _, tok = smollm2_cpu
    stop = example.end_of_turn_ids(tok)
    unsteered, strong, _ = steered
    assert unsteered.ended  # a one-sentence answer ends well within the budget
    for turn in (unsteered, strong):
        body = turn.tokens[:-1] if turn.ended else turn.tokens
        assert not stop & set(body)  # nothing generated past the first end-of-turn token
        if turn.ended:
            assert turn.tokens[-1] in stop
        else:
            assert len(turn.tokens) == example.MAX_TOKENS
        assert turn.text and turn.text == tok.decode(body, skip_special_tokens=True).strip()
        assert "<|" not in turn.text
        assert not {line.strip() for line in turn.text.splitlines()} & {"system", "user", "assistant"}


@pytest.mark.cpu
@pytest.mark.slow
def test_strength_zero_fork_is_the_unsteered_run_bitwise(example, steered, smollm2_cpu):
    unsteered, _, _ = steered
    assert unsteered.tokens == _reference_tokens(example, smollm2_cpu, len(unsteered.tokens), 0.0)


@pytest.mark.cpu
@pytest.mark.slow
def test_steered_fork_is_the_edited_run_and_speaks_the_concept(example, steered, smollm2_cpu):
    unsteered, strong, strength = steered
    n = min(len(strong.tokens), 16)  # enough to carry the edit (it diverges from the unsteered run within a few)
    assert strong.tokens[:n] == _reference_tokens(example, smollm2_cpu, n, strength)
    assert strong.tokens != unsteered.tokens
    assert example.concept_count(strong.text) > example.concept_count(unsteered.text)


@pytest.mark.cpu
@pytest.mark.slow
def test_nnsight_edit_gives_the_same_logits_as_djinn(smollm2_cpu, smollm2_chat_ids, claim):
    nnsight = pytest.importorskip("nnsight", reason="nnsight 0.8.1 is not installed (pip install nnsight==0.8.1)")
    model, _ = smollm2_cpu
    ids = smollm2_chat_ids
    layer = model.config.num_hidden_layers // 2
    v = 4.0 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    nm = nnsight.NNsight(model)

    def nnsight_edit():
        with nm.trace(ids):
            nm.model.layers[layer - 1].output = nm.model.layers[layer - 1].output + v
            out = nm.output.save()
        return out.logits

    rt = BreakpointRuntime(model)
    s = rt.open(ids, max_new_tokens=0)
    s.run_to(layer)
    s.pause()

    def djinn_edit_and_resume():
        s.restore().hidden.add_(v)
        return s.resume()

    t0 = time.perf_counter()
    theirs = nnsight_edit()
    nnsight_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    ours = djinn_edit_and_resume()
    djinn_ms = (time.perf_counter() - t0) * 1e3
    rt.close_all()
    claim.info(peer="nnsight 0.8.1", nnsight_edit_and_continue_ms=nnsight_ms, djinn_restore_edit_resume_ms=djinn_ms,
               layer=layer, note="CPU host timings, one run each: a peer figure, not a claim")
    assert torch.equal(theirs, ours)
