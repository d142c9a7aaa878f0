"""Breakpoint sessions over a streamed tiny Llama (fp32, CPU; issue 21 items 1, 2, 4, 6): 7 decoder layers stream
through 3 ring slots (ring reuse, a layer count the slots do not divide), and every session -- paused, swapped,
resumed at each L, edited, forked, evicted by a tiny slab -- equals the resident model bit for bit in logits and greedy
tokens. A resume from L streams exactly layers L..n-1. Speed is never checked here."""

from __future__ import annotations

import logging

import pytest
import torch

from djinn_core.bench.experiments.exp4_streamed_sessions import PlainSession, padded_step_reference
from djinn_core.errors import (AdmissionRefused, CacheCapacityExceeded, CheckpointStateError, ConfigError,
                               StreamingBudgetTooSmall)
from djinn_core.memory.host_pool import HostPool
from djinn_core.models import build_model
from djinn_core.runtime import SessionState, plain_run
from djinn_core.runtime.batch import decode_batch
from djinn_core.runtime.streamed import StreamedBreakpointRuntime, build_streamed_runtime
from djinn_core.streaming.budget_split import RingFirstSplit

pytestmark = pytest.mark.cpu
log = logging.getLogger(__name__)

MiB = 1 << 20
LAYERS, SLOTS, NEW, PROMPT = 7, 3, 5, 20
SPLIT = RingFirstSplit(ring_slots=SLOTS, session_tokens=PROMPT + NEW, activation_headroom_bytes=MiB)


def _runtime(budget_bytes: int = 16 * MiB, split: RingFirstSplit = SPLIT, **kw) -> StreamedBreakpointRuntime:
    return build_streamed_runtime("llama-tiny", budget_bytes=budget_bytes, split=split, device="cpu",
                                  dtype=torch.float32, seed=0, num_layers=LAYERS, chunk_bytes=64 << 10,
                                  progress=False, **kw)


@pytest.fixture(scope="module")
def resident():
    model = build_model("llama-tiny", dtype=torch.float32, seed=0, num_layers=LAYERS)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    return model, ids, plain_run(model, ids, NEW)


@pytest.fixture
def rt():
    runtime = _runtime()
    yield runtime
    runtime.check_invariants()
    runtime.release()
    assert runtime.slab.stats.used == 0 and runtime.host_pool.stats.used == 0
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in runtime.model.modules())


def _steer(scale: float = 4.0) -> torch.Tensor:
    return scale * torch.randn(128, generator=torch.Generator().manual_seed(5))


def _same(logits, tokens, steps, ref) -> bool:
    return torch.equal(logits, ref[0]) and torch.equal(tokens, ref[1]) and torch.equal(steps, ref[2])


def test_a_session_paused_at_every_layer_is_bitwise_the_resident_model_and_a_resume_streams_only_what_follows(
        resident, rt):
    _, ids, ref = resident
    sm = rt.streamed
    layer_bytes = sm.layout.used_bytes
    for layer in range(LAYERS + 1):
        s = rt.open(ids, max_new_tokens=NEW)
        before = sm.bytes_streamed
        s.run_to(layer)
        assert sm.bytes_streamed - before == layer * layer_bytes  # nothing prefetched past the breakpoint
        s.pause()
        before = sm.bytes_streamed
        logits = s.resume()
        assert sm.bytes_streamed - before == (LAYERS - layer) * layer_bytes  # layers L..n-1, the head stays resident
        before = sm.bytes_streamed
        tokens, steps = s.generate(NEW, return_logits=True)
        assert sm.bytes_streamed - before == (NEW - 1) * LAYERS * layer_bytes  # every layer, every decode step
        assert _same(logits, tokens, steps, ref), layer
        s.close()


