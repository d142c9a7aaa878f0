"""Memory pressure: more paused sessions than fit in VRAM all complete, and each one's tokens equal its solo run.

The workload (:func:`run_workload`): spawn every session to a pause layer, then resume them round-robin and generate
``GEN_PER_ROUND`` tokens each, ``ROUNDS`` times over, so sessions are evicted to the host pool and brought back. Each
session's tokens are compared with the same session alone on an idle runtime (:func:`solo_tokens`). The eager
baseline (:func:`eager_baseline`) keeps one plain ``DynamicCache`` per session resident until the GPU runs out of
memory.

Everything is sized from the VRAM budget (:mod:`djinn_core.memory.vram_budget`), never from the card: the session counts
(:func:`session_counts`), the slab (the budget less what is in use and an activation headroom) and the host pool
(:func:`swap_pool_bytes`).
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import DynamicCache

from djinn_core.runtime import BreakpointRuntime, SessionState

GEN_PER_ROUND = 16
ROUNDS = 2
NEW_TOKENS = GEN_PER_ROUND * ROUNDS
MiB = 2**20
BASE_SESSION_COUNTS = (8, 32, 50, 64)  # the seeds' session counts (an 80 GB card)
TARGET_OVERSUBSCRIPTION = 1.6  # where the base counts do not reach the bar, the largest N asks for this much


def demand_bytes(sessions: int, session_bytes: int, weight_bytes: int) -> int:
    """What ``sessions`` fully decoded sessions and the shared weights ask of the GPU, in bytes."""
    return sessions * session_bytes + weight_bytes


def session_counts(budget_bytes: int | None, session_bytes: int, weight_bytes: int, *, bar: float,
                   base: tuple[int, ...] = BASE_SESSION_COUNTS,
                   target: float = TARGET_OVERSUBSCRIPTION) -> list[int]:
    """The session counts N to run at a budget: ``base`` where its largest N asks for at least ``bar`` x the budget
    (the 80 GB card: N=64 asks for 1.58x); otherwise ``base`` plus the smallest N whose demand is at least ``target``
    x the budget (the whole H200: 126), so that the largest N oversubscribes at any budget. ``base`` without a
    budget (``card`` on a machine without a GPU: nothing runs)."""
    counts = sorted(base)
    if budget_bytes is None or demand_bytes(counts[-1], session_bytes, weight_bytes) >= bar * budget_bytes:
        return counts
    n = math.ceil((target * budget_bytes - weight_bytes) / session_bytes)
    return sorted(set(counts) | {n})


def swap_pool_bytes(max_sessions: int, session_bytes: int, head_bytes: int, slab_bytes: int) -> int:
    """The host pool a run of ``max_sessions`` needs: every session's state (its KV and a checkpoint head) that the
    slab cannot hold, plus two sessions of slack (one going out while another comes in); rounded up to whole MiB."""
    need = max(0, max_sessions * (session_bytes + head_bytes) - slab_bytes) + 2 * session_bytes
    return -(-need // MiB) * MiB


def must_evict(sessions: int, session_bytes: int, slab_bytes: int, reserve_bytes: int) -> bool:
    """Whether ``sessions`` fully decoded sessions cannot all stay in a slab of ``slab_bytes`` that keeps
    ``reserve_bytes`` free: then the run must evict, and the claims about swapping apply."""
    return sessions * session_bytes > slab_bytes - reserve_bytes


def swap_reference_GBps(row: dict[str, Any], ceiling_GBps: float) -> float:
    """What a swap (a :func:`~djinn_core.memory.swap_items.swap_timeline` row) is rated against: the link's rate just
    around it (``bracket_GBps``), unless it has no brackets or a bracket copy shared the link with a copy the other
    way (so it ran slower than the link alone): then the run's ceiling, ``ceiling_GBps``."""
    if "bracket_GBps" not in row or row.get("bracket_overlap_ms", 0.0) > 0:
        return ceiling_GBps
    return row["bracket_GBps"]


