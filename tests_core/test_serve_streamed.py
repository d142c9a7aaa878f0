"""``djinn serve --stream --vram-budget``: a real server process over a streamed tiny Llama (fp32, CPU; issue 21 item
5). Its 7 decoder layers stream through 3 ring slots (ring reuse, a layer count the slots do not divide) and its
budget leaves a slab of two sessions (idle sessions are evicted to the host). Remote sessions -- run_to, edit, pause,
resume, fork, generate -- equal the resident model's plain run bit for bit. The split the server logs at start is the
policy's. Bad combinations are typed errors before anything loads. Speed is never checked here."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from djinn_core.cli import main
from djinn_core.models import build_model
from djinn_core.rpc.client import Client
from djinn_core.rpc.process import ServerProcess
from djinn_core.runtime import plain_run
from djinn_core.streaming.budget_split import RingFirstSplit

pytestmark = pytest.mark.cpu

MiB = 1 << 20
LAYERS, SLOTS, NEW, PROMPT = 7, 3, 5, 20
SPLIT = RingFirstSplit(ring_slots=SLOTS, session_tokens=PROMPT + NEW)


def _meta():
    return build_model("llama-tiny", dtype=torch.float32, num_layers=LAYERS, materialize=False)


def _budget(sessions: float) -> int:
    """The budget whose ring-first split leaves a slab of ``sessions`` sessions of PROMPT + NEW tokens."""
    big = SPLIT.split(_meta(), 1 << 30, fused_attention=False)
    return (1 << 30) - big.slab_bytes + int(sessions * big.session_bytes)


BUDGET = _budget(2.5)
ARGS = ["--model", "llama-tiny", "--device", "cpu", "--dtype", "float32", "--num-layers", str(LAYERS), "--stream",
        "--vram-budget", str(BUDGET), "--ring-slots", str(SLOTS), "--session-tokens", str(PROMPT + NEW),
        "--host-pool-bytes", "8MiB",  # the default pool, as large as the slab, holds only 2 evicted sessions
        "--stats-interval-s", "0", "--busy-poll-s", "0.05"]


@pytest.fixture(scope="module")
def resident():
    model = build_model("llama-tiny", dtype=torch.float32, seed=0, num_layers=LAYERS)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    return model, ids, plain_run(model, ids, NEW)


@pytest.fixture(scope="module")
def served():
    srv = ServerProcess(ARGS, start_timeout_s=120)
    yield srv
    assert srv.stop() == 0, "".join(srv.output)


@pytest.fixture
def client(served):
    with Client(served.address, timeout_s=60) as c:
        yield c
        for info in c.sessions():
            c.session(info["session"]).close()


def _steer(scale: float) -> torch.Tensor:
    return scale * torch.randn(128, generator=torch.Generator().manual_seed(5))


def _same(got, ref) -> bool:
    return all(torch.equal(a, b) for a, b in zip(got, ref))


def test_the_server_logs_the_policys_split_of_the_budget(served):
    expect = SPLIT.split(_meta(), BUDGET, fused_attention=False).to_dict()
    lines = [line for line in served.output if "--stream: VRAM split " in line]
    assert len(lines) == 1, "".join(served.output)
    logged = json.loads(lines[0].split("--stream: VRAM split ", 1)[1])
    assert logged == expect and logged["slots"] == SLOTS and logged["sessions_resident"] == 2
    assert any("no allocator cap" in line for line in served.output)  # the CPU: the budget is the streaming budget


def test_remote_sessions_paused_and_edited_at_each_layer_are_bitwise_the_resident_model(resident, client):
    model, ids, ref = resident
    v = _steer(4.0)
    for layer in (0, 3, LAYERS):
        s = client.open(ids, max_new_tokens=NEW)
        ck = s.run_to(layer)
        assert ck.layer == layer and ck.shape == (1, PROMPT, 128)
        s.pause()
        assert s.state == "paused"
        assert _same((s.resume(), *s.generate(NEW, return_logits=True)), ref), layer
        s.close()
        expect = plain_run(model, ids, NEW, layer=layer, edit=lambda h: h + v)
        s = client.open(ids, max_new_tokens=NEW)
        s.run_to(layer).edit(lambda h: h + v)
        s.pause()
        assert _same((s.resume(), *s.generate(NEW, return_logits=True)), expect), layer
        s.close()
    assert not torch.equal(expect[1], ref[1])  # the edit changes the answer


def test_forks_and_eviction_to_the_host_keep_every_session_bitwise(resident, client):
    """Two forks and two more sessions: the slab holds two, so idle ones are evicted and come back."""
    model, ids, ref = resident
    v = _steer(3.0)
    evictions = client.stats()["evictions"]
    parent = client.open(ids, max_new_tokens=NEW)
    parent.run_to(2)
    forks = parent.fork(2)
    forks[1].checkpoint.edit(lambda h: h + v)
    others = [client.open(ids, max_new_tokens=NEW) for _ in range(2)]
    for s, layer in zip(others, (5, 1)):
        s.run_to(layer)
    sessions = [parent, *forks, *others]
    first = []
    for s in sessions:  # resuming each and decoding part of its answer evicts the others
        s.resume()
        first.append(s.generate(2))
    stats = client.stats()
    assert stats["evictions"] > evictions, stats
    assert stats["streamed"]["streaming"]["bytes_streamed"] > 0 and stats["streamed"]["split"]["slots"] == SLOTS
    edited = plain_run(model, ids, NEW, layer=2, edit=lambda h: h + v)[1]
    for k, s in enumerate(sessions):  # the rest of each answer, swapped back in as needed
        tokens = torch.cat([first[k], s.generate(NEW - 2)], 1)
        assert torch.equal(tokens, edited if k == 2 else ref[1]), k
        s.close()


@pytest.mark.parametrize("argv, match", [
    (["--stream"], "--stream needs --vram-budget"),
    (["--stream", "--vram-budget", "1GiB", "--slab-bytes", "1M"], "--stream takes no --slab-bytes"),
    (["--vram-budget", "1GiB"], "applies to a CUDA device, not cpu"),
    (["--stream", "--vram-budget", "card"], "card needs a CUDA device"),
    (["--ring-slots", "2"], "apply to --stream only"),
    (["--stream", "--vram-budget", "1GiB", "--ring-slots", "0"], "ring_slots"),
    (["--stream", "--vram-budget", "4MiB"], "needs at least"),  # the ring and one session do not fit
], ids=["no-budget", "slab-bytes", "budget-without-stream", "card-on-cpu", "ring-slots-alone", "zero-slots",
        "too-small"])
def test_bad_stream_arguments_are_typed_errors(argv, match, caplog):
    with caplog.at_level(logging.ERROR):
        rc = main(["serve", "--model", "llama-tiny", "--device", "cpu", "--port", "0", *argv])
    assert rc == 2
    assert any(match in r.getMessage() for r in caplog.records), caplog.text


def test_a_decimal_budget_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as ei:  # '24GB' is ambiguous: write 24GiB
        main(["serve", "--model", "llama-tiny", "--device", "cpu", "--stream", "--vram-budget", "24GB"])
    assert ei.value.code == 2 and "ambiguous" in capsys.readouterr().err


def test_an_existing_models_own_weights_stream_bitwise_and_come_back_on_release(resident):
    """``stream_model``: what ``--stream`` does for ``smollm2`` or a ``.gguf`` (a loaded model, not an architecture)."""
    from djinn_core.errors import ConfigError
    from djinn_core.rpc.loading import stream_model

    ref_model, ids, ref = resident
    model = build_model("llama-tiny", dtype=torch.float32, seed=0, num_layers=LAYERS)
    params = [p for p in model.parameters()]
    rt = stream_model(model, budget_bytes=BUDGET, split=SPLIT, device="cpu", progress=False)
    try:
        assert rt.streamed.slots == SLOTS and rt.slab.capacity == rt.split.slab_bytes
        s = rt.open(ids, max_new_tokens=NEW)
        s.run_to(4)
        s.pause()
        assert _same((s.resume(), *s.generate(NEW, return_logits=True)), ref)
    finally:
        rt.release()
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # the same parameters, hooks gone
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with pytest.raises(ConfigError, match="materialised"):
        stream_model(build_model("llama-tiny", materialize=False), budget_bytes=BUDGET, device="cpu")


def test_the_shared_session_script_runs_remotely_through_a_fork(resident, client):
    """token_accuracy.session_run, as exp4_served drives the GPU server: open, run_to, fork, edit, pause, resume,
    generate through a Client equal the plain run with the edit."""
    from djinn_core.bench.experiments.token_accuracy import session_run

    model, ids, _ = resident
    v = _steer(2.0)
    got = session_run(client, ids, 3, NEW, edit=lambda h: h + v, fork=True)
    assert _same(got, plain_run(model, ids, NEW, layer=3, edit=lambda h: h + v))
    assert not client.sessions()  # the parent closed at the fork, the child at the end
