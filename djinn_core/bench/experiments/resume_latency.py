"""Resume latency: how long a paused breakpoint session takes to continue from layer L, against the ways a system
without Djinn's breakpoints would continue.

Every timing is event-timed on the current CUDA stream after warm-up; the host waits on events only outside the
timed regions. The methods, at one depth L of one session:

* Djinn: ``session.restore()`` on a paused session, from the call until layer L may compute
  (``session.ready_event``; the KV copies are then still in flight behind it);
* manual pinned offload: the hidden state copied back by hand from pinned memory (one host-to-device copy), timed as
  the first thing after the same drained offload as Djinn's restore, and in a tight loop (a warm host);
* recompute: the forward through layers 0..L-1 again;
* eager: everything held on the GPU during the pause (nothing to copy; the memory it keeps is what it costs);
* resume-to-next-token: from ``resume()`` to the logits of the first decode step (the first step that needs every
  restored KV byte), split into phases.

:func:`measure_resume_at_depth` runs them all, in that order, for one L. :func:`time_restore_across_depths` times
Djinn's restore and the manual copy-back at every depth round by round, for a claim across depths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from djinn_core.bench.ceilings import CopyCeiling
from djinn_core.bench.timing import GCMeter, TimingStats, event_ms, time_cuda
from djinn_core.bench.vram import VramSampler
from djinn_core.errors import ConfigError
from djinn_core.runtime import capture_at
from djinn_core.runtime.checkpoint import SessionState
from djinn_core.runtime.kv_cache import KVGeometry, SlabKVCache, TorchKVAllocator
from djinn_core.trace import timing_event

WARMUP, REPEATS = 3, 20
PAUSE_S = 0.2  # how long the eager baseline's pause lasts while its memory is sampled


class _RestorePair:
    """Djinn's restore and the manual copy-back of one paused session, each as the first thing after the same drained
    offload.

    :meth:`once` pauses the session (its KV and hidden state go to the host, as a manual offload of the same state
    would move them) and waits for those copies to land; then copies the hidden state back by hand from a pinned
    buffer (``manual``); restores; pauses and drains again; and restores (``djinn``: until layer L can compute,
    ``session.ready_event``; ``djinn_host``: until an event recorded right after restore() returned). Both start from
    the same machine state: after a large device-to-host copy the host's first CUDA calls are slower than in a tight
    loop (see ``docs/notes/bench.md``), so a baseline timed only in a loop would compare a cold restore against a warm
    copy. Event-timed on the current stream from a start event recorded right before each; on the CPU (behaviour
    tests) the same calls run and the host clock times them."""

    def __init__(self, session: Any, hidden: torch.Tensor):
        self.session = session
        cuda = hidden.device.type == "cuda"
        self.stream = torch.cuda.current_stream(hidden.device) if cuda else None
        self.pinned = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=cuda).copy_(hidden.cpu())
        self.target = torch.empty_like(hidden)

    def _offloaded(self) -> None:
        if self.session.state is SessionState.PAUSED:  # paused before its first sample: back in, untimed, first
            self.session.restore()
            self.session.cache.wait_ready()
        self.session.pause()
        if self.stream is not None:
            self.stream.synchronize()
            self.session.runtime.swap.out_stream.synchronize()

    def _stamp(self) -> Any:
        return time.perf_counter() if self.stream is None else timing_event(self.stream)

    def _ms(self, start: Any, end: Any) -> float:
        return (end - start) * 1e3 if self.stream is None else event_ms(start, end)

    def once(self) -> dict[str, float]:
        s = self.session
        self._offloaded()
        start = self._stamp()
        self.target.copy_(self.pinned, non_blocking=self.stream is not None)
        manual = self._ms(start, self._stamp())
        s.restore()
        s.cache.wait_ready()

        self._offloaded()
        start = self._stamp()
        s.restore()
        end = self._stamp()
        ready = end if self.stream is None else s.ready_event
        out = {"manual": manual, "djinn": self._ms(start, ready), "djinn_host": self._ms(start, end)}
        s.cache.wait_ready()
        return out


def time_restore_against_manual(session: Any, hidden: torch.Tensor, warmup: int = WARMUP,
                                repeats: int = REPEATS) -> dict[str, TimingStats]:
    """Djinn's restore and the manual copy-back of one session paused at one depth, ``warmup`` + ``repeats`` times in a
    row (ms; see :class:`_RestorePair`): ``djinn``, ``djinn_host`` and ``manual``. The one-depth case of
    :func:`time_restore_across_depths`."""
    return time_restore_across_depths({0: session}, {0: hidden}, warmup=warmup, repeats=repeats)[0]


def depth_rounds(layers: Sequence[int], rounds: int) -> list[list[int]]:
    """The order of a measurement across depths: each round times every depth once, and each round starts one depth
    later than the one before, so a drift of the link's rate over the measurement falls on every depth alike and no
    depth is always timed first."""
    if not layers or rounds < 1:
        raise ConfigError(f"depth_rounds needs depths and at least one round (got {list(layers)}, {rounds})")
    n = len(layers)
    return [[layers[(r + k) % n] for k in range(n)] for r in range(rounds)]


def time_restore_across_depths(sessions: Mapping[int, Any], hiddens: Mapping[int, torch.Tensor],
                               warmup: int = WARMUP, repeats: int = REPEATS) -> dict[int, dict[str, TimingStats]]:
    """Djinn's restore and the manual copy-back at every depth, the depths interleaved (ms).

    ``sessions[L]``: a session paused or resident at layer L, on one runtime whose host pool holds every session's
    paused state at once; ``hiddens[L]``: its hidden state at L. Each round (:func:`depth_rounds`) takes one
    :class:`_RestorePair` sample per depth, so the depths are timed over the same minutes. Timed one depth after
    another, as :func:`measure_resume_at_depth` does, a depth measured while the link ran slower looks slower: the
    pinned host-to-device rate wanders by 10-20% within a minute on the lent H200s, and the restore is that copy."""
    if set(sessions) != set(hiddens):
        raise ConfigError(f"sessions at depths {sorted(sessions)} but hidden states at {sorted(hiddens)}")
    pairs = {L: _RestorePair(sessions[L], hiddens[L]) for L in sessions}
    out: dict[int, dict[str, list[float]]] = {L: {"djinn": [], "djinn_host": [], "manual": []} for L in pairs}
    for r, order in enumerate(depth_rounds(list(pairs), warmup + repeats)):
        for L in order:
            t = pairs[L].once()
            if r >= warmup:
                for k, v in t.items():
                    out[L][k].append(v)
    return {L: {k: TimingStats(tuple(v), clock=_clock(hiddens[L])) for k, v in per.items()} for L, per in out.items()}


def _clock(t: torch.Tensor) -> str:
    return "cuda_event" if t.device.type == "cuda" else "host"


def allocator_counters() -> dict[str, int]:
    """torch caching-allocator events that synchronize the device (a cudaFree serializes side-stream copies with
    compute): out-of-memory retries, device frees, all-stream syncs."""
    st = torch.cuda.memory_stats()
    return {k: int(st.get(k, 0)) for k in ("num_alloc_retries", "num_device_free", "num_sync_all_streams")}


def time_resume_to_next_token(rt: Any, ids: torch.Tensor, layer: int, *, pause: bool, repeats: int = 10,
                              warmup: int = 2, max_new_tokens: int = 64) -> dict[str, TimingStats]:
    """From resume() to the first decode step's logits (event-timed, ms), a fresh checkpoint per repeat; with its
    phases from the same start: ``head_ready`` (layer L may compute), ``continuation`` (layers L.. and the LM head
    done), ``kv_restored`` (every restored KV copy landed), ``host_return`` (resume() returned, host clock),
    ``host_done`` (the decode step's last launch returned, host clock), ``host_in_gc`` (host time in Python's garbage
    collector within the region) and ``total``. ``pause=False`` times the same continuation from a resident
    checkpoint (its compute alone)."""
    stream = torch.cuda.current_stream()
    out: dict[str, list[float]] = {}
    for i in range(warmup + repeats):
        s = rt.open(ids, max_new_tokens=max_new_tokens)
        s.run_to(layer)
        if pause:
            s.pause()
        stream.synchronize()
        rt.swap.out_stream.synchronize()
        ev = {k: torch.cuda.Event(enable_timing=True) for k in ("start", "continuation", "kv_restored", "total")}
        ev["start"].record(stream)
        with GCMeter() as gm:
            t0 = time.perf_counter()
            s.resume()
            host = (time.perf_counter() - t0) * 1e3
            ev["continuation"].record(stream)
            ev["kv_restored"].record(rt.swap.in_stream)
            s.generate(2)  # token 1 from the resumed logits, token 2 from the first decode step (all KV used)
            ev["total"].record(stream)
            host_done = (time.perf_counter() - t0) * 1e3
        ev["total"].synchronize()
        if pause:
            ev["head_ready"] = s.ready_event
        if i >= warmup:
            for k, e in ev.items():
                if k != "start":
                    out.setdefault(k, []).append(event_ms(ev["start"], e))
            out.setdefault("host_return", []).append(host)
            out.setdefault("host_done", []).append(host_done)
            out.setdefault("host_in_gc", []).append(gm.ms)
        s.close()
    return {k: TimingStats(tuple(v), "host" if k.startswith("host") else "cuda_event") for k, v in out.items()}


def time_recompute(model: Any, ids: torch.Tensor, layer: int, capacity: int) -> TimingStats:
    """The forward through layers 0..L-1 again, into a fresh fp16 KV cache of ``capacity`` tokens (1 warm-up, 5
    repeats)."""
    geo = KVGeometry.for_model(model.config, batch=1, capacity=capacity, dtype=torch.float16)
    cache = SlabKVCache(geo, TorchKVAllocator(ids.device))
    cache.allocate()

    def recompute():
        cache.reset()
        capture_at(model, ids, cache, layer)

    return time_cuda(recompute, warmup=1, repeats=5)


@dataclass
class EagerPause:
    """Eager PyTorch's pause: everything held on the GPU; resuming touches nothing."""

    timing: TimingStats  # "resume": reading the held hidden state's pointer (nothing moves)
    held_bytes: int  # device memory the paused state keeps
    vram: dict[str, Any]  # the memory sampled during the pause (VramSampler.to_dict)


