"""What the swap engine moves: typed item keys, the states of swapped and restored items, their checksums, and the
timeline of timed swaps (:mod:`djinn_core.memory.swap` moves them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union

import torch

from djinn_core.errors import ChecksumMismatch, ConfigError, DeviceUnavailable, UnknownAllocation
from djinn_core.memory.cuda_driver import DriverCopier
from djinn_core.memory.host_pool import HostBlock
from djinn_core.memory.slab import SlabTensor
from djinn_core.trace import Span
from djinn_core.validation import is_int

if TYPE_CHECKING:
    from djinn_core.memory.swap import SwapEngine

_CHECKSUM_MODULUS = 65521  # largest prime < 2**16: position weights 1..65521


def checksum(t: torch.Tensor) -> torch.Tensor:
    """Position-weighted checksum of a contiguous tensor's bytes: an int64 tensor ``[sum(w), sum(w * (i % M + 1))]``.

    Words are int32 when the byte count allows (uint8 otherwise); sums wrap modulo 2**64, which is associative, so the
    result does not depend on reduction order or device. Runs on the current stream of ``t``'s device.
    """
    b = t.reshape(-1).view(torch.uint8)
    w = (b.view(torch.int32) if b.numel() % 4 == 0 else b).to(torch.int64)
    pos = torch.arange(w.numel(), dtype=torch.int64, device=w.device).remainder_(_CHECKSUM_MODULUS).add_(1)
    return torch.stack([w.sum(), (w * pos).sum()])


class ItemKey:
    """A typed swap item key: a part name and an optional index (a session's packed head, layer 3's KV block).

    Instances are interned -- ``ItemKey("kv", 3) is ItemKey("kv", 3)`` -- so a key hashes and compares by identity,
    as fast as a str, and nothing is formatted or parsed back on a swap. Items may also be named by plain str.
    """

    __slots__ = ("part", "index")
    _interned: dict[tuple[str, int | None], "ItemKey"] = {}

    def __new__(cls, part: str, index: int | None = None) -> "ItemKey":
        # NOTE: checked before the lookup: True or 1.0 would find the key of 1
        if part.__class__ is not str or not part or not (index is None or is_int(index) and index >= 0):
            raise ConfigError(f"an item key is a non-empty str and an int >= 0 or None, got ({part!r}, {index!r})")
        key = cls._interned.get((part, int(index) if index is not None else None))
        if key is None:
            key = object.__new__(cls)
            object.__setattr__(key, "part", part)
            object.__setattr__(key, "index", None if index is None else int(index))
            cls._interned[(part, key.index)] = key
        return key

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ItemKey is immutable")

    def __reduce__(self) -> tuple:
        return ItemKey, (self.part, self.index)

    def __repr__(self) -> str:
        return self.part if self.index is None else f"{self.part}.{self.index}"


Key = Union[str, ItemKey]  # what names a swap item


@dataclass
class SwappedItem:
    """One item in the host pool. ``event``: recorded on the out stream after its D2H copy (None on the CPU)."""

    name: Key
    block: HostBlock
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    tag: str | None
    event: Any = None
    checksum: torch.Tensor | None = None  # on the device, written on the out stream before ``event``
    # with driver copies: an event whose driver object exists already (made at swap-out), recorded by the swap-in
    # through the driver after the item's H2D copy -- no event creation on the restore's path
    in_event: Any = None


class SwappedState:
    """A set of named items living in the host pool (the result of :meth:`SwapEngine.swap_out`).

    ``items`` keeps insertion order. :meth:`SwapEngine.swap_in` removes the items it brings back; once empty the
    state is consumed. :meth:`SwapEngine.release` discards it.
    """

    def __init__(self, engine: "SwapEngine", items: dict[Key, SwappedItem]):
        self.engine = engine  # the engine that made it
        self.items = items

    @property
    def names(self) -> list[str]:
        return list(self.items)

    @property
    def nbytes(self) -> int:
        """Requested bytes of all items (unaligned)."""
        return sum(it.nbytes for it in self.items.values())

    def slab_bytes(self, names: Iterable[str] | None = None) -> int:
        """Aligned slab bytes the items (all, or ``names``) need when swapped back in."""
        names = self.items if names is None else names
        return sum(self.engine.slab.aligned_size(self.items[n].nbytes) for n in names)

    def __contains__(self, name: object) -> bool:
        return name in self.items

    def __len__(self) -> int:
        return len(self.items)

    def wait(self, name: str | None = None) -> None:
        """Make the current stream wait for the D2H copy of ``name`` (all items when None). Non-blocking."""
        for it in self._select(name):
            if it.event is not None:
                torch.cuda.current_stream(self.engine.device).wait_event(it.event)

    def wait_host(self, name: str | None = None) -> None:
        """Block the host until the D2H copy of ``name`` (all when None) is done, e.g. before reading ``host_view``."""
        for it in self._select(name):
            if it.event is not None:
                it.event.synchronize()

    def host_view(self, name: str) -> torch.Tensor:
        """The host copy of ``name`` (a CPU tensor; call :meth:`wait_host` before reading it)."""
        return self._select(name)[0].block.view()

    def is_complete(self) -> bool:
        """True when every D2H copy has finished (non-blocking query)."""
        return all(it.event is None or it.event.query() for it in self.items.values())

    def absorb(self, other: "SwappedState") -> None:
        """Move every item of ``other`` (same engine, disjoint names) into this state; ``other`` becomes empty."""
        if not isinstance(other, SwappedState) or other.engine is not self.engine:
            raise ConfigError("can only absorb a swapped state of the same engine")
        clash = set(self.items) & set(other.items)
        if clash:
            raise ConfigError(f"swapped states share item names {sorted(clash)}")
        self.items.update(other.items)
        other.items = {}

    def _select(self, name: str | None) -> list[SwappedItem]:
        if name is None:
            return list(self.items.values())
        if name not in self.items:
            raise UnknownAllocation(f"no item {name!r} in this swapped state (has {self.names})")
        return [self.items[name]]

    def __repr__(self) -> str:
        return f"SwappedState({len(self.items)} items, {self.nbytes} B)"


@dataclass
class ResidentState:
    """Items brought back into the slab by :meth:`SwapEngine.swap_in`.

    ``tensors[name]`` is the slab handle; ``events[name]`` is recorded on the in stream after its H2D copy (None when
    nothing is in flight). ``pending`` is the rest of the swapped state when only some items were swapped in.
    """

    tensors: dict[str, SlabTensor]
    events: dict[str, Any] = field(default_factory=dict)
    pending: SwappedState | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # name -> (checksum before swap-out, its event, checksum after swap-in, its event); debug mode only
    _checks: dict[str, tuple[torch.Tensor, Any, torch.Tensor, Any]] = field(default_factory=dict, repr=False)
    # the engine's driver copier: waits go through the driver (a decode step waits once per restored layer)
    _driver: DriverCopier | None = field(default=None, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def wait(self, name: str) -> None:
        """Make the current stream wait until ``name`` has arrived (non-blocking, except in checksum mode)."""
        if name not in self.tensors:
            raise UnknownAllocation(f"no item {name!r} in this resident state (has {self.names})")
        ev = self.events.get(name)
        if ev is not None:
            drv = self._driver
            if drv is not None:
                drv.wait(drv.current_stream(), ev.cuda_event)
            else:
                torch.cuda.current_stream(self.device).wait_event(ev)
        if name in self._checks:
            self.verify([name])

    def wait_all(self) -> None:
        """:meth:`wait` for every item."""
        for name in self.tensors:
            self.wait(name)

    def is_ready(self, name: str) -> bool:
        """Whether ``name``'s copy has finished (non-blocking query)."""
        ev = self.events.get(name)
        return ev is None or bool(ev.query())

    def verify(self, names: Sequence[str] | None = None) -> None:
        """Debug mode: block on the items' events and compare checksums; raise :class:`ChecksumMismatch`."""
        for name in list(self._checks if names is None else names):
            check = self._checks.pop(name, None)
            if check is None:
                continue
            before, ev_before, after, ev_after = check
            for ev in (ev_before, ev_after):
                if ev is not None:
                    ev.synchronize()
            b, a = before.cpu().tolist(), after.cpu().tolist()
            if b != a:
                raise ChecksumMismatch(f"item {name!r}: checksum {b} before swap-out, {a} after swap-in")


