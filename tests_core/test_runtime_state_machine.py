"""A hypothesis state machine over a BreakpointRuntime on a tiny slab, with local sessions and remote ones (a client
of a live in-process server over the same runtime): open, run_to, edit, pause, restore, resume, generate, fork,
evict, close.

After every step: the memory accounting balances (:meth:`BreakpointRuntime.check_invariants`: the slab holds exactly
the live sessions' state plus the spare buffer, the host pool exactly the paused ones'), no session is lost or
orphaned (the runtime's sessions are exactly the ones the machine holds, each in a state its history allows), and
every session nothing was edited in resumes and generates bitwise what an uninterrupted run of its prompt does.

The slab holds about two and a half sessions, so evictions (of forks sharing a prefix too) happen all the time.
Remote and local calls never overlap: the client waits for each reply, and the server thread only polls in between.

Step count: ``MAX_EXAMPLES * STEPS_PER_EXAMPLE`` = 100 * 125 = 12,500 planned steps a round; hypothesis ends some
examples early, so the test runs another round (at most ``MAX_ROUNDS``) until at least 10,000 rule steps actually ran,
and asserts that they did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from djinn_core.errors import AdmissionRefused, CheckpointStateError, SlabExhausted
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.slab import Admission, Slab
from djinn_core.models import build_model
from djinn_core.runtime import BreakpointRuntime, SessionState, plain_run

MAX_EXAMPLES = 100
STEPS_PER_EXAMPLE = 125
MIN_STEPS = 10_000
MAX_ROUNDS = 3  # rounds of MAX_EXAMPLES examples at most (one usually reaches MIN_STEPS: 9,633 to 11,237 seen)

LAYERS = 3
NEW = 3  # max_new_tokens of every session
PROMPT_LENGTHS = (4, 5, 6)
MAX_SESSIONS = 6
COUNTS = {"steps": 0, "evictions": 0, "forks": 0, "remote_calls": 0, "compared": 0}

CHECKPOINTED = {SessionState.CHECKPOINT, SessionState.PAUSED}
DECODING = {SessionState.RUNNING, SessionState.SWAPPED}


@dataclass
class Tracked:
    """A session as the machine knows it: its handle (local session or remote proxy) and its history."""

    handle: Any
    remote: bool
    prompt: int
    phase: str = "open"  # open -> checkpoint -> decoding
    layer: int | None = None
    edited: bool = False
    generated: int = 0

    @property
    def id(self) -> int:
        return self.handle.id


class World:
    """What every example shares: the model, the references, one runtime, a server over it and a client."""

    def __init__(self) -> None:
        from djinn_core.client import Client
        from djinn_core.rpc.server import Server, ServerConfig

        self.model = build_model("llama-tiny", dtype=torch.float32, seed=3, num_layers=LAYERS)
        vocab = self.model.config.vocab_size
        self.prompts = [torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n))
                        for n in PROMPT_LENGTHS]
        self.refs = [plain_run(self.model, ids, NEW) for ids in self.prompts]
        self.steer = torch.randn(self.model.config.hidden_size, generator=torch.Generator().manual_seed(9))
        probe = BreakpointRuntime(self.model, slab_bytes=1 << 20)
        s = probe.open(self.prompts[-1], max_new_tokens=NEW)
        s.run_to(0)
        s.resume()  # the largest session: every layer's KV and the head, at once
        one = probe.slab.stats.high_water
        probe.close_all()
        self.rt = BreakpointRuntime(self.model, slab=Slab(5 * one // 2, "cpu"),
                                    host_pool=HostPool(4 << 20, segment_bytes=1 << 20, pin=False))
        self.server = Server(self.rt, ServerConfig(port=0, stats_interval_s=0, tick_s=0.05,
                                                   max_sessions=4 * MAX_SESSIONS)).start()
        self.client = Client(self.server.address, timeout_s=30)

    def close(self) -> None:
        self.client.close()
        self.server.stop()


WORLD: World | None = None


def _any(phases: tuple[str, ...]):
    """Precondition: some session is in one of ``phases``."""
    return precondition(lambda self: any(t.phase in phases for t in self.sessions))


class RuntimeUnderPressure(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = WORLD
        self.rt = WORLD.rt
        self.sessions: list[Tracked] = []

    def _step(self, t: Tracked | None = None) -> None:
        COUNTS["steps"] += 1
        if t is not None and t.remote:
            COUNTS["remote_calls"] += 1

    def _pick(self, pick: int, phases: tuple[str, ...]) -> Tracked:
        chosen = [t for t in self.sessions if t.phase in phases]
        return chosen[pick % len(chosen)]

    def _state(self, t: Tracked) -> SessionState:
        return self.rt.sessions[t.id].state  # the server's sessions live in the same runtime

    def _compare(self, t: Tracked, got: torch.Tensor, ref: torch.Tensor) -> None:
        if not t.edited:
            assert torch.equal(got.cpu(), ref), f"session {t.id} (remote={t.remote}) differs from a plain run"
            COUNTS["compared"] += 1

    # -- rules -----------------------------------------------------------------------------------------------------
    @precondition(lambda self: len(self.sessions) < MAX_SESSIONS)
    @rule(prompt=st.integers(0, len(PROMPT_LENGTHS) - 1), remote=st.booleans())
    def open(self, prompt, remote):
        backend = self.w.client if remote else self.rt
        t = Tracked(backend.open(self.w.prompts[prompt], max_new_tokens=NEW), remote, prompt)
        self.sessions.append(t)
        self._step(t)

    @_any(("open",))
    @rule(pick=st.integers(0, 10**6), layer=st.integers(0, LAYERS))
    def run_to(self, pick, layer):
        t = self._pick(pick, ("open",))
        t.handle.run_to(layer)
        t.phase, t.layer = "checkpoint", layer
        self._step(t)

    @_any(("checkpoint",))
    @rule(pick=st.integers(0, 10**6))
    def edit(self, pick):
        t = self._pick(pick, ("checkpoint",))
        t.handle.restore()  # a no-op unless it was paused or evicted
        t.handle.checkpoint.edit(t.handle.checkpoint.hidden + self.w.steer)
        t.edited = True
        self._step(t)

    @_any(("checkpoint", "decoding"))
    @rule(pick=st.integers(0, 10**6))
    def pause(self, pick):
        t = self._pick(pick, ("checkpoint", "decoding"))
        if self._state(t) in (SessionState.CHECKPOINT, SessionState.RUNNING):
            t.handle.pause()
        assert self._state(t) in (SessionState.PAUSED, SessionState.SWAPPED)
        self._step(t)

    @_any(("checkpoint",))
    @rule(pick=st.integers(0, 10**6))
    def restore(self, pick):
        t = self._pick(pick, ("checkpoint",))
        t.handle.restore()
        assert self._state(t) is SessionState.CHECKPOINT
        self._step(t)

    @_any(("checkpoint", "decoding"))
    @rule(pick=st.integers(0, 10**6))
    def resume(self, pick):
        t = self._pick(pick, ("checkpoint", "decoding"))
        if t.phase == "checkpoint":
            self._compare(t, t.handle.resume(), self.w.refs[t.prompt][0])
            t.phase = "decoding"
        elif self._state(t) is SessionState.SWAPPED:
            assert t.handle.resume() is None  # its KV is back; generate continues where it stopped
        else:
            with pytest.raises(CheckpointStateError):  # resumed already: a typed error that changes nothing
                t.handle.resume()
        assert self._state(t) is SessionState.RUNNING
        self._step(t)

    @precondition(lambda self: any(t.phase == "decoding" and t.generated < NEW for t in self.sessions))
    @rule(pick=st.integers(0, 10**6), n=st.integers(1, NEW))
    def generate(self, pick, n):
        chosen = [t for t in self.sessions if t.phase == "decoding" and t.generated < NEW]
        t = chosen[pick % len(chosen)]
        n = min(n, NEW - t.generated)
        tokens = t.handle.generate(n)
        self._compare(t, tokens, self.w.refs[t.prompt][1][:, t.generated: t.generated + n])
        t.generated += n
        self._step(t)

    @precondition(lambda self: len(self.sessions) < MAX_SESSIONS + 2)
    @_any(("checkpoint",))
    @rule(pick=st.integers(0, 10**6), n=st.integers(1, 3))
    def fork(self, pick, n):
        t = self._pick(pick, ("checkpoint",))
        n = min(n, MAX_SESSIONS + 3 - len(self.sessions))
        ids = set(self.rt.sessions)
        try:
            children = t.handle.fork(n)
        except (AdmissionRefused, SlabExhausted):  # refused cleanly: no child left behind
            assert set(self.rt.sessions) == ids
        else:
            for c in children:
                self.sessions.append(Tracked(c, t.remote, t.prompt, "checkpoint", t.layer, t.edited))
            COUNTS["forks"] += 1
        self._step(t)

    @rule(fraction=st.floats(0.0, 1.0))
    def evict(self, fraction):
        """Ask the residency policy for room, as an allocation would: idle sessions go to the host (LRU)."""
        res = self.rt.residency
        want = int(fraction * self.rt.slab.capacity)
        before = res.evictions
        if res.admit(want) is Admission.OK:  # room can be made by evicting idle sessions
            res.make_room(0, want)
            assert self.rt.slab.free_bytes >= want
        COUNTS["evictions"] += res.evictions - before
        self._step()

    @precondition(lambda self: self.sessions)
    @rule(pick=st.integers(0, 10**6))
    def close(self, pick):
        t = self.sessions.pop(pick % len(self.sessions))
        t.handle.close()
        assert t.id not in self.rt.sessions
        self._step(t)

    # -- invariants ------------------------------------------------------------------------------------------------
    @invariant()
    def accounting_balances(self):
        self.rt.check_invariants()

    @invariant()
    def no_session_is_lost_or_orphaned(self):
        assert set(self.rt.sessions) == {t.id for t in self.sessions}
        allowed = {"open": {SessionState.OPEN}, "checkpoint": CHECKPOINTED, "decoding": DECODING}
        for t in self.sessions:
            assert self._state(t) in allowed[t.phase], (t, self._state(t))

    def teardown(self):
        for t in self.sessions:
            t.handle.close()
        self.rt.close_all()
        assert not self.rt.sessions and self.rt.slab.stats.used == 0 and self.rt.host_pool.stats.used == 0


@pytest.mark.cpu
@pytest.mark.slow
def test_runtime_state_machine_keeps_every_session_and_every_byte():
    global WORLD
    for k in COUNTS:
        COUNTS[k] = 0
    WORLD = World()
    evictions = WORLD.rt.evictions
    try:
        for _ in range(MAX_ROUNDS):  # hypothesis ends some examples early: rounds until the steps are reached
            run_state_machine_as_test(
                RuntimeUnderPressure,
                settings=settings(max_examples=MAX_EXAMPLES, stateful_step_count=STEPS_PER_EXAMPLE, deadline=None,
                                  database=None, suppress_health_check=[HealthCheck.too_slow]),
            )
            if COUNTS["steps"] >= MIN_STEPS:
                break
        total_evictions = WORLD.rt.evictions - evictions
    finally:
        WORLD.close()
        WORLD = None
    assert MAX_EXAMPLES * STEPS_PER_EXAMPLE >= MIN_STEPS
    assert COUNTS["steps"] >= MIN_STEPS, COUNTS
    assert total_evictions > COUNTS["evictions"] > 0, (total_evictions, COUNTS)  # the policy evicted by itself too
    assert COUNTS["forks"] > 0 and COUNTS["remote_calls"] > 0 and COUNTS["compared"] > 0, COUNTS