def eager_pause(model: Any, ids: torch.Tensor, layer: int, capacity: int, sampler: VramSampler) -> EagerPause:
    """Capture at ``layer`` with everything kept on the device, sample memory through a pause of ``PAUSE_S``, time the
    (empty) resume."""
    dev = ids.device
    geo = KVGeometry.for_model(model.config, batch=1, capacity=capacity, dtype=torch.float16)
    before = torch.cuda.memory_allocated(dev)
    eager_cache = SlabKVCache(geo, TorchKVAllocator(dev))
    eager_cap = capture_at(model, ids, eager_cache, layer)
    held = torch.cuda.memory_allocated(dev) - before
    with sampler as vs:
        time.sleep(PAUSE_S)  # the pause
    eager = time_cuda(lambda: eager_cap.hidden.data_ptr(), warmup=WARMUP, repeats=REPEATS)
    del eager_cache, eager_cap
    return EagerPause(eager, held, vs.to_dict())


@dataclass
class ResumeAtDepth:
    """Every method's timings at one depth (ms). ``bound_ms`` = max(restored bytes at the same-run pinned ceiling,
    the continuation's compute): what resume-to-next-token is compared with."""

    djinn: TimingStats
    djinn_host: TimingStats
    manual: TimingStats
    manual_loop: TimingStats
    recompute: TimingStats
    eager: EagerPause
    to_next_phases: dict[str, TimingStats]
    compute_phases: dict[str, TimingStats]
    allocator_during_to_next: dict[str, int]
    ceiling: CopyCeiling
    state_bytes: int

    @property
    def to_next(self) -> TimingStats:
        return self.to_next_phases["total"]

    @property
    def compute(self) -> TimingStats:
        return self.compute_phases["total"]

    @property
    def copy_ms(self) -> float:
        return self.state_bytes / (self.ceiling.GBps * 1e9) * 1e3

    @property
    def bound_ms(self) -> float:
        return max(self.copy_ms, self.compute.median_ms)

    def medians(self) -> dict[str, float]:
        return {"djinn_ms": self.djinn.median_ms, "manual_ms": self.manual.median_ms,
                "recompute_ms": self.recompute.median_ms, "eager_ms": self.eager.timing.median_ms,
                "djinn_host_return_ms": self.djinn_host.median_ms, "resume_to_next_token_ms": self.to_next.median_ms,
                "continuation_compute_ms": self.compute.median_ms, "restored_copy_at_ceiling_ms": self.copy_ms,
                "restored_bytes": self.state_bytes, "eager_held_bytes": self.eager.held_bytes,
                "manual_tight_loop_ms": self.manual_loop.median_ms}

    def info(self) -> dict[str, Any]:
        """The medians and every raw timing, for ``claim.info``."""
        return {**self.medians(), "djinn_timing": self.djinn.to_dict(), "djinn_host_timing": self.djinn_host.to_dict(),
                "manual_timing": self.manual.to_dict(), "manual_tight_loop_timing": self.manual_loop.to_dict(),
                "recompute_timing": self.recompute.to_dict(), "eager_timing": self.eager.timing.to_dict(),
                "ceiling": self.ceiling.to_dict(),
                "resume_to_next_token_phases": {k: t.to_dict() for k, t in self.to_next_phases.items()},
                "continuation_compute_phases": {k: t.to_dict() for k, t in self.compute_phases.items()},
                "eager_vram_during_pause": self.eager.vram,
                "torch_allocator_during_resume_to_next_token": self.allocator_during_to_next}


