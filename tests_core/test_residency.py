"""memory/residency.py: the residency policy over fake tenants on a CPU slab -- use order, room making, admission
OK/LATER/NEVER, shared (refcounted) blocks, the eviction-policy seam, an eviction that never recurses, the spare
buffer and the free target."""

from __future__ import annotations

import pytest
import torch

from djinn_core.errors import CheckpointStateError, ConfigError, HostPoolExhausted, SlabExhausted
from djinn_core.memory.residency import LRU, POLICIES, Candidate, LargestFirst, Residency
from djinn_core.memory.slab import Admission, Slab

pytestmark = pytest.mark.cpu

UNIT = 4096  # one (UNIT,) uint8 allocation is exactly UNIT aligned bytes


class Block:
    """A refcounted slab allocation, like a KV block shared by forks."""

    def __init__(self, slab: Slab, units: int):
        self.slab = slab
        self.t = slab.allocate((units * UNIT,), torch.uint8)
        self.refs = 1

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.slab.free(self.t)


class Tenant:
    """A session as the residency sees it: blocks it references; evict() drops them (frees its own)."""

    def __init__(self, tid: int, blocks: list[Block]):
        self.id = tid
        self.blocks = blocks
        self.evictable = True
        self.evicted = False

    def held(self):
        return [(b.t, b.refs) for b in self.blocks]

    def evict(self) -> None:
        for b in self.blocks:
            b.release()
        self.blocks = []
        self.evictable = False
        self.evicted = True


def _setup(units: int = 8, **kw) -> tuple[Slab, Residency]:
    slab = Slab(units * UNIT, "cpu")
    return slab, Residency(slab, **kw)


def _tenant(res: Residency, tid: int, units: int, *shared: Block) -> Tenant:
    t = Tenant(tid, [Block(res.slab, units), *shared])
    for b in shared:
        b.refs += 1
    res.touch(t)
    return t


def test_room_is_made_by_evicting_the_least_recently_used_idle_tenant():
    slab, res = _setup(8)
    a, b, c = (_tenant(res, i, 2) for i in (1, 2, 3))
    res.touch(a)  # b is now the least recently used
    assert res.idle == [2, 3, 1]
    t = res.allocate(9, (4 * UNIT,), torch.uint8)  # 2 units free: one eviction frees 2 more
    assert b.evicted and not a.evicted and not c.evicted and res.evictions == 1
    assert res.idle == [3, 1] and slab.stats.used == 8 * UNIT
    slab.free(t)


def test_a_busy_tenant_and_the_requester_are_never_evicted():
    slab, res = _setup(8)
    a, b = _tenant(res, 1, 3), _tenant(res, 2, 3)
    with pytest.raises(SlabExhausted, match="LATER"):
        with res.in_use(a):
            assert res.busy == {1}
            res.make_room(2, 4 * UNIT)  # only a could free enough, and it is busy; b is the requester
    assert not a.evicted and not b.evicted and res.evictions == 0
    assert res.busy == set() and res.idle == [2, 1]  # a, used last, is the most recent
    res.make_room(2, 4 * UNIT)
    assert a.evicted and not b.evicted and res.idle == [2]


def test_a_request_that_evicting_everyone_cannot_satisfy_evicts_no_one():
    slab, res = _setup(8)
    a, b = _tenant(res, 1, 2), _tenant(res, 2, 2)
    b.evictable = False  # e.g. paused already: nothing of it to evict
    res.touch(b)
    _ = slab.allocate((2 * UNIT,), torch.uint8)  # held by no tenant
    assert res.admit(4 * UNIT) is Admission.OK  # 2 free + 2 from evicting a
    assert res.admit(5 * UNIT) is Admission.LATER
    assert res.admit(9 * UNIT) is Admission.NEVER
    with pytest.raises(SlabExhausted, match="LATER"):
        res.make_room(7, 5 * UNIT)
    with pytest.raises(SlabExhausted, match="NEVER"):
        res.make_room(7, 9 * UNIT)
    assert not a.evicted and res.evictions == 0
    with pytest.raises(ConfigError):
        res.admit(-1)


