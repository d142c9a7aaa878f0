"""Forks and eviction under memory pressure on a tiny llama (CPU): no eviction recurses, forks that can never fit are
refused up front, and after any error the slab holds exactly the live sessions' state (issue 18, item 2)."""

from __future__ import annotations

import pytest
import torch

from djinn_core.errors import AdmissionRefused, ConfigError, InvalidLayer, SlabExhausted
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.residency import LargestFirst
from djinn_core.memory.slab import Slab
from djinn_core.models import build_model
from djinn_core.runtime import BreakpointRuntime, SessionState, plain_run

pytestmark = pytest.mark.cpu

NEW = 4
LAYER = 5


@pytest.fixture(scope="module")
def tiny():
    model = build_model("llama-tiny", dtype=torch.float32, seed=7)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    probe = BreakpointRuntime(model, slab_bytes=32 << 20)
    s = probe.open(ids, max_new_tokens=NEW)
    s.run_to(model.config.num_hidden_layers)
    one = probe.slab.stats.used  # one session's whole KV and its head
    probe.close_all()
    return model, ids, one, plain_run(model, ids, NEW)


def _runtime(model, slab_bytes: int, **kw) -> BreakpointRuntime:
    return BreakpointRuntime(model, slab=Slab(slab_bytes, "cpu"),
                             host_pool=HostPool(64 << 20, segment_bytes=1 << 20, pin=False), **kw)


def test_forks_that_fill_the_slab_evict_each_other_without_recursing(tiny):
    """The reproduction of issue 18: a slab of two sessions, one fork at a time. Evicting an idle fork used to copy
    its shared KV first, which allocated, which evicted the next fork... until RecursionError, with the forks made
    so far orphaned. Now an eviction drops its reference to shared blocks instead of copying them."""
    model, ids, one, ref = tiny
    rt = _runtime(model, 2 * one)
    parent = rt.open(ids, max_new_tokens=NEW)
    parent.run_to(LAYER)
    forks = [f for _ in range(24) for f in parent.fork(1)]
    rt.check_invariants()
    assert rt.evictions > 0 and len(rt.sessions) == 25
    assert any(f.state is SessionState.PAUSED for f in forks)
    for f in forks[::5] + [parent]:  # restored, resumed and decoding under pressure: bitwise the reference
        assert torch.equal(f.resume(), ref[0]) and torch.equal(f.generate(NEW), ref[1])
        rt.check_invariants()
    rt.close_all()
    assert rt.slab.stats.used == 0 and rt.host_pool.stats.used == 0


def test_a_decoding_fork_evicts_its_siblings_while_copying_on_write(tiny):
    """A fork's first decode step copies its shared prefix; those allocations evict siblings that share the same
    blocks (their references are dropped, not copied), and every continuation stays bitwise exact."""
    model, ids, one, ref = tiny
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    rt = _runtime(model, int(1.6 * one))
    parent = rt.open(ids, max_new_tokens=NEW)
    parent.run_to(2)
    forks = parent.fork(3)
    forks[1].checkpoint.edit(lambda h: h + v)
    for k, f in enumerate(forks):
        f.resume()
        tokens = f.generate(NEW)
        expect = plain_run(model, ids, NEW, layer=2, edit=lambda h: h + v)[1] if k == 1 else ref[1]
        assert torch.equal(tokens, expect), k
        rt.check_invariants()
    assert rt.evictions > 0
    rt.close_all()


def _parent_and_other(model, ids, one):
    """A slab of two sessions holding a parent checkpoint at LAYER and another session's checkpoint at 1."""
    rt = _runtime(model, 2 * one)
    parent, other = rt.open(ids, max_new_tokens=NEW), rt.open(ids, max_new_tokens=NEW)
    parent.run_to(LAYER)
    other.run_to(1)
    return rt, parent, other


def test_a_fork_that_can_never_fit_is_refused_up_front(tiny):
    model, ids, one, ref = tiny
    rt, parent, other = _parent_and_other(model, ids, one)
    used, sessions = rt.slab.stats.used, set(rt.sessions)
    with pytest.raises(AdmissionRefused, match=r"fork\(40\).*whole slab"):
        parent.fork(40)
    assert rt.slab.stats.used == used and set(rt.sessions) == sessions and rt.evictions == 0
    parent.pause()
    with pytest.raises(AdmissionRefused):
        parent.fork(40)  # refused before the restore
    assert parent.state is SessionState.PAUSED and other.state is SessionState.CHECKPOINT
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            parent.fork(bad)
    rt.check_invariants()
    assert torch.equal(parent.resume(), ref[0]) and torch.equal(parent.generate(NEW), ref[1])
    rt.close_all()