def measure_resume_at_depth(model: Any, rt: Any, ids: torch.Tensor, layer: int, *, new_tokens: int,
                            h2d_ceiling: Callable[[int], CopyCeiling], sampler: VramSampler) -> ResumeAtDepth:
    """Every method at ``layer`` of one session of ``ids`` on ``rt`` (a runtime over ``model``), in order: Djinn's
    restore against the manual copy-back, the manual copy in a tight loop, recompute, eager, resume-to-next-token
    paused and resident, then the pinned host-to-device ceiling (``h2d_ceiling(nbytes)``) on the restored byte
    count."""
    s = rt.open(ids, max_new_tokens=new_tokens)
    ck = s.run_to(layer)
    state_bytes = s.state_bytes()
    hidden = ck.hidden.clone()
    restore = time_restore_against_manual(s, hidden)
    s.close()
    # the manual copy in a tight loop, for reference (warm host, no preceding offload)
    pinned = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True).copy_(hidden.cpu())
    target = torch.empty_like(hidden)
    manual_loop = time_cuda(lambda: target.copy_(pinned, non_blocking=True), warmup=WARMUP, repeats=REPEATS)
    capacity = ids.shape[1] + new_tokens
    recompute = time_recompute(model, ids, layer, capacity)
    eager = eager_pause(model, ids, layer, capacity, sampler)
    alloc0 = allocator_counters()
    to_next = time_resume_to_next_token(rt, ids, layer, pause=True, max_new_tokens=new_tokens)
    allocator = {k: v - alloc0[k] for k, v in allocator_counters().items()}
    compute = time_resume_to_next_token(rt, ids, layer, pause=False, max_new_tokens=new_tokens)
    return ResumeAtDepth(restore["djinn"], restore["djinn_host"], restore["manual"], manual_loop, recompute, eager,
                         to_next, compute, allocator, h2d_ceiling(state_bytes), state_bytes)
