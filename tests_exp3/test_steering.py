"""The steering example runs, and the same edit written with nnsight 0.8.1 gives the same logits as Djinn's."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from djinn_core.runtime import BreakpointRuntime

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("steering_example", ROOT / "examples" / "steering.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.cpu
@pytest.mark.slow
def test_steering_example_runs_and_steers(smollm2_cpu):
    answers = _load_example().steer(tokens=12, strengths=(0.0, 8.0), model_and_tok=smollm2_cpu)
    assert set(answers) == {0.0, 8.0} and all(isinstance(a, str) and a for a in answers.values())


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

    rt = BreakpointRuntime(model, budget_bytes=256 << 20)
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
