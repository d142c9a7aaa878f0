"""The breakpoint runtime: one model, its sessions, and the memory they live in (slab, host pool, swap engine,
residency policy)."""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any, Iterator

import torch
from torch import nn

from djinn_core.errors import ConfigError, UnknownSession
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.residency import EvictionPolicy, Residency
from djinn_core.memory.slab import Slab
from djinn_core.memory.swap import SwapEngine
from djinn_core.runtime.capture import Captured, capture_at, model_parts
from djinn_core.runtime.checkpoint import RESIDENT_STATES, SessionState
from djinn_core.runtime.decode_graphs import DecodeGraphs
from djinn_core.runtime.session import BreakpointSession
from djinn_core.trace import Tracer
from djinn_core.validation import check_int

log = logging.getLogger(__name__)

DEFAULT_HEADROOM_BYTES = 4 << 30  # device memory left outside the slab for activations (default sizing only)
DEFAULT_CPU_SLAB_BYTES = 256 << 20


class BreakpointRuntime:
    """Breakpoint sessions over one causal LM, with their state in a slab and a host pool.

    Args:
        model: a Hugging Face causal LM of a known family (:func:`djinn_core.models.family_of`; Llama, Mistral,
            Qwen2), in eval mode, on a CUDA device or the CPU.
        slab: the device slab for session state; default ``slab_bytes`` bytes, or half the free device memory
            (leaving ``DEFAULT_HEADROOM_BYTES``); on the CPU, 256 MiB.
        host_pool: the host pool paused sessions live in; default as large as the slab (pinned on CUDA).
        slab_bytes: slab size in bytes when ``slab`` is not given.
        swap: a SwapEngine over ``slab`` and ``host_pool`` (default: a new one).
        trace: record restore phases into :attr:`tracer` (off: no cost).
        free_target_bytes: 0 (default): evict idle sessions only when an allocation or a restore does not fit.
            > 0: also, after every call on a session, evict idle sessions until this many slab bytes are free, with
            the eviction's copies ordered after the restores already in flight -- so the next restore of up to
            ``free_target_bytes`` finds its room ready, shares the host link with no eviction, and no eviction sits
            on its critical path. One session's state is the natural value.
        eviction: the policy that picks eviction victims (default :class:`~djinn_core.memory.residency.LRU`).
        decode_graphs: replay each decoder layer's decode step but its attention as CUDA graphs during
            ``generate`` (two per layer where the model family knows how the layer splits, else its norms, MLP and
            rotary embedding; bitwise equal to eager; see :mod:`djinn_core.runtime.decode_graphs`). On by default
            on CUDA; the graphs are shared by every runtime over the same model.
        head_out: where a pause copies the checkpoint's head (hidden state and layer kwargs) among its copies to the
            host: ``"first"`` (default: a restore soon after the pause waits only for the head's copy) or ``"last"``
            (after the KV: the head is the last thing the pause writes to the host before the restore reads it
            back). Results are bitwise the same either way.
    """

    HEAD_OUT = ("first", "last")

    def __init__(self, model: nn.Module, *, slab: Slab | None = None, host_pool: HostPool | None = None,
                 slab_bytes: int | None = None, swap: SwapEngine | None = None, trace: bool = False,
                 free_target_bytes: int = 0, eviction: EvictionPolicy | None = None, decode_graphs: bool = True,
                 head_out: str = "first"):
        if head_out not in self.HEAD_OUT:
            raise ConfigError(f"head_out must be one of {self.HEAD_OUT}, got {head_out!r}")
        self.head_out = head_out
        self.parts = model_parts(model)  # checked once: the layers, norm and head every replay runs
        self.layers = self.parts.layers
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if slab is None:
            if slab_bytes is not None:
                slab = Slab(check_int("slab_bytes", slab_bytes, 1), self.device)
            elif self.device.type == "cuda":
                slab = Slab.from_free_memory(0.5, DEFAULT_HEADROOM_BYTES, self.device)
            else:
                slab = Slab(DEFAULT_CPU_SLAB_BYTES, self.device)
        if slab.device != self.device:
            raise ConfigError(f"slab on {slab.device}, model on {self.device}")
        self.slab = slab
        if swap is None:
            host_pool = host_pool or HostPool(slab.capacity, segment_bytes=min(1 << 30, max(slab.capacity, 256)))
            swap = SwapEngine(slab, host_pool)
        elif swap.slab is not slab:
            raise ConfigError("swap must be a SwapEngine over the runtime's slab")
        self.swap = swap
        self.host_pool = swap.host_pool
        self.residency = Residency(slab, policy=eviction, free_target_bytes=free_target_bytes,
                                   before_evict=swap.order_out_after_in)
        self.tracer = Tracer(enabled=trace, device=self.device)
        self.sessions: dict[int, BreakpointSession] = {}
        self._ids = itertools.count(1)
        self.graphs = DecodeGraphs.for_model(model) if decode_graphs and self.device.type == "cuda" else None

    # -- sessions --------------------------------------------------------------------------------------------------
    def open(self, input_ids: torch.Tensor, *, max_new_tokens: int = 64) -> BreakpointSession:
        """A new session over ``input_ids`` (batch, seq) of token ids in ``0..vocab_size-1``; KV capacity
        ``seq + max_new_tokens``. ConfigError for anything else (nothing is opened)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ConfigError("input_ids must be a (batch, seq) torch.long tensor")
        if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ConfigError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
        check_int("max_new_tokens", max_new_tokens, 0)
        vocab = self.model.config.vocab_size
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= vocab:
            raise ConfigError(f"token ids must be in 0..{vocab - 1} (the model's vocabulary), got ids in {lo}..{hi}")
        return self._new_session(input_ids.to(self.device), max_new_tokens)

    def open_like(self, session: BreakpointSession) -> BreakpointSession:
        """A new OPEN session over the same prompt and KV capacity as ``session`` (a fork's start)."""
        return self._new_session(session.input_ids, session.max_new_tokens)

    def _new_session(self, input_ids: torch.Tensor, max_new_tokens: int) -> BreakpointSession:
        sid = next(self._ids)
        s = BreakpointSession(self, sid, input_ids, max_new_tokens)
        self.sessions[sid] = s
        return s

    def session(self, session_id: int) -> BreakpointSession:
        """The open session ``session_id``; :class:`UnknownSession` if never opened or closed."""
        try:
            return self.sessions[session_id]
        except (KeyError, TypeError):
            raise UnknownSession(f"no open breakpoint session {session_id!r}") from None

    def close(self, session_id: int) -> None:
        self.session(session_id).close()

    def close_all(self) -> None:
        for s in list(self.sessions.values()):
            s.close()
        self.residency.drop_spare()

    def forget(self, session: BreakpointSession) -> None:
        """Called by a session as it closes: the runtime and its residency policy no longer know it."""
        self.residency.forget(session)
        self.sessions.pop(session.id, None)

    def __iter__(self) -> Iterator[BreakpointSession]:
        return iter(list(self.sessions.values()))

    # -- memory ----------------------------------------------------------------------------------------------------
    @property
    def evictions(self) -> int:
        """Sessions evicted to the host so far (by the residency policy, not by a user's pause)."""
        return self.residency.evictions

    @property
    def spare_bytes(self) -> int:
        """Slab bytes held by the residency's spare head buffer (0 or one paused head's size), not by a session."""
        return self.residency.spare_bytes

    def check_invariants(self) -> None:
        """Raise AssertionError unless the memory accounting balances: the slab holds exactly the live sessions'
        allocations (each counted once, shared KV blocks referenced as often as their count says) plus the spare
        buffer; the host pool holds exactly the paused sessions' items; the residency policy's idle list is the
        resident sessions, and no call is in flight. For tests and after errors; costs a walk over every session."""
        slab = self.slab
        slab.bookkeeper.check_invariants()
        self.host_pool.check_invariants()
        held: dict[int, list] = {}  # alloc_id -> [tensor, refs, holders]
        for s in self.sessions.values():
            assert s.state is not SessionState.CLOSED, f"closed session {s.id} still registered"
            for a, refs in s.held():
                assert a.alive, f"session {s.id} holds freed allocation {a!r}"
                h = held.setdefault(a.alloc_id, [a, refs, 0])
                h[2] += 1
        for a, refs, holders in held.values():
            assert holders == refs, f"{a!r} has {refs} references but {holders} holders"
        live = {t.alloc_id for t in slab.tensors()}
        spare = self.residency.spare
        owned = set(held) | ({spare.alloc_id} if spare is not None else set())
        assert live == owned, f"slab allocations held by no session: {sorted(live - owned)}; " \
                              f"held but not live: {sorted(owned - live)}"
        assert slab.stats.used == sum(slab.aligned_size(a.nbytes) for a, _, _ in held.values()) + self.spare_bytes
        swapped = sum(self.host_pool.aligned_size(it.nbytes) for s in self.sessions.values()
                      if s.swapped is not None for it in s.swapped.items.values())
        assert self.host_pool.stats.used == swapped, (self.host_pool.stats.used, swapped)
        resident = {s.id for s in self.sessions.values() if s.state in RESIDENT_STATES}
        assert set(self.residency.idle) == resident, (self.residency.idle, resident)
        assert not self.residency.busy, f"sessions still marked in a call: {self.residency.busy}"

    # -- hot-path helpers --------------------------------------------------------------------------------------------
    def capture(self, input_ids: torch.Tensor, cache: Any, layer: int) -> Captured:
        """Prefill ``input_ids`` into ``cache`` through layers ``0..layer-1`` and capture layer ``layer``'s input (a
        session's ``run_to``). A seam: a streamed runtime also bounds the weight loads to those layers."""
        return capture_at(self.model, input_ids, cache, layer, self.parts)

    def prefetch_layers(self, start: int) -> None:
        """A forward from decoder layer ``start`` comes next (a resume): a seam where a streamed runtime starts
        bringing those layers' weights in while the session is being readied. Resident weights: nothing to do."""

    def decode_graphs(self) -> contextlib.AbstractContextManager:
        """The decode graphs' context (a no-op without them)."""
        return self.graphs.active() if self.graphs is not None else contextlib.nullcontext()