def prompts(n: int, seq: int, vocab: int, device: torch.device | str) -> list[torch.Tensor]:
    """n distinct seeded prompts (token ids), the same for every N, so each session has one solo reference."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (1, seq), generator=g).to(device) for _ in range(n)]


@dataclass
class WorkloadResult:
    tokens: dict[int, torch.Tensor]  # prompt index -> (1, NEW_TOKENS) token ids
    marks: list[dict[str, Any]] = field(default_factory=list)  # (event, session, slab_used) in order
    max_slab_used: int = 0
    evictions: int = 0


def run_workload(rt: BreakpointRuntime, ps: list[torch.Tensor], *, layer: int, mark=None,
                 progress: bool = False) -> WorkloadResult:
    """Spawn every prompt to ``layer``, then ROUNDS x round-robin resume + generate GEN_PER_ROUND tokens.

    ``mark(event, session=, slab_used=, evictions=)``, when given, is called after each step (e.g.
    :meth:`VramSampler.mark`); every session is closed at the end."""
    res = WorkloadResult(tokens={})

    def note(event: str, i: int) -> None:
        used = rt.slab.stats.used
        res.max_slab_used = max(res.max_slab_used, used)
        rec = {"event": event, "session": i, "slab_used": used, "evictions": rt.evictions}
        res.marks.append(rec)
        if mark is not None:
            mark(event, session=i, slab_used=used, evictions=rt.evictions)

    sessions = []
    for i, p in enumerate(tqdm(ps, desc="spawn", disable=not progress)):
        s = rt.open(p, max_new_tokens=NEW_TOKENS)
        s.run_to(layer)
        sessions.append(s)
        note("spawn", i)
    out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(ps))}
    for r in range(ROUNDS):
        for i, s in enumerate(tqdm(sessions, desc=f"round {r}", disable=not progress)):
            if s.state in (SessionState.CHECKPOINT, SessionState.PAUSED, SessionState.SWAPPED):
                s.resume()
            out[i].append(s.generate(GEN_PER_ROUND).cpu())
            note(f"round{r}", i)
    res.tokens = {i: torch.cat(t, dim=1) for i, t in out.items()}
    res.evictions = rt.evictions
    for s in sessions:
        s.close()
    return res


def solo_tokens(rt: BreakpointRuntime, p: torch.Tensor, *, layer: int) -> torch.Tensor:
    """The same session alone on an idle runtime: run_to, resume, generate ROUNDS x GEN_PER_ROUND."""
    s = rt.open(p, max_new_tokens=NEW_TOKENS)
    s.run_to(layer)
    s.resume()
    toks = torch.cat([s.generate(GEN_PER_ROUND).cpu() for _ in range(ROUNDS)], dim=1)
    s.close()
    return toks


def unequal_sessions(result: WorkloadResult, solo: dict[int, torch.Tensor]) -> list[int]:
    """The prompt indices whose workload tokens differ from their solo run's."""
    return [i for i, t in result.tokens.items() if not torch.equal(t, solo[i])]


def eager_baseline(model, ps: list[torch.Tensor], kv_session_bytes: int,
                   allocatable: Callable[[], int] | None = None) -> dict[str, Any]:
    """Plain PyTorch: one ``DynamicCache`` per session (the prompts in turn, up to 4x over) kept resident until the
    GPU runs out of memory, against the count predicted from the memory torch may still allocate
    (``allocatable()``, default the driver's free memory; under an enforced VRAM budget, the allocator's cap) /
    ``kv_session_bytes``."""
    gc.collect()
    torch.cuda.empty_cache()
    driver_free, total = torch.cuda.mem_get_info()
    free = allocatable() if allocatable is not None else driver_free
    predicted = free // kv_session_bytes
    caches = []
    oom_at = None
    try:
        with torch.no_grad():
            for k in range(4 * len(ps)):
                c = DynamicCache(config=model.config)
                model(ps[k % len(ps)], past_key_values=c, use_cache=True, logits_to_keep=1)
                caches.append(c)
    except torch.cuda.OutOfMemoryError:
        oom_at = len(caches) + 1
    held = len(caches)
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    del caches
    gc.collect()
    torch.cuda.empty_cache()
    return {"free_before_bytes": free, "driver_free_before_bytes": driver_free, "total_bytes": total,
            "kv_session_bytes": kv_session_bytes,
            "predicted_sessions": int(predicted), "sessions_held": held, "oom_at_session": oom_at,
            "allocated_at_oom_bytes": allocated, "reserved_at_oom_bytes": reserved}