def test_a_fork_that_cannot_fit_now_evicts_no_one_and_leaves_no_child(tiny):
    model, ids, one, ref = tiny
    rt, parent, idle = _parent_and_other(model, ids, one)
    outside = rt.slab.allocate((rt.slab.stats.free,), torch.uint8)  # memory no session holds (LATER, not NEVER)
    used, sessions = rt.slab.stats.used, set(rt.sessions)
    with pytest.raises(SlabExhausted, match="LATER"):
        parent.fork(3)
    assert rt.slab.stats.used == used and set(rt.sessions) == sessions and rt.evictions == 0
    assert idle.state is SessionState.CHECKPOINT
    rt.slab.free(outside)
    rt.check_invariants()
    forks = parent.fork(3)
    rt.check_invariants()
    assert all(f.state is SessionState.CHECKPOINT for f in forks)
    rt.close_all()


def test_errors_leave_the_accounting_balanced(tiny):
    model, ids, one, ref = tiny
    rt = _runtime(model, one // 2)
    s = rt.open(ids, max_new_tokens=NEW)
    with pytest.raises(AdmissionRefused):
        s.run_to(1)  # its whole KV can never fit
    with pytest.raises(InvalidLayer):
        s.run_to(99)
    assert s.state is SessionState.OPEN
    rt.check_invariants()
    vocab = model.config.vocab_size
    for bad in (torch.tensor([[1, vocab]]), torch.tensor([[-1, 2]])):
        with pytest.raises(ConfigError, match="token ids"):
            rt.open(bad)
    assert set(rt.sessions) == {s.id}
    rt.close_all()
    rt.check_invariants()
    assert rt.slab.stats.used == 0


def test_a_runtime_can_be_given_another_eviction_policy(tiny):
    model, ids, one, ref = tiny
    long_ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    sizes = _runtime(model, 8 * one)
    sizes_small, sizes_big = sizes.open(ids, max_new_tokens=NEW), sizes.open(long_ids, max_new_tokens=NEW)
    sizes_small.run_to(LAYER)
    sizes_big.run_to(LAYER)
    small_bytes, big_bytes = sizes_small.slab_bytes(), sizes_big.slab_bytes()
    sizes.close_all()
    # room for both and less than one more session; evicting either one is enough for the third
    slab_bytes = small_bytes + big_bytes + one - small_bytes // 2
    victims = {}
    for policy in (None, LargestFirst()):
        rt = _runtime(model, slab_bytes, eviction=policy)
        small, big = rt.open(ids, max_new_tokens=NEW), rt.open(long_ids, max_new_tokens=NEW)
        small.run_to(LAYER)  # the least recently used
        big.run_to(LAYER)
        third = rt.open(ids, max_new_tokens=NEW)
        third.run_to(model.config.num_hidden_layers)  # needs room: one of the two goes
        victims[rt.residency.policy.name] = [s.input_ids.shape[1] for s in (small, big)
                                             if s.state is SessionState.PAUSED]
        rt.check_invariants()
        third.close()
        assert torch.equal(small.resume(), ref[0])
        rt.close_all()
    assert victims == {"lru": [12], "largest-first": [40]}


def test_a_resumed_session_keeps_only_its_last_positions_logits_until_it_generates(tiny):
    """Memory outside the slab does not grow with the prompt while sessions wait between resume and generate (what
    the server does with many clients: their resumes interleave). A view of the last position used to keep each
    session's whole prompt logits alive: 262 MB at 2048 tokens of Llama-2's vocabulary, which ran the server out of
    memory under the 80GB budget (reports/h200/probes/2026-11-30-server-memory-pressure-oom.json)."""
    model, ids, one, ref = tiny
    rt = _runtime(model, 4 * one)
    sessions = [rt.open(ids, max_new_tokens=NEW) for _ in range(3)]
    for s in sessions:
        s.run_to(LAYER)
        assert torch.equal(s.resume(), ref[0])
    vocab = model.config.vocab_size
    for s in sessions:
        held = s._next_logits  # what the session keeps for its first token until generate consumes it
        assert held.untyped_storage().nbytes() == ids.shape[0] * vocab * held.element_size()
    for s in sessions:
        assert torch.equal(s.generate(NEW), ref[1])
    rt.close_all()