def test_a_resume_after_other_forwards_starts_a_pass_at_L_and_streams_n_minus_L_layers(resident, rt):
    _, ids, ref = resident
    sm = rt.streamed
    a, b = rt.open(ids, max_new_tokens=NEW), rt.open(ids, max_new_tokens=NEW)
    a.run_to(4)
    b.run_to(2)  # another pass, stopped elsewhere, rotated the ring in between
    b.resume()
    b.generate(2)
    before, passes = sm.layers_streamed, sm.passes
    logits = a.resume()
    assert sm.layers_streamed - before == LAYERS - 4 and sm.passes == passes + 1
    assert _same(logits, *a.generate(NEW, return_logits=True), ref)


def test_an_edit_then_resume_equals_a_plain_forward_hook_on_the_resident_model(resident, rt):
    model, ids, _ = resident
    v = _steer()
    for layer in (0, 3, LAYERS):
        ref = plain_run(model, ids, NEW, layer=layer, edit=lambda h: h + v)
        s = rt.open(ids, max_new_tokens=NEW)
        s.run_to(layer).edit(lambda h: h + v)
        s.pause()
        ck = s.restore()  # a paused checkpoint is readable again after a restore
        assert torch.equal(ck.hidden, s.checkpoint.hidden)
        s.pause()
        logits = s.resume()
        assert _same(logits, *s.generate(NEW, return_logits=True), ref), layer
        s.close()
    assert not torch.equal(plain_run(model, ids, NEW, layer=3, edit=lambda h: h + v)[1], plain_run(model, ids, NEW)[1])


def test_forks_with_their_own_edits_are_independent_and_bitwise(resident, rt):
    model, ids, ref = resident
    v = _steer(3.0)
    parent = rt.open(ids, max_new_tokens=NEW)
    parent.run_to(2)
    parent.pause()
    forks = parent.fork(3)  # from a paused parent: restored first
    for k, f in enumerate(forks):
        f.checkpoint.edit(lambda h: h + k * v)
        if k == 1:
            f.pause()
    for k, f in enumerate(forks):
        expect = plain_run(model, ids, NEW, layer=2, edit=lambda h: h + k * v)
        assert _same(f.resume(), *f.generate(NEW, return_logits=True), expect), k
    parent.pause()
    assert _same(parent.resume(), *parent.generate(NEW, return_logits=True), ref)


def _budget_for(slab_bytes: int) -> int:
    """The budget whose split leaves ``slab_bytes`` of slab (the fixed part measured from a large budget)."""
    big = 64 * MiB
    return big - SPLIT.split(build_model("llama-tiny", dtype=torch.float32, num_layers=LAYERS,
                                         materialize=False), big, fused_attention=False).slab_bytes + slab_bytes