def test_a_shared_block_counts_as_freeable_only_when_all_its_holders_are_evictable():
    slab, res = _setup(10)
    prefix = Block(slab, 4)  # the parent's KV, shared by two forks
    parent = _tenant(res, 1, 1)
    parent.blocks.append(prefix)
    f1, f2 = _tenant(res, 2, 1, prefix), _tenant(res, 3, 1, prefix)
    assert prefix.refs == 3 and slab.stats.free == 3 * UNIT
    cands = {c.id: c for c in res.candidates()}
    assert cands[2] == Candidate(2, 1, UNIT, 4 * UNIT)  # frees its own unit; the prefix is shared
    # with the parent busy, evicting both forks frees only their own units: 3 + 2 < 6
    with res.in_use(parent):
        assert res.admit(6 * UNIT) is Admission.LATER
        assert res.admit(5 * UNIT) is Admission.OK
    # all three idle: evicting them all frees the prefix too
    assert res.admit(10 * UNIT) is Admission.OK
    res.make_room(99, 10 * UNIT)
    assert parent.evicted and f1.evicted and f2.evicted and prefix.refs == 0 and slab.stats.used == 0


def test_the_eviction_policy_is_a_seam_largest_first_picks_a_different_victim():
    def scene(policy):
        slab, res = _setup(8, policy=policy)
        small, big = _tenant(res, 1, 1), _tenant(res, 2, 4)  # small is the least recently used
        _tenant(res, 3, 1)
        res.allocate(9, (3 * UNIT,), torch.uint8)  # 2 free: needs 1 more unit
        return small, big, res

    small, big, res = scene(LRU())
    assert small.evicted and not big.evicted and res.evictions == 1
    small, big, res = scene(LargestFirst())
    assert big.evicted and not small.evicted and res.evictions == 1
    assert set(POLICIES) == {"lru", "largest-first"}
    with pytest.raises(ConfigError):
        Residency(Slab(UNIT, "cpu"), policy=object())


def test_an_eviction_that_allocates_is_refused_not_recursed():
    slab, res = _setup(4)

    class Greedy(Tenant):
        def evict(self):  # a buggy tenant: copies before it frees (what forks used to do)
            res.allocate(self.id, (UNIT,), torch.uint8)

    g = Greedy(1, [Block(slab, 4)])
    res.touch(g)
    with pytest.raises(CheckpointStateError, match="during an eviction"):
        res.allocate(2, (UNIT,), torch.uint8)
    assert slab.stats.used == 4 * UNIT and res.evictions == 0


def test_a_victim_the_host_cannot_take_is_skipped():
    slab, res = _setup(4)

    class Stuck(Tenant):
        def evict(self):
            raise HostPoolExhausted(UNIT, 0, 0)

    stuck = Stuck(1, [Block(slab, 2)])
    res.touch(stuck)
    ok = _tenant(res, 2, 2)
    res.make_room(3, 2 * UNIT)  # stuck (LRU) cannot go; ok goes instead
    assert ok.evicted and not stuck.evicted and res.evictions == 1
    with pytest.raises(SlabExhausted):
        res.make_room(3, 4 * UNIT)
    assert stuck.blocks and slab.stats.used == 2 * UNIT


def test_the_spare_buffer_is_made_from_free_memory_only_and_given_up_before_any_eviction():
    slab, res = _setup(4)
    a = _tenant(res, 1, 2)
    res.prepare_spare(2 * UNIT)
    assert res.spare_bytes == 2 * UNIT and slab.stats.free == 0
    res.prepare_spare(3 * UNIT)  # another size: the old one goes, and 3 units are not free
    assert res.spare_bytes == 0
    res.prepare_spare(UNIT)
    assert res.take_spare(2 * UNIT) is None  # only an exact size is handed out
    buf, deps = res.take_spare(UNIT)
    assert res.spare_bytes == 0 and buf.nbytes == UNIT and deps == []
    slab.free(buf)
    res.prepare_spare(2 * UNIT)
    res.make_room(2, 2 * UNIT)  # the spare goes, a stays
    assert res.spare_bytes == 0 and not a.evicted


def test_the_free_target_is_replenished_after_each_call():
    slab, res = _setup(8, free_target_bytes=4 * UNIT)
    calls = []
    res._before_evict = lambda: calls.append(1)
    a, b, c = (_tenant(res, i, 2) for i in (1, 2, 3))
    with res.in_use(c):
        pass
    assert a.evicted and not b.evicted and not c.evicted and calls == [1]  # 2 free + a's 2 = the target
    res.prepare_spare(UNIT)  # free memory, but not beyond the target: no spare
    assert res.spare_bytes == 0
    with pytest.raises(ConfigError):
        Residency(slab, free_target_bytes=-1)
