"""Residency policy: which sessions' state lives in the slab, and whose state goes to the host when room is needed.

:class:`Residency` is the one object that decides. It knows its *tenants* (sessions) only through the small
:class:`Tenant` interface -- an id, whether it may be evicted now, the slab allocations it holds with their reference
counts, and ``evict()`` -- so the mechanisms (:class:`~djinn_core.memory.slab.Slab`, the swap engine) never decide,
and the runtime's sessions never reach into the policy.

* **Use order.** Every call on a tenant ends with :meth:`Residency.touch`: a resident, evictable tenant becomes the
  most recently used idle one. A tenant inside a call (:meth:`Residency.in_use`) is never evicted.
* **Making room.** :meth:`Residency.allocate` and :meth:`Residency.make_room` first give up the spare buffer (below),
  then ask the :class:`EvictionPolicy` for victims among the idle tenants, until the request fits in the slab's free
  total (compaction does the rest). Before evicting anyone they check that evicting every idle tenant would be
  enough; if not, nothing is evicted and :class:`~djinn_core.errors.SlabExhausted` says so (Admission LATER; NEVER
  when the request exceeds the whole slab).
* **Shared blocks.** Forks reference the same KV blocks copy-on-write. Evicting a tenant frees only the allocations
  it alone references; a shared one is copied to the host and its reference dropped, and it is freed by the eviction
  of its last holder. The plan counts a shared allocation as freeable only when all its holders are evictable.
* **Eviction never allocates.** A tenant's ``evict()`` must not allocate slab memory; :class:`Residency` refuses a
  room request made during an eviction with a typed error instead of recursing.
* **Free target.** With ``free_target_bytes > 0``, after every call idle tenants are evicted until that many slab
  bytes are free, each eviction's copies ordered after the restores already in flight (``before_evict``), so the
  next restore of up to that size finds its room ready.
* **Spare buffer.** One spare slab buffer (sized like the last one asked for) where the next restore's head lands
  without an allocation; made only from memory free at that moment, never by evicting, and given up before any
  tenant is evicted.

Not thread-safe (one owner).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from djinn_core.errors import CheckpointStateError, ConfigError, HostPoolExhausted, SlabExhausted
from djinn_core.memory.slab import Admission, Slab, SlabTensor, event_pending
from djinn_core.trace import timing_event
from djinn_core.validation import check_int

log = logging.getLogger(__name__)


class Tenant(Protocol):
    """What :class:`Residency` needs from a session."""

    id: int

    @property
    def evictable(self) -> bool:
        """Whether its state is resident and may go to the host when it is idle."""

    def held(self) -> Iterable[tuple[SlabTensor, int]]:
        """The slab allocations it references, each with the number of tenants referencing it (1: its own)."""

    def evict(self) -> None:
        """Move its resident state to the host, freeing what it alone references. Must not allocate slab memory."""


@dataclass(frozen=True)
class Candidate:
    """An idle tenant an eviction could pick. Bytes are aligned slab bytes.

    ``rank``: 0 for the least recently used; ``freed_bytes``: what evicting it frees now (allocations it alone
    references); ``shared_bytes``: what it references together with other tenants (not freed by its eviction).
    """

    id: int
    rank: int
    freed_bytes: int
    shared_bytes: int


class EvictionPolicy(Protocol):
    """Picks the next victim among idle candidates (in least-recently-used order); None to evict no one."""

    name: str

    def pick(self, candidates: Sequence[Candidate], need_bytes: int) -> Candidate | None: ...


class LRU:
    """The least recently used idle tenant."""

    name = "lru"

    def pick(self, candidates: Sequence[Candidate], need_bytes: int) -> Candidate | None:
        return candidates[0] if candidates else None


class LargestFirst:
    """The idle tenant whose eviction frees the most bytes now (least recently used among equals): fewest
    evictions for a large request."""

    name = "largest-first"

    def pick(self, candidates: Sequence[Candidate], need_bytes: int) -> Candidate | None:
        best = None
        for c in candidates:  # NOTE: one that frees nothing now still drops references to shared blocks
            if best is None or c.freed_bytes > best.freed_bytes:
                best = c
        return best


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {LRU.name: LRU, LargestFirst.name: LargestFirst}


class Residency:
    """Decides which tenants' state lives in ``slab``.

    Args:
        slab: the slab tenants' state lives in.
        policy: picks eviction victims (default :class:`LRU`).
        free_target_bytes: after every call, evict idle tenants until this many slab bytes are free (0: evict only
            when a request does not fit).
        before_evict: called before each eviction made for the free target (the runtime orders the eviction's
            copies after the restores in flight).
    """

    def __init__(self, slab: Slab, *, policy: EvictionPolicy | None = None, free_target_bytes: int = 0,
                 before_evict: Callable[[], None] | None = None):
        if not isinstance(slab, Slab):
            raise ConfigError(f"slab must be a Slab, got {type(slab).__name__}")
        policy = LRU() if policy is None else policy
        if not callable(getattr(policy, "pick", None)):
            raise ConfigError(f"policy must have a pick(candidates, need_bytes) method, got {policy!r}")
        self.slab = slab
        self.policy = policy
        self.free_target_bytes = check_int("free_target_bytes", free_target_bytes, 0)
        self._before_evict = before_evict
        self._idle: dict[int, Tenant] = {}  # resident idle tenants, least recently used first
        self._busy: set[int] = set()  # tenants inside a call (never evicted)
        self._evicting = False
        self.evictions = 0
        # one spare slab buffer and the fences handed over with it (see prepare_spare)
        self._spare: tuple[SlabTensor, list[Any]] | None = None

    # -- use order -------------------------------------------------------------------------------------------------
    def touch(self, tenant: Tenant) -> None:
        """Record a use: an evictable tenant becomes the most recently used idle one (others leave the idle list)."""
        self._idle.pop(tenant.id, None)
        if tenant.evictable:
            self._idle[tenant.id] = tenant

    def forget(self, tenant: Tenant) -> None:
        """The tenant is gone (closed)."""
        self._idle.pop(tenant.id, None)
        self._busy.discard(tenant.id)

    @contextlib.contextmanager
    def in_use(self, tenant: Tenant) -> Iterator[None]:
        """While a call runs on ``tenant`` it is never evicted; afterwards it is the most recently used, and the
        free target is replenished."""
        tid = tenant.id
        self._busy.add(tid)
        try:
            yield
        finally:
            self._busy.discard(tid)
            self.touch(tenant)
        self.replenish(tid)

    @property
    def busy(self) -> frozenset[int]:
        return frozenset(self._busy)

    @property
    def idle(self) -> list[int]:
        """Ids of the resident idle tenants, least recently used first."""
        return list(self._idle)

    # -- room ------------------------------------------------------------------------------------------------------
    def allocate(self, tenant_id: int, shape: tuple[int, ...], dtype: torch.dtype, *, tag: str | None = None
                 ) -> SlabTensor:
        """A slab tensor for ``tenant_id``, evicting idle tenants (never ``tenant_id`` or a busy one) when the slab is
        full. Raises :class:`~djinn_core.errors.SlabExhausted`, having evicted no one, when it cannot fit."""
        try:
            return self.slab.allocate(shape, dtype, tag=tag)
        except SlabExhausted as e:
            self.make_room(tenant_id, e.requested)
        return self.slab.allocate(shape, dtype, tag=tag)  # the free total fits: compaction makes it contiguous

    def make_room(self, tenant_id: int, nbytes: int) -> None:
        """Make ``nbytes`` fit in the slab's free total (aligned bytes): give up the spare buffer, then evict idle
        tenants other than ``tenant_id`` as the policy picks them. Raises :class:`SlabExhausted` without evicting
        anyone when evicting every idle tenant would not be enough."""
        slab = self.slab
        if nbytes <= slab.free_bytes:
            return
        if self._evicting:  # NOTE: an eviction that allocates would recurse; refuse it (a bug in a tenant's evict)
            raise CheckpointStateError(f"tenant {tenant_id} asked for {nbytes} slab bytes during an eviction")
        self.drop_spare()
        if nbytes <= slab.free_bytes:
            return
        verdict, evictable = self._plan(nbytes, {tenant_id})
        if verdict is not Admission.OK:
            raise SlabExhausted(nbytes, slab.free_bytes, slab.capacity, self._refusal(nbytes, verdict, evictable))
        self._evict_until(nbytes, tenant_id)
        if nbytes > slab.free_bytes:  # a victim could not be evicted (host pool full): state stays consistent
            raise SlabExhausted(nbytes, slab.free_bytes, slab.capacity)

    def admit(self, nbytes: int, protect: Iterable[int] = ()) -> Admission:
        """OK if ``nbytes`` (aligned slab bytes) fit now or after evicting idle tenants (not those in ``protect``),
        LATER if only memory held by busy or protected tenants stands in the way, NEVER if more than the slab."""
        check_int("nbytes", nbytes, 0)
        return self._plan(nbytes, set(protect))[0]

    def replenish(self, tenant_id: int) -> None:
        """With a free target: evict idle tenants other than ``tenant_id`` until that many slab bytes are free (as
        many as can be; never raises for lack of victims)."""
        target = self.free_target_bytes
        if target <= 0 or self.slab.free_bytes >= target or self._evicting:
            return
        self.drop_spare()  # the target comes first
        self._evict_until(min(target, self.slab.capacity), tenant_id, self._before_evict)

    def _evict_until(self, nbytes: int, tenant_id: int, before: Callable[[], None] | None = None) -> None:
        skip = {tenant_id}
        while self.slab.free_bytes < nbytes:
            victim = self.policy.pick(self.candidates(skip), nbytes)
            if victim is None:
                return
            skip.add(victim.id)
            if before is not None:
                before()
            self._evict(self._idle[victim.id], tenant_id)

    def _evict(self, victim: Tenant, for_id: int) -> bool:
        log.info("slab full: evicting idle session %d to make room for session %d", victim.id, for_id)
        self._evicting = True
        try:
            victim.evict()
        except HostPoolExhausted as e:  # nothing changed for the victim: try the next one
            log.warning("could not evict session %d: %s", victim.id, e)
            return False
        finally:
            self._evicting = False
        self.touch(victim)  # no longer evictable: leaves the idle list
        self.evictions += 1
        return True

    def candidates(self, skip: Iterable[int] = ()) -> list[Candidate]:
        """Idle, not busy tenants outside ``skip``, least recently used first, with what evicting each frees now."""
        skip = set(skip) | self._busy
        out = []
        for rank, t in enumerate(self._idle.values()):
            if t.id in skip:
                continue
            freed = shared = 0
            for a, refs in t.held():
                if refs > 1:
                    shared += self.slab.aligned_size(a.nbytes)
                else:
                    freed += self.slab.aligned_size(a.nbytes)
            out.append(Candidate(t.id, rank, freed, shared))
        return out

    def _plan(self, nbytes: int, protect: set[int]) -> tuple[Admission, int]:
        """(answer, bytes that evicting every idle tenant outside ``protect`` would free, spare buffer included)."""
        slab = self.slab
        if slab.aligned_size(nbytes) > slab.capacity:
            return Admission.NEVER, 0
        holders: dict[int, list] = {}  # alloc_id -> [aligned bytes, refs, evictable holders]
        for t in self._idle.values():
            if t.id in protect or t.id in self._busy:
                continue
            for a, refs in t.held():
                h = holders.get(a.alloc_id)
                if h is None:
                    holders[a.alloc_id] = [slab.aligned_size(a.nbytes), refs, 1]
                else:
                    h[2] += 1
        evictable = sum(size for size, refs, n in holders.values() if n >= refs) + self.spare_bytes
        return (Admission.OK if nbytes <= slab.free_bytes + evictable else Admission.LATER), evictable

    def _refusal(self, nbytes: int, verdict: Admission, evictable: int) -> str:
        st = self.slab.stats
        if verdict is Admission.NEVER:
            return f"{nbytes} bytes can never fit: the whole slab holds {st.capacity} bytes (admission NEVER)"
        return (f"{nbytes} bytes do not fit: {st.free} of {st.capacity} slab bytes free and evicting every idle "
                f"session would free {evictable} more; the rest is held by sessions in use (admission LATER)")

    # -- spare buffer ----------------------------------------------------------------------------------------------
    @property
    def spare_bytes(self) -> int:
        """Slab bytes held by the spare buffer (0 or its aligned size), not by any tenant."""
        return 0 if self._spare is None else self.slab.aligned_size(self._spare[0].nbytes)

    @property
    def spare(self) -> SlabTensor | None:
        return None if self._spare is None else self._spare[0]

    def prepare_spare(self, nbytes: int) -> None:
        """Keep one spare buffer of ``nbytes`` (uint8) for the next restore (one, sized like the last asked for).
        Takes only memory free now beyond the free target (never evicts; nothing during an eviction) and keeps the
        fences the allocation hands over for whoever takes it (no wait here)."""
        spare = self._spare
        if spare is not None:
            if spare[0].nbytes == nbytes:
                return
            self.drop_spare()
        if self._evicting or self.slab.free_bytes < self.slab.aligned_size(nbytes) + self.free_target_bytes:
            return
        deps: list[Any] = []
        buf = self.slab.allocate((nbytes,), torch.uint8, tag="spare-head", fences=deps)
        # fences already passed cost nothing to drop now; each one kept is a stream wait on the restore's path
        self._spare = (buf, [ev for ev in deps if event_pending(ev)])
        buf.view()  # the view is cached until the slab compacts: a restore just reuses it

    def take_spare(self, nbytes: int) -> tuple[SlabTensor, list[Any]] | None:
        """The spare buffer and the events it must wait for, if it has exactly ``nbytes``; it then belongs to the
        caller (a slab allocation like any other)."""
        spare = self._spare
        if spare is None or spare[0].nbytes != nbytes:
            return None
        self._spare = None
        return spare

    def drop_spare(self) -> bool:
        """Free the spare buffer; False when there was none."""
        spare, self._spare = self._spare, None
        if spare is None:
            return False
        buf, deps = spare
        # never used by any stream; its fences were never waited for: free it behind them again
        for ev in deps[:-1]:
            self.slab.fence(buf, ev)
        self.slab.free(buf, after=deps[-1] if deps else timing_event(device=self.slab.device))
        return True
