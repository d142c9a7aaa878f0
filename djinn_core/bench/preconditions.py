"""The preconditions the claims suite states, one function per kind, each recorded through
:meth:`djinn_core.bench.claims.ClaimRecorder.precondition` (so it lands in the JSON beside the claims it guards, and
fails the test at once when it does not hold).

A claim says nothing when its experiment did not happen: a memory-pressure claim whose sessions fit in VRAM, a swap
bandwidth claim over no swap, a ratio to a peer that never ran, a bandwidth over zero bytes. Each function names the
condition and its bar; ``params`` are the claim's parameters, so a report lists the precondition with them.
"""

from __future__ import annotations

from typing import Any

from djinn_core.bench.timing import TimingStats

OVERSUBSCRIPTION_BAR = 1.5  # demand / VRAM budget at the largest session count of a memory-pressure experiment


def oversubscribed(claim: Any, *, demand_bytes: int, budget_bytes: int | None, bar: float = OVERSUBSCRIPTION_BAR,
                   params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The experiment asked for at least ``bar`` x the VRAM budget (demand: weights plus every session's state)."""
    value = demand_bytes / budget_bytes if budget_bytes else float("nan")
    return claim.precondition("demand_over_vram_budget", value=value, op=">=", bound=bar, unit="x budget",
                              what="bytes the sessions and weights ask for, over the VRAM budget", params=params)


def evicted(claim: Any, *, evictions: int, what: str = "sessions evicted from VRAM to the host pool during the run",
            params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Something was evicted: the memory manager actually had to swap."""
    return claim.precondition("evictions", value=evictions, op=">", bound=0, unit="evictions", what=what,
                              params=params)


def swaps_measured(claim: Any, *, direction: str, swaps: int, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """At least one swap of ``direction`` ("out" or "in") was timed before a swap-bandwidth claim about it."""
    return claim.precondition(f"swaps_{direction}_measured", value=swaps, op=">", bound=0, unit="swaps",
                              what=f"whole-session swaps {direction} timed", params=params)


def swaps_bracketed(claim: Any, *, direction: str, bracketed: int, swaps: int,
                    params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every whole-session swap of ``direction`` was timed between its two bracket copies
    (:class:`djinn_core.bench.ceilings.LinkBracket`), and there was at least one, before a claim that rates each swap
    against the link around it."""
    return every_pair_measured(claim, f"swaps_{direction}_bracketed", measured=bracketed, pairs=swaps,
                               what=f"whole-session swaps {direction} timed between a copy right before and one "
                                    f"right after ({bracketed} of {swaps})", params=params)


def peer_ran(claim: Any, *, peer: str, timing: TimingStats | None = None, value: float | None = None,
             params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The peer (a baseline, another system) ran before a ratio to it: it has timed repeats with a positive median,
    or a positive figure (``value``: its GB/s, the sessions it held...)."""
    if timing is not None:
        figure = timing.median_ms if timing.n and timing.median_ms > 0 else 0.0
        what = f"median of {peer}'s timed repeats ({timing.n} repeats)"
        unit = "ms"
    else:
        figure = float("nan") if value is None else float(value)
        what, unit = f"{peer}'s figure", "value"
    name = "peer_ran_" + "".join(c if c.isalnum() else "_" for c in peer).strip("_")
    return claim.precondition(name[:80], value=figure, op=">", bound=0, unit=unit, what=what,
                              params=params)


def bytes_moved(claim: Any, *, nbytes: int, what: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The copy a bandwidth claim divides by moved bytes (counted by the engine that moved them)."""
    return claim.precondition("bytes_moved", value=nbytes, op=">", bound=0, unit="bytes", what=what, params=params)


def at_least(claim: Any, name: str, *, value: float, bound: float, unit: str, what: str,
             params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Any other count the experiment must reach (``value >= bound``), e.g. the host RAM a swap pool needs."""
    return claim.precondition(name, value=value, op=">=", bound=bound, unit=unit, what=what, params=params)


def every_pair_measured(claim: Any, name: str, *, measured: int, pairs: int, what: str,
                        params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A paired claim's every pair (or every item: every swap bracketed) has what it needs (e.g. both resumes'
    device spans): ``measured`` of ``pairs``, all of them, and at least one pair."""
    return claim.precondition(name, value=measured / pairs if pairs else 0.0, op="==", bound=1.0, unit="fraction",
                              what=what, params=params)
