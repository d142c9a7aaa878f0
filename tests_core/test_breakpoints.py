"""Breakpoint sessions on tiny Llama / Mistral / Qwen2 configs (fp32, CPU): bit-exactness, edits, forks, errors."""

from __future__ import annotations

import pytest
import torch

from djinn_core.runtime import HEAD, BreakpointRuntime, SessionState, plain_run
from djinn_core.errors import CacheCapacityExceeded, CheckpointStateError, ConfigError, InvalidEdit, InvalidLayer, UnknownSession
from djinn_core.memory.host_pool import HostPool
from djinn_core.models import build_model
from djinn_core.memory.slab import Slab

pytestmark = pytest.mark.cpu

ARCHS = ["llama-tiny", "mistral-tiny", "qwen2-tiny"]
NEW = 6


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    model = build_model(request.param, dtype=torch.float32, seed=7)
    ids = torch.randint(0, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(1))
    return model, ids


@pytest.fixture
def rt(tiny):
    runtime = BreakpointRuntime(tiny[0], slab_bytes=32 << 20)
    yield runtime
    runtime.check_invariants()
    runtime.close_all()
    assert runtime.slab.stats.used == 0 and runtime.host_pool.stats.used == 0


def _steer(hidden_size: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(hidden_size, generator=torch.Generator().manual_seed(5))


def _assert_same(got, ref):
    logits, tokens, steps = got
    assert torch.equal(logits, ref[0]), "prompt logits differ"
    assert torch.equal(tokens, ref[1]) and torch.equal(steps, ref[2]), "generated tokens/logits differ"


def _run(rt, ids, layer, *, pause, edit=None):
    s = rt.open(ids, max_new_tokens=NEW)
    ck = s.run_to(layer)
    if edit is not None:
        ck.hidden.copy_(edit(ck.hidden))
    if pause:
        s.pause()
    logits = s.resume()
    tokens, steps = s.generate(NEW, return_logits=True)
    s.close()
    return logits, tokens, steps


def test_no_edit_every_layer_is_bitwise_equal_to_an_uninterrupted_run(tiny, rt):
    model, ids = tiny
    ref = plain_run(model, ids, NEW)
    n = model.config.num_hidden_layers
    for layer in range(n + 1):
        _assert_same(_run(rt, ids, layer, pause=True), ref)
    for layer in (0, n // 2, n):
        _assert_same(_run(rt, ids, layer, pause=False), ref)


def test_edit_is_bitwise_equal_to_a_plain_forward_hook(tiny, rt):
    model, ids = tiny
    v = _steer(model.config.hidden_size, 4.0)
    for layer in (0, 2, model.config.num_hidden_layers):
        ref = plain_run(model, ids, NEW, layer=layer, edit=lambda h: h + v)
        assert not torch.equal(ref[1], plain_run(model, ids, NEW)[1]) or layer == model.config.num_hidden_layers
        _assert_same(_run(rt, ids, layer, pause=True, edit=lambda h: h + v), ref)


def test_edit_by_tensor_and_by_function(tiny, rt):
    model, ids = tiny
    v = _steer(model.config.hidden_size, 2.0)
    ref = plain_run(model, ids, NEW, layer=1, edit=lambda h: h * 0.5 + v)
    for how in ("tensor", "fn", "fn_inplace"):
        s = rt.open(ids, max_new_tokens=NEW)
        ck = s.run_to(1)
        if how == "tensor":
            ck.edit(ck.hidden * 0.5 + v)
        elif how == "fn":
            ck.edit(lambda h: h * 0.5 + v)
        else:
            def in_place(h):
                h.mul_(0.5).add_(v)  # returns None: the edited copy is taken

            ck.edit(in_place)
        s.pause()
        assert torch.equal(s.resume(), ref[0]) and torch.equal(s.generate(NEW), ref[1])


def test_hooks_are_removed_and_model_outputs_unchanged(tiny, rt):
    model, ids = tiny
    before = model(ids).logits
    s = rt.open(ids, max_new_tokens=NEW)
    s.run_to(2)
    s.pause()
    s.resume()
    s.generate(NEW)
    s.close()
    with pytest.raises(InvalidLayer):
        rt.open(ids).run_to(99)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(model(ids).logits, before)


def test_forks_are_independent_and_share_the_prefix(tiny, rt):
    model, ids = tiny
    v = _steer(model.config.hidden_size, 3.0)
    parent = rt.open(ids, max_new_tokens=NEW)
    parent.run_to(2)
    used = rt.slab.stats.used
    forks = parent.fork(3)
    hidden_bytes = parent.checkpoint.hidden.numel() * 4
    assert rt.slab.stats.used - used < 3 * (hidden_bytes + 4096 * 10)  # KV of layers 0..1 not copied
    results = []
    for k, f in enumerate(forks):
        f.checkpoint.edit(lambda h: h + k * v)
        if k == 1:
            f.pause()
        f.resume()
        results.append(f.generate(NEW))
    for k, tokens in enumerate(results):
        assert torch.equal(tokens, plain_run(model, ids, NEW, layer=2, edit=lambda h: h + k * v)[1])
    parent.pause()
    parent.resume()
    assert torch.equal(parent.generate(NEW), plain_run(model, ids, NEW)[1])


def test_pause_returns_memory_and_lru_eviction_pauses_idle_checkpoints(tiny):
    model, ids = tiny
    probe = BreakpointRuntime(model, slab_bytes=32 << 20)
    s = probe.open(ids, max_new_tokens=NEW)
    s.run_to(model.config.num_hidden_layers)
    one = probe.slab.stats.used
    s.pause()
    assert probe.slab.stats.used == probe.spare_bytes > 0 and probe.host_pool.stats.used > 0
    probe.close_all()
    # a slab for about two checkpoints: the third evicts the least recently used idle one
    rt = BreakpointRuntime(model, slab_bytes=int(one * 2.5), host_pool=HostPool(8 << 20, segment_bytes=1 << 20))
    a, b, c = (rt.open(ids, max_new_tokens=NEW) for _ in range(3))
    a.run_to(model.config.num_hidden_layers)
    b.run_to(model.config.num_hidden_layers)
    a.checkpoint.edit(a.checkpoint.hidden)  # a is now more recent than b
    c.run_to(model.config.num_hidden_layers)
    assert b.state is SessionState.PAUSED and a.state is SessionState.CHECKPOINT
    ref = plain_run(model, ids, NEW)
    for s in (a, b, c):
        if s is not b:
            s.pause()  # keep the slab free enough for the continuation
    for s in (a, b, c):
        assert torch.equal(s.resume(), ref[0]) and torch.equal(s.generate(NEW), ref[1])
        s.close()


def test_bad_layer_is_a_typed_error_and_leaves_the_session_usable(tiny, rt):
    model, ids = tiny
    s = rt.open(ids, max_new_tokens=NEW)
    for bad in (-1, model.config.num_hidden_layers + 1, "2", 1.0, True):
        with pytest.raises(InvalidLayer):
            s.run_to(bad)
    assert s.state is SessionState.OPEN
    s.run_to(1)
    assert torch.equal(s.resume(), plain_run(model, ids, 0)[0])


def test_bad_edits_leave_the_checkpoint_intact(tiny, rt):
    model, ids = tiny
    s = rt.open(ids, max_new_tokens=NEW)
    ck = s.run_to(2)
    before = ck.hidden.clone()
    bad = [
        torch.zeros(1, 5, model.config.hidden_size),  # shape
        ck.hidden.double(),  # dtype
        ck.hidden.to(torch.device("meta")),  # device
        "not a tensor",
        lambda h: h[:, :3],  # callable returning the wrong shape
    ]
    for edit in bad:
        with pytest.raises(InvalidEdit):
            ck.edit(edit)
        assert torch.equal(ck.hidden, before)

    def boom(h):
        h.zero_()  # edits the scratch copy, then fails
        raise RuntimeError("user code failed")

    with pytest.raises(RuntimeError, match="user code failed"):
        ck.edit(boom)
    assert torch.equal(ck.hidden, before)
    s.pause()
    assert torch.equal(s.resume(), plain_run(model, ids, 0)[0])


def test_state_errors_are_typed_and_other_sessions_unaffected(tiny, rt):
    model, ids = tiny
    ref = plain_run(model, ids, NEW)
    other = rt.open(ids, max_new_tokens=NEW)
    other_ck = other.run_to(1)
    other.pause()

    s = rt.open(ids, max_new_tokens=NEW)
    with pytest.raises(CheckpointStateError):
        s.resume()  # nothing to resume yet
    with pytest.raises(CheckpointStateError):
        s.pause()
    ck = s.run_to(2)
    with pytest.raises(CheckpointStateError):
        s.run_to(3)  # already at a checkpoint
    with pytest.raises(CheckpointStateError):
        s.generate(1)  # not resumed
    s.pause()
    with pytest.raises(CheckpointStateError):
        s.pause()
    with pytest.raises(CheckpointStateError):
        ck.hidden  # paused: restore() first
    s.resume()
    with pytest.raises(CheckpointStateError):
        s.resume()  # already resumed
    with pytest.raises(CheckpointStateError):
        ck.edit(lambda h: h)
    with pytest.raises(CheckpointStateError):
        s.fork(2)
    with pytest.raises(ConfigError):
        s.generate(-1)
    with pytest.raises(CacheCapacityExceeded):
        s.generate(NEW + 1)  # beyond max_new_tokens
    s.close()
    with pytest.raises(CheckpointStateError):
        s.resume()  # freed
    with pytest.raises(UnknownSession):
        rt.session(s.id)
    with pytest.raises(UnknownSession):
        rt.close(12345)
    with pytest.raises(ConfigError):
        rt.open(ids.float())

    assert other.state is SessionState.PAUSED and other_ck.layer == 1
    assert torch.equal(other.resume(), ref[0]) and torch.equal(other.generate(NEW), ref[1])


def test_restore_then_edit_a_paused_checkpoint_and_generate_in_pieces(tiny, rt):
    model, ids = tiny
    v = _steer(model.config.hidden_size, 2.0)
    ref = plain_run(model, ids, NEW, layer=3, edit=lambda h: h - v)
    s = rt.open(ids, max_new_tokens=NEW)
    s.run_to(3)
    s.pause()
    ck = s.restore()
    ck.hidden.sub_(v)
    s.pause()
    s.resume()
    assert torch.equal(torch.cat([s.generate(2), s.generate(0), s.generate(NEW - 2)], 1), ref[1])


@pytest.mark.cpu
def test_restore_phase_trace_is_recorded_only_when_asked():
    model = build_model("llama-tiny", dtype=torch.float32, seed=0)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    quiet = BreakpointRuntime(model, slab_bytes=64 << 20)
    traced = BreakpointRuntime(model, slab_bytes=64 << 20, trace=True)
    for rt in (quiet, traced):
        s = rt.open(ids, max_new_tokens=4)
        s.run_to(3)
        s.pause()
        s.restore()
        s.close()
    assert quiet.tracer.marks == []
    # the first pause prepared the spare head buffer: the restore lands there, with no room to make
    assert [m.label for m in traced.tracer.marks] == ["restore.start", "restore.ready", "restore.kv_issued"]


def test_spare_head_buffer_is_used_by_a_restore_and_given_up_under_pressure():
    model = build_model("llama-tiny", dtype=torch.float32, seed=7)
    ids = torch.randint(0, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(1))
    other = torch.randint(0, model.config.vocab_size, (1, 31), generator=torch.Generator().manual_seed(2))
    rt = BreakpointRuntime(model, slab_bytes=32 << 20)
    a = rt.open(ids, max_new_tokens=NEW)
    ck = a.run_to(2)
    hidden = ck.hidden.clone()
    a.pause()
    spare = rt.spare_bytes
    assert spare >= a.swapped.items[HEAD].nbytes > 0  # prepared at pause, before the pause freed anything
    a.restore()
    assert rt.spare_bytes == 0 and torch.equal(a.checkpoint.hidden, hidden)  # the head landed in it
    b = rt.open(other, max_new_tokens=NEW)
    b.run_to(2)
    b.pause()  # another prompt length: a spare of its size replaces nothing (none was left)
    assert rt.spare_bytes > 0 and rt.spare_bytes != spare
    a.pause()  # a's head size differs from the spare: it is swapped for one of a's size
    assert rt.spare_bytes == spare
    b.restore()  # no spare of b's size: the ordinary path
    assert rt.spare_bytes == spare
    b.pause()  # the spare follows the last head paused
    assert rt.spare_bytes not in (0, spare)
    # a's restore takes the ordinary path again and the session continues bitwise as an uninterrupted run
    assert a.resume() is not None and torch.equal(a.generate(NEW), plain_run(model, ids, NEW)[1])
    rt.close_all()
    assert rt.spare_bytes == 0 and rt.slab.stats.used == 0


def test_spare_head_never_evicts_and_is_dropped_before_any_session():
    model = build_model("llama-tiny", dtype=torch.float32, seed=7)
    ids = torch.randint(0, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(1))
    probe = BreakpointRuntime(model, slab_bytes=32 << 20)
    s = probe.open(ids, max_new_tokens=NEW)
    s.run_to(model.config.num_hidden_layers)
    one = probe.slab.stats.used  # one session at the last layer: all its KV and its head
    probe.close_all()
    rt = BreakpointRuntime(model, slab=Slab(one + 4096, "cpu"), host_pool=HostPool(8 << 20, segment_bytes=1 << 20))
    x, y = rt.open(ids, max_new_tokens=NEW), rt.open(ids, max_new_tokens=NEW)
    x.run_to(1)
    x.pause()  # made from memory free at that moment, beyond the reserve
    assert rt.spare_bytes > 0
    y.run_to(model.config.num_hidden_layers)  # fits only without the spare: the spare is dropped, x stays paused
    assert rt.spare_bytes == 0 and rt.evictions == 0 and x.state is SessionState.PAUSED
    y.pause()  # y still held all its memory when its pause began: no room for a spare then
    assert rt.spare_bytes == 0
    x.restore()  # the ordinary path
    assert x.state is SessionState.CHECKPOINT
    x.pause()  # now there is room: the spare is back, and the next restore lands in it
    assert rt.spare_bytes > 0
    y.restore()
    assert rt.spare_bytes == 0 and y.state is SessionState.CHECKPOINT
    assert y.resume() is not None and torch.equal(y.generate(NEW), plain_run(model, ids, NEW)[1])
    rt.close_all()
    assert rt.slab.stats.used == 0


@pytest.mark.parametrize("head_out", BreakpointRuntime.HEAD_OUT)
def test_the_head_goes_out_where_asked_and_results_stay_bitwise(tiny, head_out):
    """A pause copies the head first or last among its copies to the host; every depth, a restore-then-edit and a
    fork of a paused checkpoint stay bitwise equal to the uninterrupted run either way."""
    model, ids = tiny
    runtime = BreakpointRuntime(model, slab_bytes=32 << 20, head_out=head_out)
    try:
        ref = plain_run(model, ids, NEW)
        n = model.config.num_hidden_layers
        for layer in range(n + 1):
            _assert_same(_run(runtime, ids, layer, pause=True), ref)
        s = runtime.open(ids, max_new_tokens=NEW)
        s.run_to(3)
        s.pause()
        names = list(s._swapped.items)
        assert names.index(HEAD) == (0 if head_out == "first" else len(names) - 1) and len(names) == 3 + 1
        v = _steer(model.config.hidden_size, 2.0)
        s.restore().hidden.sub_(v)
        s.pause()
        (f,) = s.fork(1)
        edited = plain_run(model, ids, NEW, layer=3, edit=lambda h: h - v)
        for x in (s, f):
            x.resume()
            assert torch.equal(x.generate(NEW), edited[1])
            x.close()
        runtime.check_invariants()
    finally:
        runtime.close_all()
    assert runtime.slab.stats.used == 0 and runtime.host_pool.stats.used == 0


def test_an_unknown_head_order_is_a_config_error_before_anything_is_allocated(tiny):
    with pytest.raises(ConfigError, match="head_out"):
        BreakpointRuntime(tiny[0], slab_bytes=1 << 40, head_out="middle")  # a 1 TiB slab would fail if allocated
