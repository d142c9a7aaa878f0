"""A hypothesis state machine over the whole memory layer: allocate / write / free / swap-out / swap-in / read.

Every item's expected bytes are kept on the side; after every step the machine checks that no byte was lost or
corrupted (resident items are read back, debug checksums guard every swap round trip) and that the accounting
balances (slab and host pool tile their capacity; used bytes equal the aligned sizes of what the model holds).

Step count: ``MAX_EXAMPLES * STEPS_PER_EXAMPLE`` = 125 * 120 = 15,000 planned steps; hypothesis stops a run early only
with probability 2**-16 per step, and the test asserts that at least 10,000 rule steps actually ran.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from djinn_core.errors import DoubleFree, HostPoolExhausted, SlabExhausted
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.slab import Slab, SlabTensor
from djinn_core.memory.swap import SwapEngine, SwappedState

MAX_EXAMPLES = 125
STEPS_PER_EXAMPLE = 120
MIN_STEPS = 10_000

KiB = 1024
SLAB_BYTES = 12 * KiB
POOL_BYTES = 2 * SLAB_BYTES
SEGMENT_BYTES = SLAB_BYTES  # any slab item fits one segment
DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int64]

COUNTS = {"steps": 0, "compactions": 0, "swap_ins": 0, "swap_outs": 0}


def _nbytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8).clone()


class MemoryLayer(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.slab = Slab(SLAB_BYTES, "cpu")
        self.pool = HostPool(POOL_BYTES, segment_bytes=SEGMENT_BYTES, pin=False)
        self.engine = SwapEngine(self.slab, self.pool, checksums=True)
        self.resident: dict[str, tuple[SlabTensor, torch.Tensor]] = {}  # name -> (handle, expected bytes)
        self.swapped: list[tuple[SwappedState, dict[str, torch.Tensor]]] = []
        self.freed: list[SlabTensor] = []
        self.serial = 0

    def _step(self) -> None:
        COUNTS["steps"] += 1

    def _name(self) -> str:
        self.serial += 1
        return f"item{self.serial}"

    # -- rules ---------------------------------------------------------------------------------------------------------
    @rule(numel=st.integers(0, 512), dtype=st.sampled_from(DTYPES))
    def allocate(self, numel, dtype):
        self._step()
        nbytes = numel * dtype.itemsize
        if self.slab.aligned_size(nbytes) > self.slab.stats.free:
            before = self.slab.bookkeeper.live()
            with pytest.raises(SlabExhausted):
                self.slab.allocate((numel,), dtype)
            assert self.slab.bookkeeper.live() == before
            return
        gen = self.slab.generation
        t = self.slab.allocate((numel,), dtype, tag=self._name())
        COUNTS["compactions"] += self.slab.generation - gen
        self.resident[t.tag] = (t, _nbytes_of(t.view()))  # contents undefined, but must stay as they are

    @precondition(lambda self: self.slab.stats.largest_free < self.slab.stats.free)
    @rule(frac=st.floats(0.0, 1.0))
    def allocate_across_holes(self, frac):
        """A size no hole holds but the free total does: the slab must compact, moving live items."""
        self._step()
        s = self.slab.stats
        nbytes = min(s.free, s.largest_free + 1 + int(frac * (s.free - s.largest_free - 1)))
        gen = self.slab.generation
        t = self.slab.allocate((nbytes,), torch.uint8, tag=self._name())
        assert self.slab.generation == gen + 1
        COUNTS["compactions"] += 1
        self.resident[t.tag] = (t, _nbytes_of(t.view()))

    @precondition(lambda self: self.resident)
    @rule(pick=st.integers(0, 10**6), seed=st.integers(0, 2**31 - 1))
    def write(self, pick, seed):
        self._step()
        name = sorted(self.resident)[pick % len(self.resident)]
        t, _ = self.resident[name]
        data = torch.randint(0, 256, (t.nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        t.view().reshape(-1).view(torch.uint8).copy_(data)
        self.resident[name] = (t, data)

    @precondition(lambda self: self.resident)
    @rule(pick=st.integers(0, 10**6))
    def free(self, pick):
        self._step()
        name = sorted(self.resident)[pick % len(self.resident)]
        t, _ = self.resident.pop(name)
        self.slab.free(t)
        self.freed.append(t)

    @precondition(lambda self: self.freed)
    @rule(pick=st.integers(0, 10**6))
    def free_again(self, pick):
        self._step()
        with pytest.raises(DoubleFree):
            self.slab.free(self.freed[pick % len(self.freed)])

    @precondition(lambda self: self.resident)
    @rule(mask=st.integers(1, 2**16 - 1))
    def swap_out(self, mask):
        self._step()
        names = sorted(self.resident)
        chosen = [n for i, n in enumerate(names) if mask >> (i % 16) & 1] or names[:1]
        items = {n: self.resident[n][0] for n in chosen}
        if not self.pool.fits([t.nbytes for t in items.values()]):
            with pytest.raises(HostPoolExhausted):
                self.engine.swap_out(items)
            assert all(t.alive for t in items.values())
            return
        state = self.engine.swap_out(items)
        self.swapped.append((state, {n: self.resident.pop(n)[1] for n in chosen}))
        COUNTS["swap_outs"] += 1

    @precondition(lambda self: self.swapped)
    @rule(pick=st.integers(0, 10**6), mask=st.integers(0, 2**16 - 1), reverse=st.booleans())
    def swap_in(self, pick, mask, reverse):
        self._step()
        state, expected = self.swapped[pick % len(self.swapped)]
        names = [n for i, n in enumerate(state.names) if mask >> (i % 16) & 1] or state.names
        order = names[::-1] if reverse else None
        if state.slab_bytes(names) > self.slab.stats.free:
            with pytest.raises(SlabExhausted):
                self.engine.swap_in(state, names=names, order=order)
            return
        gen = self.slab.generation
        res = self.engine.swap_in(state, names=names, order=order)
        COUNTS["compactions"] += self.slab.generation - gen
        COUNTS["swap_ins"] += 1
        if order is not None:
            assert res.names == order
        res.wait_all()  # verifies the debug checksums of every item
        for n in names:
            self.resident[n] = (res.tensors[n], expected.pop(n))
        if not len(state):
            self.swapped = [(s, e) for s, e in self.swapped if s is not state]

    @precondition(lambda self: self.swapped)
    @rule(pick=st.integers(0, 10**6))
    def release(self, pick):
        self._step()
        state, _ = self.swapped.pop(pick % len(self.swapped))
        self.engine.release(state)

    @precondition(lambda self: self.resident)
    @rule(pick=st.integers(0, 10**6))
    def read(self, pick):
        self._step()
        name = sorted(self.resident)[pick % len(self.resident)]
        t, data = self.resident[name]
        assert torch.equal(_nbytes_of(t.view()), data), name

    # -- invariants ----------------------------------------------------------------------------------------------------
    @invariant()
    def accounting_balances(self):
        self.slab.bookkeeper.check_invariants()
        self.pool.check_invariants()
        assert self.slab.stats.used == sum(self.slab.aligned_size(t.nbytes) for t, _ in self.resident.values())
        assert self.pool.stats.used == sum(self.pool.aligned_size(it.nbytes)
                                           for s, _ in self.swapped for it in s.items.values())
        assert self.slab.stats.allocations == len(self.resident)

    @invariant()
    def no_byte_is_lost(self):
        for name, (t, data) in self.resident.items():
            assert torch.equal(_nbytes_of(t.view()), data), name
        for state, expected in self.swapped:
            assert set(state.names) == set(expected)
            for n, data in expected.items():
                assert torch.equal(_nbytes_of(state.host_view(n)), data), n


@pytest.mark.cpu
@pytest.mark.slow
def test_memory_layer_state_machine_loses_no_byte():
    for k in COUNTS:
        COUNTS[k] = 0
    run_state_machine_as_test(
        MemoryLayer,
        settings=settings(max_examples=MAX_EXAMPLES, stateful_step_count=STEPS_PER_EXAMPLE, deadline=None,
                          database=None, suppress_health_check=[HealthCheck.too_slow]),
    )
    assert MAX_EXAMPLES * STEPS_PER_EXAMPLE >= MIN_STEPS
    assert COUNTS["steps"] >= MIN_STEPS, COUNTS
    assert COUNTS["compactions"] > 0 and COUNTS["swap_ins"] > 0 and COUNTS["swap_outs"] > 0, COUNTS
