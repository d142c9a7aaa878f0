"""Residency policy: which sessions' state lives in the slab, under a VRAM budget, with LRU eviction of paused ones.

A *session* is an opaque, hashable id owning named slab tensors ("hidden", "kv.0", ... -- names are opaque here).
The :class:`ResidencyManager` composes the mechanisms (:class:`~djinn_core.memory.slab.Slab`,
:class:`~djinn_core.memory.swap.SwapEngine`) and decides:

* **Budget** -- ``budget_bytes`` of slab (aligned bytes) for session state. Model weights live outside the slab and are
  shared by every session; this policy never swaps them. Pass ``weight_bytes`` to state the budget as a *total* VRAM
  budget (weights + sessions): the session budget is then ``budget_bytes - weight_bytes``, and a budget below the
  weights raises :class:`~djinn_core.errors.BudgetTooSmall`. A session budget below 0 or above the slab capacity
  raises :class:`~djinn_core.errors.ConfigError`.
* **Eviction** -- when an allocation or a swap-in does not fit, the least recently used *paused* session with resident
  state is swapped out (all its resident items), repeatedly, until it fits. Running sessions are never evicted. The
  manager first checks that evicting every eligible session would suffice; if not it raises
  :class:`~djinn_core.errors.SlabExhausted` (answer LATER) without evicting anyone.
* **Admission** -- :meth:`admit` answers OK (fits now), LATER (fits after evictions / when sessions pause or close),
  NEVER (larger than the budget). An allocation that would make one session alone exceed the budget raises
  :class:`~djinn_core.errors.AdmissionRefused`.

Handles: after a session is evicted its :class:`~djinn_core.memory.slab.SlabTensor` s are freed; after
:meth:`ensure_resident` they are new handles -- read them from :meth:`items` (or the returned ``ResidentState``).

Errors never leave a half-changed state: inputs are validated before anything is mutated, and a failed allocation or
swap leaves every session as it was (sessions evicted before a failure stay validly swapped out). Not thread-safe.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch

from djinn_core.errors import (AdmissionRefused, BudgetTooSmall, CheckpointStateError, ConfigError, SlabExhausted,
                     UnknownAllocation, UnknownSession)
from djinn_core.memory.slab import Admission, Slab, SlabTensor, _check_int, tensor_nbytes
from djinn_core.memory.swap import ResidentState, SwapEngine, SwappedState

log = logging.getLogger(__name__)


@dataclass
class _Session:
    sid: Hashable
    running: bool = False
    items: dict[str, SlabTensor] = field(default_factory=dict)  # resident
    swapped: SwappedState | None = None  # on the host
    last_used: int = 0


@dataclass(frozen=True)
class ResidencyStats:
    """Budget and occupancy in aligned slab bytes; counts of sessions; eviction and swap totals."""

    budget_bytes: int  # for session state (weights excluded)
    weight_bytes: int
    resident_bytes: int
    swapped_bytes: int
    sessions: int
    running: int
    resident_sessions: int  # sessions with no item on the host
    swapped_sessions: int  # sessions with at least one item on the host
    evictions: int
    swap_ins: int
    swap_out_bytes: int
    swap_in_bytes: int


class ResidencyManager:
    """VRAM budget over sessions' slab state; evicts LRU paused sessions to the host pool through ``swap``.

    Args:
        slab: the slab session state lives in (the same one ``swap`` uses).
        swap: the swap engine used for evictions and resumes.
        budget_bytes: slab bytes for session state (default: the whole slab), or the total VRAM budget when
            ``weight_bytes`` is given.
        weight_bytes: bytes of the shared weights, counted against ``budget_bytes`` but never swapped.
        on_evict: called as ``on_evict(session_id, swapped_state)`` after a session is evicted.
    """

    def __init__(self, slab: Slab, swap: SwapEngine, *, budget_bytes: int | None = None, weight_bytes: int = 0,
                 on_evict: Callable[[Hashable, SwappedState], Any] | None = None):
        if not isinstance(slab, Slab):
            raise ConfigError(f"slab must be a Slab, got {type(slab).__name__}")
        if not isinstance(swap, SwapEngine) or swap.slab is not slab:
            raise ConfigError("swap must be a SwapEngine over the same slab")
        if isinstance(weight_bytes, bool) or not isinstance(weight_bytes, int) or weight_bytes < 0:
            raise ConfigError(f"weight_bytes must be an int >= 0, got {weight_bytes!r}")
        if budget_bytes is None:
            budget_bytes = slab.capacity + weight_bytes
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ConfigError(f"budget_bytes must be an int >= 0, got {budget_bytes!r}")
        if budget_bytes < weight_bytes:
            raise BudgetTooSmall(
                f"budget of {budget_bytes} bytes is below the shared weights ({weight_bytes} bytes)")
        session_budget = budget_bytes - weight_bytes
        if session_budget > slab.capacity:
            raise ConfigError(
                f"session budget of {session_budget} bytes exceeds the slab capacity ({slab.capacity} bytes)")
        if on_evict is not None and not callable(on_evict):
            raise ConfigError("on_evict must be callable")
        self.slab = slab
        self.swap = swap
        self.budget_bytes = session_budget
        self.weight_bytes = weight_bytes
        self.on_evict = on_evict
        self._sessions: dict[Hashable, _Session] = {}
        self._closed: set[Hashable] = set()
        self._clock = itertools.count(1)
        self._evictions = 0
        self._swap_ins = 0
        self._swap_out_bytes = 0
        self._swap_in_bytes = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def open(self, session_id: Hashable) -> None:
        """Register a new, paused session with no state. ConfigError if the id is already open or unhashable."""
        try:
            hash(session_id)
        except TypeError:
            raise ConfigError(f"session id must be hashable, got {session_id!r}") from None
        if session_id in self._sessions:
            raise ConfigError(f"session {session_id!r} is already open")
        self._closed.discard(session_id)
        self._sessions[session_id] = _Session(session_id, last_used=next(self._clock))

    def close(self, session_id: Hashable) -> None:
        """Free all of a session's state (slab and host). :class:`UnknownSession` if unknown or already closed."""
        s = self._get(session_id)
        for t in s.items.values():
            self.slab.free(t)
        if s.swapped is not None:
            self.swap.release(s.swapped)
        del self._sessions[session_id]
        self._closed.add(session_id)

    def _get(self, session_id: Hashable) -> _Session:
        try:
            return self._sessions[session_id]
        except (KeyError, TypeError):
            why = "was closed" if self._is_closed(session_id) else "was never opened"
            raise UnknownSession(f"session {session_id!r} {why}") from None

    def _is_closed(self, session_id: Hashable) -> bool:
        try:
            return session_id in self._closed
        except TypeError:
            return False

    # -- state -------------------------------------------------------------------------------------------------------
    def mark_running(self, session_id: Hashable) -> None:
        """The session is computing: it will not be evicted until :meth:`mark_paused`."""
        s = self._get(session_id)
        s.running = True
        s.last_used = next(self._clock)

    def mark_paused(self, session_id: Hashable) -> None:
        """The session is paused: it may be evicted (least recently used first)."""
        s = self._get(session_id)
        s.running = False
        s.last_used = next(self._clock)

    def touch(self, session_id: Hashable) -> None:
        """Mark the session as most recently used."""
        self._get(session_id).last_used = next(self._clock)

    # -- allocation --------------------------------------------------------------------------------------------------
    def allocate(self, session_id: Hashable, name: str, shape: Sequence[int] | int, dtype: torch.dtype, *,
                 tag: str | None = None) -> SlabTensor:
        """Allocate a named slab tensor for a session, evicting LRU paused sessions if it does not fit.

        The session must have no item on the host (call :meth:`ensure_resident` first). Raises
        :class:`AdmissionRefused` when the session alone would exceed the budget (NEVER), :class:`SlabExhausted`
        when even evicting every paused session would not make room (LATER), ConfigError for a duplicate name.
        Stream: as :meth:`Slab.allocate` (current stream); evictions queue D2H copies on the swap engine's out stream.
        """
        s = self._get(session_id)
        if not isinstance(name, str):
            raise ConfigError(f"item name must be a str, got {name!r}")
        if name in s.items or (s.swapped is not None and name in s.swapped):
            raise ConfigError(f"session {session_id!r} already has an item {name!r}")
        if s.swapped is not None and len(s.swapped):
            raise CheckpointStateError(
                f"session {session_id!r} has items on the host {s.swapped.names}; call ensure_resident first")
        _, nbytes = tensor_nbytes(shape, dtype)
        need = self.slab.aligned_size(nbytes)
        self._make_room(need, s, self._session_bytes(s) + need)
        t = self.slab.allocate(shape, dtype, tag=tag if tag is not None else f"{session_id}:{name}")
        s.items[name] = t
        s.last_used = next(self._clock)
        return t

    def free_item(self, session_id: Hashable, name: str) -> None:
        """Free one named item, resident or on the host. :class:`UnknownAllocation` if the session has no such item."""
        s = self._get(session_id)
        if name in s.items:
            self.slab.free(s.items.pop(name))
        elif s.swapped is not None and name in s.swapped:
            self.swap.release(s.swapped, [name])
        else:
            raise UnknownAllocation(f"session {session_id!r} has no item {name!r}")

    # -- residency ---------------------------------------------------------------------------------------------------
    def ensure_resident(self, session_id: Hashable, order: Sequence[str] | None = None,
                        names: Iterable[str] | None = None) -> ResidentState:
        """Bring the session's items (all, or ``names``) back into the slab, evicting LRU paused sessions if needed.

        ``order``: issue order of the swap-in (e.g. ``["hidden", "kv.0", "kv.1", ...]``), the rest follow. Returns a
        :class:`ResidentState` over the requested items: ``wait(name)`` makes the current stream wait for one item
        (a no-op for items that were already resident). Raises :class:`UnknownSession`, :class:`SlabExhausted`
        (LATER: running sessions hold the memory; nothing swapped in), :class:`UnknownAllocation` for unknown names.
        """
        s = self._get(session_id)
        if isinstance(names, str) or isinstance(order, str):
            raise ConfigError("names and order must be sequences of item names, not a str")
        on_host = s.swapped.names if s.swapped is not None else []
        wanted = list(s.items) + on_host if names is None else list(names)
        for n in wanted:
            if n not in s.items and n not in on_host:
                raise UnknownAllocation(f"session {session_id!r} has no item {n!r}")
        order_l = list(order) if order is not None else []
        for n in order_l:
            if n not in wanted:
                raise ConfigError(f"order names {n!r}, which is not among the requested items")
        to_load = [n for n in wanted if n in on_host]
        s.last_used = next(self._clock)
        res: ResidentState | None = None
        if to_load:
            assert s.swapped is not None
            need = s.swapped.slab_bytes(to_load)
            self._make_room(need, s, self._session_bytes(s))
            res = self.swap.swap_in(s.swapped, order=[n for n in order_l if n in to_load], names=to_load)
            s.items.update(res.tensors)
            s.swapped = res.pending
            self._swap_ins += 1
            self._swap_in_bytes += need
        tensors = {n: s.items[n] for n in (order_l + [n for n in wanted if n not in order_l])}
        if res is None:
            return ResidentState(tensors, {}, None, self.slab.device)
        return ResidentState(tensors, res.events, s.swapped, self.slab.device, res._checks, res._driver)

    def evict(self, session_id: Hashable) -> SwappedState | None:
        """Swap a paused session's resident items out now (D2H on the out stream). None if nothing was resident.

        Raises :class:`CheckpointStateError` for a running session.
        """
        s = self._get(session_id)
        if s.running:
            raise CheckpointStateError(f"session {session_id!r} is running and cannot be evicted")
        return self._evict(s) if s.items else None

    def _evict(self, s: _Session) -> SwappedState:
        nbytes = self._resident_bytes(s)
        state = self.swap.swap_out(s.items, free_source=True)
        s.items = {}
        if s.swapped is None or not len(s.swapped):
            s.swapped = state
        else:
            s.swapped.absorb(state)
        self._evictions += 1
        self._swap_out_bytes += nbytes
        log.debug("evicted session %r: %d bytes", s.sid, nbytes)
        if self.on_evict is not None:
            self.on_evict(s.sid, s.swapped)
        return s.swapped

    def _make_room(self, need: int, s: _Session, session_total: int) -> None:
        """Evict LRU paused sessions other than ``s`` until ``need`` aligned bytes fit the budget and the slab."""
        if session_total > self.budget_bytes or need > self.slab.capacity:
            raise AdmissionRefused(
                f"session {s.sid!r} would need {session_total} bytes alone; the budget is {self.budget_bytes} bytes")
        resident = self._resident_total()

        def fits() -> bool:
            return resident + need <= self.budget_bytes and self.slab.admit(need) is Admission.OK

        if fits():
            return
        victims = sorted((v for v in self._sessions.values() if v is not s and not v.running and v.items),
                         key=lambda v: v.last_used)
        evictable = sum(self._resident_bytes(v) for v in victims)
        slab_free = self.slab.stats.free
        if resident - evictable + need > self.budget_bytes or slab_free + evictable < need:
            raise SlabExhausted(
                need, min(self.budget_bytes - resident, slab_free), self.budget_bytes,
                f"{need} bytes do not fit even after evicting every paused session: {resident} of "
                f"{self.budget_bytes} budget bytes resident, {evictable} evictable, {slab_free} slab bytes free "
                f"(answer LATER: wait for running sessions to pause or close)",
            )
        for v in victims:
            if fits():
                break
            freed = self._resident_bytes(v)
            self._evict(v)
            resident -= freed
        if not fits():  # pragma: no cover - guarded by the check above
            raise AssertionError("eviction did not make room")

    # -- admission and queries ---------------------------------------------------------------------------------------
    def admit(self, nbytes: int) -> Admission:
        """Would ``nbytes`` of new session state fit? OK now, LATER after evictions / pauses, NEVER (over budget)."""
        _check_int("nbytes", nbytes)
        need = self.slab.aligned_size(nbytes)
        if need > self.budget_bytes or self.slab.admit(need) is Admission.NEVER:
            return Admission.NEVER
        if self._resident_total() + need <= self.budget_bytes and self.slab.admit(need) is Admission.OK:
            return Admission.OK
        return Admission.LATER

    def _resident_bytes(self, s: _Session) -> int:
        return sum(self.slab.aligned_size(t.nbytes) for t in s.items.values())

    def _swapped_bytes(self, s: _Session) -> int:
        return s.swapped.slab_bytes() if s.swapped is not None else 0

    def _session_bytes(self, s: _Session) -> int:
        return self._resident_bytes(s) + self._swapped_bytes(s)

    def _resident_total(self) -> int:
        return sum(self._resident_bytes(s) for s in self._sessions.values())

    def session_bytes(self, session_id: Hashable) -> int:
        """Aligned slab bytes of all the session's items, resident or on the host."""
        return self._session_bytes(self._get(session_id))

    def resident_bytes(self, session_id: Hashable) -> int:
        """Aligned slab bytes of the session's resident items."""
        return self._resident_bytes(self._get(session_id))

    def is_resident(self, session_id: Hashable) -> bool:
        """True when none of the session's items is on the host."""
        s = self._get(session_id)
        return s.swapped is None or not len(s.swapped)

    def is_running(self, session_id: Hashable) -> bool:
        return self._get(session_id).running

    def items(self, session_id: Hashable) -> dict[str, SlabTensor]:
        """The session's resident handles by name (a copy of the mapping)."""
        return dict(self._get(session_id).items)

    def swapped_names(self, session_id: Hashable) -> list[str]:
        s = self._get(session_id)
        return s.swapped.names if s.swapped is not None else []

    def sessions(self) -> list[Hashable]:
        """Open session ids, least recently used first."""
        return [s.sid for s in sorted(self._sessions.values(), key=lambda s: s.last_used)]

    def __contains__(self, session_id: object) -> bool:
        try:
            return session_id in self._sessions
        except TypeError:
            return False

    @property
    def stats(self) -> ResidencyStats:
        ss = list(self._sessions.values())
        swapped = [s for s in ss if s.swapped is not None and len(s.swapped)]
        return ResidencyStats(
            budget_bytes=self.budget_bytes,
            weight_bytes=self.weight_bytes,
            resident_bytes=sum(self._resident_bytes(s) for s in ss),
            swapped_bytes=sum(self._swapped_bytes(s) for s in ss),
            sessions=len(ss),
            running=sum(s.running for s in ss),
            resident_sessions=len(ss) - len(swapped),
            swapped_sessions=len(swapped),
            evictions=self._evictions,
            swap_ins=self._swap_ins,
            swap_out_bytes=self._swap_out_bytes,
            swap_in_bytes=self._swap_in_bytes,
        )