@dataclass(frozen=True)
class SwapStats:
    """Bytes (requested, unaligned) and item counts moved since creation."""

    bytes_out: int
    bytes_in: int
    items_out: int
    items_in: int
    swaps_out: int
    swaps_in: int


def swap_timeline(records: Sequence[Span]) -> list[dict[str, Any]]:
    """Each swap of ``records`` (:attr:`SwapEngine.records`) as ``{direction, nbytes, ms, GBps, start_ms, overlap_ms,
    host_issue_ms, host_start_s, segments}``: ``start_ms`` from the first record's start (device clock),
    ``host_start_s`` the host's ``perf_counter`` when its first copy was issued, ``overlap_ms`` the time it shared the
    link with copies of the other direction (swaps and their brackets: a copy that overlaps one the other way runs
    slower), ``host_issue_ms`` how long the host took to issue its copies (a swap issued slower than its copies run
    leaves the link idle inside its window), ``segments`` the host pool segments its blocks lie in (where recorded).
    A swap taken between two bracket copies (``SwapEngine.bracket``) also has ``bracket_ms`` (before, after),
    ``bracket_nbytes``, ``bracket_GBps`` (both copies' bytes over their time: what the link gave just around the
    swap), ``bracket_overlap_ms`` (their time shared with copies the other way) and ``over_bracket`` (``GBps`` /
    ``bracket_GBps``). Waits for the last record's events: call it after the run. :class:`DeviceUnavailable` for
    records without CUDA events.
    """
    if not records:
        return []
    marks = [m for r in records for m in (r.start, r.end)]
    brackets = [r.data.get("bracket") or () for r in records]
    marks += [m for b in brackets for span in b for m in (span.start, span.end)]
    if any(m.event is None for m in marks):
        raise DeviceUnavailable("swap timing needs CUDA events; these swaps ran on the CPU")
    for r, b in zip(records, brackets):  # every copy done: an event's elapsed time needs both events complete
        for span in (r, *b):
            span.end.event.synchronize()
    origin = records[0].start.event

    def window(span: Span) -> tuple[float, float]:
        t0 = origin.elapsed_time(span.start.event)
        return t0, t0 + span.ms()

    spans = [(r.label, r.data["nbytes"], *window(r)) for r in records]
    link = [(d, t0, t1) for d, _, t0, t1 in spans]  # every copy on the link: swaps and brackets
    bracket_windows = [[window(span) for span in b] for b in brackets]
    link += [(r.label, t0, t1) for r, ws in zip(records, bracket_windows) for t0, t1 in ws]

    def shared(direction: str, t0: float, t1: float) -> float:
        return sum(max(0.0, min(t1, u1) - max(t0, u0)) for e, u0, u1 in link if e != direction)

    out = []
    for r, (d, n, t0, t1), b, ws in zip(records, spans, brackets, bracket_windows):
        ms = t1 - t0
        row = {"direction": d, "nbytes": n, "ms": ms, "GBps": n / ms / 1e6 if ms > 0 else float("nan"),
               "start_ms": t0, "overlap_ms": shared(d, t0, t1), "host_issue_ms": r.host_ms,
               "host_start_s": r.start.host_s}
        if "segments" in r.data:
            row["segments"] = list(r.data["segments"])
        if b:
            b_ms = [u1 - u0 for u0, u1 in ws]
            b_n = sum(span.data["nbytes"] for span in b)
            row.update(bracket_ms=b_ms, bracket_nbytes=b_n,
                       bracket_GBps=b_n / sum(b_ms) / 1e6 if sum(b_ms) > 0 else float("nan"),
                       bracket_overlap_ms=sum(shared(d, u0, u1) for u0, u1 in ws))
            row["over_bracket"] = row["GBps"] / row["bracket_GBps"]
        out.append(row)
    return out