def test_a_slab_of_two_sessions_evicts_idle_ones_to_the_host_and_every_session_stays_bitwise(resident):
    model, ids, ref = resident
    session = SPLIT.split(build_model("llama-tiny", dtype=torch.float32, num_layers=LAYERS, materialize=False),
                          64 * MiB, fused_attention=False).session_bytes
    rt = _runtime(_budget_for(2 * session + session // 2), host_pool=HostPool(8 * MiB, segment_bytes=MiB, pin=False))
    assert rt.split.sessions_resident == 2
    v = _steer(2.0)
    sessions = [rt.open(ids, max_new_tokens=NEW) for _ in range(5)]
    for k, s in enumerate(sessions):  # a checkpoint that does not fit evicts the least recently used idle one
        s.run_to((3, 5, 3, 6, LAYERS)[k])
        if k == 2:
            s.checkpoint.edit(lambda h: h + v)
    assert rt.evictions > 0 and any(s.state is SessionState.PAUSED for s in sessions)
    rt.check_invariants()
    for s in sessions:  # resuming each evicts the others; decoding in two pieces, interleaved, swaps them again
        s.resume()
        s.generate(2)
    for k, s in enumerate(sessions):
        assert s.state in (SessionState.RUNNING, SessionState.SWAPPED)
        expect = plain_run(model, ids, NEW, layer=3, edit=lambda h: h + v)[1] if k == 2 else ref[1]
        assert torch.equal(torch.cat([s.generated[0], s.generate(NEW - 2)], 1), expect), k
        rt.check_invariants()
    assert any(s.state is SessionState.SWAPPED for s in sessions)
    rt.release()
    assert rt.slab.stats.used == 0 and rt.host_pool.stats.used == 0


def test_a_session_that_can_never_fit_is_refused_and_the_others_continue(resident):
    model, ids, ref = resident
    rt = _runtime(_budget_for(2 * SPLIT.split(build_model("llama-tiny", dtype=torch.float32, num_layers=LAYERS,
                                                          materialize=False), 64 * MiB).session_bytes))
    other = rt.open(ids, max_new_tokens=NEW)
    other.run_to(3)
    huge = rt.open(ids, max_new_tokens=4000)  # its KV alone exceeds the slab
    streamed = rt.streamed.bytes_streamed
    with pytest.raises(AdmissionRefused, match="never be admitted"):
        huge.run_to(2)
    assert huge.state is SessionState.OPEN and rt.streamed.bytes_streamed == streamed  # refused before any load
    huge.close()
    rt.check_invariants()
    assert _same(other.resume(), *other.generate(NEW, return_logits=True), ref)
    rt.release()


def test_the_split_is_reported_and_assigns_the_whole_budget(rt):
    d = rt.stats()["split"]
    assert d["policy"] == "ring-first" and d["slots"] == SLOTS == rt.streamed.slots
    assert d["ring_bytes"] == rt.streamed.ring_bytes and d["slab_bytes"] == rt.slab.capacity
    assert d["budget_bytes"] - 256 < d["planned_bytes"] <= d["budget_bytes"]
    assert d["ring_bytes"] + d["resident_bytes"] + d["activation_bytes"] + d["slab_bytes"] == d["planned_bytes"]
    assert rt.streamed.stats()["budget"] == d  # the streamed model reports the same plan


def test_a_budget_too_small_for_the_ring_and_one_session_is_refused_with_the_numbers():
    need = _budget_for(0) + SPLIT.split(build_model("llama-tiny", dtype=torch.float32, num_layers=LAYERS,
                                                    materialize=False), 64 * MiB).session_bytes
    with pytest.raises(StreamingBudgetTooSmall, match=rf"{SLOTS} slots x \d+ bytes.*one session.*needs at least"):
        _runtime(need - 1024)
    _runtime(need + 256).release()  # just enough: one session fits


def test_bad_arguments_are_config_errors():
    for kw in (dict(ring_slots=0), dict(session_tokens=0), dict(activation_headroom_bytes=-1),
               dict(ring_slots=2.0), dict(device_overhead_bytes=True), dict(decode_batch=0)):
        with pytest.raises(ConfigError):
            RingFirstSplit(**kw)
    rt = _runtime()
    with pytest.raises(ConfigError, match="set by the streamed runtime"):
        StreamedBreakpointRuntime(rt.streamed, rt.split, slab_bytes=1 << 20)
    with pytest.raises(ConfigError):
        StreamedBreakpointRuntime(rt.model, rt.split)
    rt.release()
    with pytest.raises(ConfigError, match="removed"):
        StreamedBreakpointRuntime(rt.streamed, rt.split)


def test_the_split_sizes_activations_for_its_largest_batched_decode_step():
    """A batched decode step of k sessions gathers each layer's padded K/V and repeats it to every query head: on
    the 70B architecture at k=64 and 528 tokens that is 1.11 GB a layer for the repeat alone, against 0.3 GB for one
    2048-token prefill (the H200 run that ran out of memory inside the one-prefill headroom). The split takes the
    larger, so the slab shrinks instead of the step running out of memory."""
    from djinn_core.streaming.plan import batched_decode_bytes

    model = build_model("llama2-70b", num_layers=2, dtype=torch.float16, materialize=False)
    c = model.config
    one = RingFirstSplit(session_tokens=528).split(model, 24 << 30, fused_attention=True)
    many = RingFirstSplit(session_tokens=528, decode_batch=64).split(model, 24 << 30, fused_attention=True)
    repeat = 2 * 64 * c.num_attention_heads * 529 * (c.hidden_size // c.num_attention_heads) * 2
    assert repeat > 1_000_000_000 > one.activation_bytes
    assert many.activation_bytes == batched_decode_bytes(c, batch=64, context_tokens=528) > repeat
    assert abs((one.slab_bytes - many.slab_bytes) - (many.activation_bytes - one.activation_bytes)) < 512
    assert RingFirstSplit(session_tokens=528, decode_batch=1).split(model, 24 << 30).activation_bytes == \
        one.activation_bytes


# ----------------------------------------------------------------------------------------- batched decode (item 3)
def test_batched_decode_across_sessions_joining_and_leaving_is_bitwise_the_padded_plain_step(resident, rt):
    """Sessions at different lengths (prompts of 12/20/7/16 tokens, resumed from different layers, one a fork with
    an edit) decode in batches whose composition changes every step, one member swapped to the host in between. Each
    step streams the layers once for the whole batch, and every session's tokens and logits equal the plain forward
    of the same composition (:func:`padded_step_reference`). Where batched decoding first differs from each session
    decoded alone is logged, not asserted (a batch changes GEMM shapes)."""
    model, _, _ = resident
    v = _steer(2.0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (1, n), generator=g) for n in (12, 20, 7, 16)]
    sessions, refs = [], []
    for k, (ids, layer) in enumerate(zip(prompts, (2, LAYERS, 0, 4))):
        s = rt.open(ids, max_new_tokens=8)
        s.run_to(layer)
        if k == 3:  # a fork, edited: shares the parent's KV prefix copy-on-write
            parent, s = s, s.fork(1)[0]
            s.checkpoint.edit(lambda h: h + v)
            parent.close()
        s.resume()
        sessions.append(s)
        refs.append(PlainSession(model, ids, layer, (lambda h: h + v) if k == 3 else None))
    steps = [[0, 1], [0, 1, 2], [1, 2, 3], [0, 2, 3], [3, 0, 1, 2], [2, 0]]
    for n, members in enumerate(steps):
        if n == 4:
            sessions[1].pause()  # between steps: its KV goes to the host, the step brings it back
            assert sessions[1].state is SessionState.SWAPPED
        before = rt.streamed.layers_streamed
        tokens, logits = decode_batch(rt, [sessions[i] for i in members], return_logits=True)
        want_tokens, want_logits = padded_step_reference(model, [refs[i] for i in members])
        fed = any(s.generated[:-1] for s in (sessions[i] for i in members))
        assert rt.streamed.layers_streamed - before == (LAYERS if fed else 0), n  # one weight pass per step
        for got, want, gl, wl in zip(tokens, want_tokens, logits, want_logits):
            assert torch.equal(got, want) and torch.equal(gl, wl), (n, members)
        rt.check_invariants()
    for k, s in enumerate(sessions):  # decoding alone afterwards continues each session where the batch left it
        alone = plain_run(model, prompts[k], len(s.generated) + 1, layer=(2, LAYERS, 0, 4)[k],
                          edit=(lambda h: h + v) if k == 3 else None)[1]
        s.generate(1)
        batched = torch.cat(s.generated, 1)
        differ = (batched != alone).nonzero()
        log.info("session %d: batched decode first differs from decoding alone at step %s", k,
                 int(differ[0, 1]) if len(differ) else None)


def test_batched_decode_under_pressure_swaps_sessions_between_steps_and_loses_nothing(resident):
    """More decoding sessions than the slab holds (five, room for two and a half): each batched step brings its
    members back from the host, evicting idle ones, and every session's tokens and logits still equal the plain
    forward of the same composition; nothing is lost, the accounting holds after every step."""
    model, _, _ = resident
    session = SPLIT.split(build_model("llama-tiny", dtype=torch.float32, num_layers=LAYERS, materialize=False),
                          64 * MiB, fused_attention=False).session_bytes
    rt = _runtime(_budget_for(2 * session + session // 2), host_pool=HostPool(8 * MiB, segment_bytes=MiB, pin=False))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (1, n), generator=g) for n in (9, 14, 6, 11, 8)]
    sessions, refs = [], []
    for ids in prompts:
        s = rt.open(ids, max_new_tokens=6)
        s.run_to(LAYERS)
        s.resume()
        sessions.append(s)
        refs.append(PlainSession(model, ids))
    steps = [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4], [0, 2], [1, 3], [4, 1]]
    before = rt.evictions
    for n, members in enumerate(steps):
        tokens, logits = decode_batch(rt, [sessions[i] for i in members], return_logits=True)
        want_tokens, want_logits = padded_step_reference(model, [refs[i] for i in members])
        for got, want, gl, wl in zip(tokens, want_tokens, logits, want_logits):
            assert torch.equal(got, want) and torch.equal(gl, wl), (n, members)
        rt.check_invariants()
    assert rt.evictions > before, "the slab was meant to force swapping between steps"
    assert any(s.state is SessionState.SWAPPED for s in sessions)
    assert [len(s.generated) for s in sessions] == [len(r.generated) for r in refs]
    rt.release()
    assert rt.slab.stats.used == 0 and rt.host_pool.stats.used == 0


def test_batched_decode_refuses_bad_batches_and_changes_nothing(resident, rt):
    _, ids, _ = resident
    a, b = rt.open(ids, max_new_tokens=2), rt.open(ids, max_new_tokens=NEW)
    a.run_to(3)
    with pytest.raises(CheckpointStateError, match="resume first"):
        decode_batch(rt, [a])
    a.resume()
    b.run_to(1)
    b.resume()
    with pytest.raises(ConfigError, match="twice"):
        decode_batch(rt, [a, a])
    other = _runtime()
    with pytest.raises(ConfigError, match="another runtime"):
        decode_batch(other, [a])
    other.release()
    decode_batch(rt, [a, b])
    decode_batch(rt, [a, b])
    with pytest.raises(CacheCapacityExceeded):
        decode_batch(rt, [b, a])  # a has no token left: b is not stepped either
    assert [len(s.generated) for s in (a, b)] == [2, 2] and decode_batch(rt, []) == []


def test_a_resume_starts_loading_its_first_layer_before_it_readies_the_session(resident, rt):
    """A resume asks the streamed model for layer L before it brings the session back (prefetch): straight after
    run_to(L) the stopped pass continues; after another forward ran, a pass prefetched at L is adopted. Either way
    layers L.. stream once, nothing prefetched is dropped, and the answers are the resident model's."""
    model, ids, ref = resident
    sm = rt.streamed
    a = rt.open(ids, max_new_tokens=NEW)
    a.run_to(4)
    before = (sm.layers_streamed, sm.prefetches)
    logits = a.resume()
    assert (sm.layers_streamed - before[0], sm.prefetches - before[1]) == (LAYERS - 4, 0)  # the pass continued
    assert torch.equal(logits, ref[0])
    b = rt.open(ids, max_new_tokens=NEW)
    b.run_to(2)
    b.pause()
    a.generate(2)  # a decode step, another forward: b's stopped pass is gone
    before = (sm.layers_streamed, sm.prefetches)
    assert torch.equal(b.resume(), ref[0])
    assert (sm.layers_streamed - before[0], sm.prefetches - before[1]) == (LAYERS - 2, 1)  # a prefetched pass
    assert sm.bytes_dropped == 0
    assert torch.equal(b.generate(NEW, return_logits=True)[0], ref[1])
    a.close()
    b.close()

