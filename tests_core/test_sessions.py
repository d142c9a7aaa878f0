"""sessions.py: VRAM budget, LRU eviction of paused sessions, admission, and typed errors that harm no one else."""

from __future__ import annotations

import pytest
import torch

from djinn_core.errors import (AdmissionRefused, BudgetTooSmall, CheckpointStateError, ConfigError, DoubleFree,
                               SlabExhausted, UnknownAllocation, UnknownSession)
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.residency import ResidencyManager
from djinn_core.memory.slab import Admission, Slab
from djinn_core.memory.swap import SwapEngine

pytestmark = pytest.mark.cpu

KiB = 1024
UNIT = 4 * KiB  # one item of (UNIT,) uint8 is exactly UNIT aligned bytes


def _manager(slab_units: int = 8, budget_units: int | None = None, pool_units: int = 64, **kw) -> ResidencyManager:
    slab = Slab(slab_units * UNIT, "cpu")
    eng = SwapEngine(slab, HostPool(pool_units * UNIT, chunk_bytes=16 * UNIT, pin=False), checksums=True)
    budget = None if budget_units is None else budget_units * UNIT
    return ResidencyManager(slab, eng, budget_bytes=budget, **kw)


def _fill(m: ResidencyManager, sid, name: str, units: int = 1) -> torch.Tensor:
    t = m.allocate(sid, name, (units * UNIT,), torch.uint8)
    data = torch.randint(0, 256, (units * UNIT,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(hash((sid, name)) % 2**31))
    t.view().copy_(data)
    return data


def _check(m: ResidencyManager, sid, refs: dict[str, torch.Tensor]) -> None:
    res = m.ensure_resident(sid)
    res.wait_all()
    for name, ref in refs.items():
        assert torch.equal(m.items(sid)[name].view(), ref), (sid, name)


def test_sessions_fit_until_the_budget_then_the_lru_paused_one_is_evicted():
    m = _manager(slab_units=8, budget_units=4)
    refs = {}
    for sid in ("a", "b"):
        m.open(sid)
        refs[sid] = {f"kv.{i}": _fill(m, sid, f"kv.{i}") for i in range(2)}
    assert m.stats.resident_bytes == 4 * UNIT and m.stats.evictions == 0
    m.touch("a")  # b is now least recently used
    m.open("c")
    refs["c"] = {"kv.0": _fill(m, "c", "kv.0")}
    assert not m.is_resident("b") and m.is_resident("a")
    assert m.swapped_names("b") == ["kv.0", "kv.1"]
    assert m.stats.evictions == 1 and m.stats.resident_bytes <= 4 * UNIT
    _check(m, "b", refs["b"])  # evicts a, the LRU paused one now (c was used after a)
    assert not m.is_resident("a") and m.is_resident("c")
    for sid in refs:
        _check(m, sid, refs[sid])
    assert m.stats.resident_bytes <= m.budget_bytes


def test_a_running_session_is_never_evicted():
    m = _manager(slab_units=8, budget_units=4)
    m.open("run"), m.open("idle")
    r = {f"kv.{i}": _fill(m, "run", f"kv.{i}") for i in range(2)}
    i = {"kv.0": _fill(m, "idle", "kv.0")}
    m.mark_running("run")
    m.touch("idle")
    m.open("new")
    _fill(m, "new", "kv.0", 2)  # the budget holds 4 units: idle (more recent, but paused) goes, run stays
    assert m.is_resident("run") and not m.is_resident("idle")
    with pytest.raises(CheckpointStateError):
        m.evict("run")
    m.mark_running("new")
    # run and new are running with 4 units resident: 2 more cannot be made room for without evicting them
    m.open("third")
    with pytest.raises(SlabExhausted, match="LATER"):
        m.allocate("third", "kv.0", (2 * UNIT,), torch.uint8)
    with pytest.raises(CheckpointStateError):  # idle has items on the host: allocate needs ensure_resident first
        m.allocate("idle", "kv.9", (UNIT,), torch.uint8)
    assert m.is_resident("run") and m.is_resident("new")
    for name, ref in r.items():
        assert torch.equal(m.items("run")[name].view(), ref)
    m.mark_paused("run")
    _check(m, "idle", i)


def test_a_failed_eviction_plan_evicts_no_one():
    m = _manager(slab_units=8, budget_units=6)
    m.open("a"), m.open("b"), m.open("c")
    _fill(m, "a", "x", 2)
    _fill(m, "b", "x", 2)
    m.mark_running("b")
    _fill(m, "c", "x", 1)
    # 5 resident; c needs 4 more: evicting a (2) is not enough (b is running): refuse before evicting a
    with pytest.raises(SlabExhausted):
        m.allocate("c", "y", (4 * UNIT,), torch.uint8)
    assert m.is_resident("a") and m.stats.evictions == 0


def test_admission_answers_ok_later_never():
    m = _manager(slab_units=8, budget_units=4)
    m.open("a")
    _fill(m, "a", "x", 3)
    assert m.admit(UNIT) is Admission.OK
    assert m.admit(2 * UNIT) is Admission.LATER
    assert m.admit(4 * UNIT) is Admission.LATER
    assert m.admit(4 * UNIT + 1) is Admission.NEVER
    with pytest.raises(ConfigError):
        m.admit(-1)


def test_a_session_alone_over_the_budget_is_refused_and_others_keep_working():
    m = _manager(slab_units=8, budget_units=4)
    m.open("ok"), m.open("big")
    ref = {"x": _fill(m, "ok", "x")}
    _fill(m, "big", "a", 3)
    with pytest.raises(AdmissionRefused):
        m.allocate("big", "b", (2 * UNIT,), torch.uint8)
    with pytest.raises(AdmissionRefused):
        m.allocate("ok", "huge", (5 * UNIT,), torch.uint8)
    assert m.items("big").keys() == {"a"}
    _check(m, "ok", ref)


def test_budget_validation():
    slab = Slab(8 * UNIT, "cpu")
    eng = SwapEngine(slab, HostPool(8 * UNIT, chunk_bytes=8 * UNIT, pin=False))
    with pytest.raises(ConfigError):
        ResidencyManager(slab, eng, budget_bytes=-1)
    with pytest.raises(ConfigError):
        ResidencyManager(slab, eng, budget_bytes=9 * UNIT)
    with pytest.raises(BudgetTooSmall):
        ResidencyManager(slab, eng, budget_bytes=UNIT, weight_bytes=2 * UNIT)
    with pytest.raises(ConfigError):
        ResidencyManager(slab, eng, weight_bytes=-5)
    other = Slab(8 * UNIT, "cpu")
    with pytest.raises(ConfigError):
        ResidencyManager(other, eng)
    m = ResidencyManager(slab, eng, budget_bytes=10 * UNIT, weight_bytes=4 * UNIT)
    assert m.budget_bytes == 6 * UNIT and m.stats.weight_bytes == 4 * UNIT
    assert ResidencyManager(slab, eng).budget_bytes == slab.capacity


def test_zero_budget_refuses_every_allocation():
    m = _manager(budget_units=0)
    m.open("a")
    assert m.admit(1) is Admission.NEVER
    with pytest.raises(AdmissionRefused):
        m.allocate("a", "x", (1,), torch.uint8)


def test_unknown_closed_and_duplicate_sessions_are_typed_errors_that_harm_no_one():
    m = _manager(slab_units=8, budget_units=4)
    m.open("keep")
    ref = {"x": _fill(m, "keep", "x")}
    m.open("gone")
    _fill(m, "gone", "x")
    m.close("gone")
    for call in (lambda: m.close("gone"), lambda: m.ensure_resident("gone"), lambda: m.mark_running("gone"),
                 lambda: m.allocate("gone", "y", (1,), torch.uint8), lambda: m.ensure_resident("never"),
                 lambda: m.session_bytes(["unhashable"]), lambda: m.evict("never")):
        with pytest.raises(UnknownSession):
            call()
    with pytest.raises(UnknownSession, match="closed"):
        m.close("gone")
    with pytest.raises(ConfigError):
        m.open("keep")
    with pytest.raises(ConfigError):
        m.open(["unhashable"])
    with pytest.raises(ConfigError):
        m.allocate("keep", "x", (1,), torch.uint8)  # duplicate item name
    with pytest.raises(UnknownAllocation):
        m.free_item("keep", "nope")
    with pytest.raises(ConfigError):
        m.allocate("keep", "y", (-1,), torch.uint8)
    with pytest.raises(UnknownAllocation):
        m.ensure_resident("keep", names=["nope"])
    assert "gone" not in m and m.sessions() == ["keep"]
    assert m.stats.resident_bytes == UNIT
    _check(m, "keep", ref)
    m.open("gone")  # a closed id may be opened again
    _fill(m, "gone", "x")


def test_freeing_twice_is_a_typed_error():
    m = _manager()
    m.open("a")
    t = m.allocate("a", "x", (UNIT,), torch.uint8)
    m.free_item("a", "x")
    with pytest.raises(UnknownAllocation):
        m.free_item("a", "x")
    with pytest.raises(DoubleFree):
        m.slab.free(t)


def test_partial_resume_brings_back_what_is_needed_first():
    m = _manager(slab_units=16, budget_units=8)
    m.open("s")
    refs = {n: _fill(m, "s", n) for n in ("hidden", "kv.0", "kv.1", "kv.2")}
    m.evict("s")
    res = m.ensure_resident("s", order=["hidden", "kv.0"], names=["hidden", "kv.0"])
    assert res.names == ["hidden", "kv.0"] and m.swapped_names("s") == ["kv.1", "kv.2"]
    assert not m.is_resident("s")
    res.wait("hidden")
    assert torch.equal(res.tensors["hidden"].view(), refs["hidden"])
    res2 = m.ensure_resident("s", order=["kv.2"])
    assert res2.names[0] == "kv.2" and m.is_resident("s")
    res2.wait_all()
    for n, ref in refs.items():
        assert torch.equal(m.items("s")[n].view(), ref)
    with pytest.raises(ConfigError):
        m.ensure_resident("s", order=["kv.0"], names=["hidden"])


def test_evicting_a_partly_resident_session_merges_its_host_state():
    m = _manager(slab_units=16, budget_units=8)
    m.open("s")
    refs = {n: _fill(m, "s", n) for n in ("a", "b", "c")}
    m.evict("s")
    m.ensure_resident("s", names=["a"]).wait_all()
    assert m.evict("s") is not None
    assert sorted(m.swapped_names("s")) == ["a", "b", "c"] and m.resident_bytes("s") == 0
    assert m.evict("s") is None  # nothing resident
    _check(m, "s", refs)


def test_on_evict_hook_and_stats():
    seen = []
    m = _manager(slab_units=8, budget_units=2, on_evict=lambda sid, state: seen.append((sid, state.names)))
    m.open(1), m.open(2)
    _fill(m, 1, "x", 2)
    _fill(m, 2, "x", 1)
    assert seen == [(1, ["x"])]
    s = m.stats
    assert (s.sessions, s.resident_sessions, s.swapped_sessions, s.evictions) == (2, 1, 1, 1)
    assert s.swapped_bytes == 2 * UNIT and s.swap_out_bytes == 2 * UNIT
    assert m.session_bytes(1) == 2 * UNIT and m.resident_bytes(1) == 0
    m.free_item(1, "x")  # an item on the host
    assert m.session_bytes(1) == 0 and m.swapped_names(1) == []
    m.close(1), m.close(2)
    assert m.slab.stats.used == 0 and m.swap.host_pool.stats.used == 0


def test_allocations_outside_the_manager_count_against_the_slab():
    m = _manager(slab_units=4, budget_units=4)
    outside = m.slab.allocate((2 * UNIT,), torch.uint8)  # e.g. a scratch buffer
    m.open("a"), m.open("b")
    _fill(m, "a", "x", 2)
    assert m.admit(UNIT) is Admission.LATER
    _fill(m, "b", "x", 1)  # evicts a to make slab room even though the budget had some
    assert not m.is_resident("a")
    m.slab.free(outside)
