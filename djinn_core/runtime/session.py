"""A breakpoint session: run to layer L, pause to the host, restore, resume from L, generate, fork, close.

* ``run_to(L)`` captures layer L's input (:func:`~djinn_core.runtime.capture.capture_at`) with layers ``0..L-1``
  writing their KV into the session's :class:`~djinn_core.runtime.kv_cache.SlabKVCache`, and packs the hidden state
  and the captured kwargs tensors into one slab allocation, the *head*
  (:class:`~djinn_core.runtime.packing.PackedHead`).
* ``pause()`` swaps the head, then the KV of layers ``0..L-1`` (one item per layer), to the host pool through the
  :class:`~djinn_core.memory.swap.SwapEngine`; their slab memory returns to the slab, fenced by the swap's last copy.
  A KV block shared with a fork is copied to the host too but stays in the slab for its other holders: this
  session only drops its reference, so a pause never allocates slab memory (and an eviction never evicts).
* A resume brings back the head first: into the residency's spare buffer when the size matches, with one copy on
  the current (compute) stream after its waits (:meth:`~djinn_core.memory.swap.SwapEngine.swap_in_into`), else into a
  new allocation with one copy on the in stream that the current stream then waits for
  (:meth:`~djinn_core.memory.swap.SwapEngine.swap_in_now`). The KV copies follow in layer order on the in stream.
  Each restored cache layer carries a one-shot wait on its own copy's event, run inside ``SlabKVLayer.update`` just
  before that layer's K/V are first used, so the restore overlaps the continuation's compute. (The wait is per
  cache, not a hook on the shared model, so two resumed sessions never consume each other's waits.)
* ``resume()`` replays layers ``L..``, the final norm and the LM head; ``generate(n)`` decodes greedily with
  ordinary forwards on the session's cache (on CUDA with the runtime's decode graphs).
* ``fork(n)`` gives n sessions at the same checkpoint, each with its own copy of the head and the KV of layers
  ``0..L-1`` shared copy-on-write.

Which sessions stay in the slab is not decided here: the session asks the runtime's
:class:`~djinn_core.memory.residency.Residency` for memory and reports its uses to it, and is one of its tenants
(``evictable``, ``held``, ``evict``). Streams: compute and device-to-device copies on the current stream of the
model's device; host copies on the swap engine's side streams, ordered by events. Nothing here synchronises.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch

from djinn_core.errors import (AdmissionRefused, CacheCapacityExceeded, CheckpointStateError, SlabExhausted)
from djinn_core.memory.slab import Admission, SlabTensor
from djinn_core.memory.swap import ResidentState, SwappedState
from djinn_core.models import exact_attention
from djinn_core.runtime.capture import breakpoint_module, decode_step, greedy, replay_from
from djinn_core.runtime.checkpoint import RESIDENT_STATES, Checkpoint, SessionState
from djinn_core.runtime.kv_cache import KVBlock, KVGeometry, KVHandle, SlabKVCache
from djinn_core.runtime.packing import HEAD, HIDDEN, Layout, PackedHead, flatten_kwargs, kv_keys, rebuild_kwargs
from djinn_core.trace import timing_event
from djinn_core.validation import check_int

if TYPE_CHECKING:
    from djinn_core.runtime.runtime import BreakpointRuntime

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic collector off for a short critical section (restored as it was, also on error)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _SlabKVAllocator:
    """KV blocks of one session, from the runtime's slab through its residency policy."""

    def __init__(self, runtime: "BreakpointRuntime", session_id: int):
        self.residency = runtime.residency
        self.slab = runtime.slab
        self.session_id = session_id

    def allocate_kv(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> KVHandle:
        return self.residency.allocate(self.session_id, shape, dtype, tag=f"s{self.session_id}.{name}")

    def free_kv(self, handle: KVHandle) -> None:
        if isinstance(handle, SlabTensor) and handle.alive:
            self.slab.free(handle)


class BreakpointSession:
    """One prompt's breakpoint session. Create with :meth:`BreakpointRuntime.open`.

    Life: ``run_to(L)`` -> CHECKPOINT -> [``pause()`` -> PAUSED -> ``restore()`` -> CHECKPOINT]* -> ``resume()``
    -> RUNNING (``generate(n)`` any number of times) -> ``close()``. ``resume()`` also works from PAUSED directly.
    """

    def __init__(self, runtime: "BreakpointRuntime", session_id: int, input_ids: torch.Tensor, max_new_tokens: int):
        self.runtime = runtime
        self.id = session_id
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.state = SessionState.OPEN
        self.layer: int | None = None
        b, s = input_ids.shape
        self.geometry = KVGeometry.for_model(runtime.model.config, batch=b, capacity=s + max_new_tokens,
                                             dtype=runtime.dtype)
        self.cache = SlabKVCache(self.geometry, _SlabKVAllocator(runtime, session_id))
        self._kv = kv_keys(self.geometry.num_layers)  # swap item keys, by layer
        self._head: PackedHead | None = None  # resident checkpoint head (hidden state + layer kwargs)
        self._head_layout: Layout = {}
        self._template: dict[str, Any] = {}
        self._swapped: SwappedState | None = None
        self._checkpoint: Checkpoint | None = None
        self._next_logits: torch.Tensor | None = None  # (batch, vocab) of the last position, not yet consumed
        self.generated: list[torch.Tensor] = []
        self.ready_event: Any = None  # CUDA event: the resumed state is usable by layer L on the current stream
        self._ready_next: Any = None  # the event a restore records as ready_event (created at pause)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _require(self, state: SessionState | tuple[SessionState, ...], what: str) -> None:
        states = state if isinstance(state, tuple) else (state,)
        if self.state not in states:
            raise CheckpointStateError(f"session {self.id} is {self.state.value}; cannot {what} "
                                       f"(needs {' or '.join(s.value for s in states)})")

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    @property
    def hidden_shape(self) -> tuple[int, ...]:
        """(batch, seq, hidden) of the checkpoint's hidden state."""
        return self._head_layout[HIDDEN][2]

    def checkpoint_hidden(self, checkpoint: Checkpoint) -> torch.Tensor:
        """The live hidden state of ``checkpoint`` (a view of the slab; read it again after an allocation)."""
        self._require(SessionState.CHECKPOINT, "read the checkpoint's hidden state")
        if self._checkpoint is not checkpoint:
            raise CheckpointStateError("this checkpoint has been superseded")
        return self._head.view(HIDDEN)

    @property
    def swapped(self) -> SwappedState | None:
        """Its items in the host pool (None when nothing of it is there)."""
        return self._swapped

    # -- as a tenant of the residency policy -----------------------------------------------------------------------
    @property
    def evictable(self) -> bool:
        """Its state is resident (a checkpoint, or decoding), so it may go to the host while no call runs on it."""
        return self.state in RESIDENT_STATES

    def held(self) -> Iterator[tuple[SlabTensor, int]]:
        """The slab allocations it references, each with its reference count (KV blocks shared by forks: > 1)."""
        if self._head is not None:
            yield self._head.buf, 1
        for layer in self.cache.layers:
            block = layer.block
            if block is not None:
                yield block.handle, block.refs

    def evict(self) -> None:
        """Pause (the residency policy evicts this session); allocates no slab memory."""
        self.pause()

    def slab_bytes(self) -> int:
        """Aligned slab bytes of the distinct allocations it references now (shared ones in full)."""
        size = self.runtime.slab.aligned_size
        return sum(size(a.nbytes) for a in {a.alloc_id: a for a, _ in self.held()}.values())

    # -- running to a breakpoint ---------------------------------------------------------------------------------
    @torch.no_grad()
    def run_to(self, layer: int) -> Checkpoint:
        """Prefill the prompt through layers ``0..layer-1`` and stop before ``layer`` (0..num_layers).

        Allocates the KV of layers ``0..layer-1`` first, so no slab allocation happens during compute. Raises
        :class:`InvalidLayer` for a layer out of range and :class:`AdmissionRefused` for a session whose KV could
        never fit in the slab (the session stays OPEN, holding nothing).
        """
        self._require(SessionState.OPEN, "run_to")
        rt = self.runtime
        breakpoint_module(rt.model, layer, rt.parts)  # validates the layer
        block = rt.slab.aligned_size(self.geometry.block_bytes)
        need = block * self.num_layers  # what it holds once resumed (the KV of every layer)
        if need > rt.slab.capacity:  # Admission.NEVER: no eviction can make it fit
            raise AdmissionRefused(f"session {self.id} needs {need} bytes of KV ({self.num_layers} layers x "
                                   f"{block} bytes) but the whole slab holds {rt.slab.capacity} bytes; it can "
                                   "never be admitted")
        try:
            self.cache.allocate(range(layer))
            with exact_attention():
                cap = rt.capture(self.input_ids, self.cache, layer)
            tensors, template = flatten_kwargs(cap.kwargs)
            tensors = {HIDDEN: cap.hidden, **tensors}
            layout, nbytes = PackedHead.plan(tensors)
            head = PackedHead(rt.residency.allocate(self.id, (nbytes,), torch.uint8, tag=f"s{self.id}.head"), layout)
            views = head.views()
            for name, t in tensors.items():
                views[name].copy_(t)  # current stream
        except BaseException:
            self.cache.release()  # nothing held by a session that failed to reach its breakpoint
            self.cache.reset()
            raise
        self._head, self._template, self._head_layout = head, template, layout
        self.layer = layer
        self.state = SessionState.CHECKPOINT
        self._checkpoint = Checkpoint(self)
        rt.residency.touch(self)
        rt.residency.replenish(self.id)
        log.debug("session %d: checkpoint before layer %d", self.id, layer)
        return self._checkpoint

    @property
    def checkpoint(self) -> Checkpoint:
        self._require((SessionState.CHECKPOINT, SessionState.PAUSED), "get its checkpoint")
        assert self._checkpoint is not None
        return self._checkpoint

    # -- pause / restore -----------------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes a pause moves to the host: hidden state, captured kwargs tensors and KV blocks of layers < L."""
        self._require((SessionState.CHECKPOINT, SessionState.PAUSED, SessionState.SWAPPED, SessionState.RUNNING),
                      "size its state")
        if self._swapped is not None:
            return self._swapped.nbytes
        if self.state is SessionState.RUNNING:
            return self.cache.resident_bytes()
        return self._head.nbytes + self.layer * self.geometry.block_bytes

    def pause(self) -> None:
        """Move the session's state to the host pool (async, on the swap engine's out stream); free its slab memory.

        At a checkpoint: the hidden state, the layer kwargs and the KV of layers ``0..L-1`` (state PAUSED). While
        decoding: the KV of every layer written so far (state SWAPPED; ``resume()`` or ``generate()`` brings it
        back). A KV block shared with a fork is copied to the host and kept in the slab for the other sessions.
        Never allocates slab memory, except the residency's spare buffer from memory free at that moment.
        """
        if self.state is SessionState.RUNNING:
            self._swap_out_decoding()
            return
        self._require(SessionState.CHECKPOINT, "pause")
        rt = self.runtime
        self.cache.wait_ready()  # a restored-but-unused KV block may still be arriving
        rt.residency.prepare_spare(self._head.nbytes)  # before this pause frees anything (no fence on it)
        head: dict[Any, SlabTensor] = {HEAD: self._head.buf}
        if rt.head_out == "first":
            self._swap_out(head, range(self.layer))
        else:  # the head's copy after the KV's: the last bytes this pause writes to the host
            self._swap_out({}, range(self.layer), tail=head)
        self._ready_next = timing_event(rt.swap.out_stream)
        self.cache.release(range(self.layer, self.num_layers))  # empty blocks of a restored checkpoint
        self._head = None
        self.state = SessionState.PAUSED
        rt.residency.touch(self)
        log.debug("session %d: paused (%d bytes to host)", self.id, self._swapped.nbytes)

    def _swap_out(self, items: dict[Any, SlabTensor], layers: Iterable[int],
                  tail: dict[Any, SlabTensor] | None = None) -> None:
        """Swap ``items``, the KV blocks of ``layers``, then ``tail``, out, copied in that order; free what this
        session alone holds (fenced by the copies), drop its reference to shared blocks (fenced, kept for their other
        holders)."""
        shared = []
        kv, cache_layers = self._kv, self.cache.layers
        for i in layers:
            block = cache_layers[i].block
            items[kv[i]] = block.handle
            if block.refs > 1:
                shared.append(kv[i])
        if tail:
            items.update(tail)
        self._swapped = self.runtime.swap.swap_out(items, free_source=True, keep=shared)
        for i in layers:
            block = self.cache.detach(i)  # an own block was freed by the swap engine, fenced by its copy
            if block.refs > 1:
                block.release()

    def _swap_out_decoding(self) -> None:
        """Pause between decode steps: every layer's KV block to the host (one item per layer)."""
        self.cache.wait_ready()
        self._swap_out({}, [i for i, layer in enumerate(self.cache.layers) if layer.block is not None])
        self.state = SessionState.SWAPPED
        self.runtime.residency.touch(self)
        log.debug("session %d: swapped out while decoding (%d bytes to host)", self.id, self._swapped.nbytes)

    def _swap_in_decoding(self) -> None:
        """Bring a SWAPPED session's KV back in layer order; each layer waits for its own copy at first use."""
        state = self._swapped
        keys = [k for k in self._kv if k in state.items]
        need = state.slab_bytes()
        self.runtime.residency.make_room(self.id, need)
        self._attach_kv(self.runtime.swap.swap_in(state, order=keys), keys)
        self._swapped = None
        self.state = SessionState.RUNNING
        log.debug("session %d: swapped back in (%d bytes)", self.id, need)

    def restore(self) -> Checkpoint:
        """Bring a paused checkpoint back: the packed head (hidden state and layer kwargs) first, with one copy, then
        the KV of layers ``0..L-1`` in layer order.

        Returns once the current stream waits for the head; ``ready_event`` is recorded there. The KV copies stay in
        flight on the swap engine's in stream; each cache layer waits for its own copy just before its first use.
        Only O(1) host work precedes the head's copy (the room needed was computed at pause). No-op on a resident
        checkpoint.
        """
        if self.state is SessionState.CHECKPOINT:
            return self._checkpoint
        self._require(SessionState.PAUSED, "restore")
        self._restore_head()
        self._restore_kv()
        return self._checkpoint

    def _restore_head(self) -> None:
        """PAUSED -> CHECKPOINT with only the head resident; the KV of layers ``0..L-1`` stays in ``_swapped``
        until :meth:`_restore_kv` (layers ``>= L`` never read it, so a resume runs them first).

        The head lands in the residency's spare buffer when it has the right size -- one copy on the current
        stream after its waits (``swap_in_into``) -- else in a new allocation (``swap_in_now``); either way
        ``ready_event`` is recorded on the current stream right behind the copy."""
        rt = self.runtime
        state = self._swapped
        tracer = rt.tracer
        with _gc_paused():  # no collection between the call and the head's copy: it would sit on the critical path
            tracer.mark("restore.start")
            spare = rt.residency.take_spare(state.items[HEAD].nbytes)
            if spare is not None:  # the head lands in the spare buffer: no allocation before the copy
                head, deps = spare
                self.ready_event = rt.swap.swap_in_into(state, HEAD, head, deps, event=self._ready_next)
            else:
                rt.residency.make_room(self.id, state.slab_bytes((HEAD,)))  # bookkeeping, unless one must be evicted
                tracer.mark("restore.room")
                head, self.ready_event = rt.swap.swap_in_now(state, HEAD, event=self._ready_next)
            self._ready_next = None
            tracer.mark("restore.ready")
        self._head = PackedHead(head, self._head_layout)
        self._swapped = state if state.items else None
        self.state = SessionState.CHECKPOINT
        rt.residency.touch(self)

    def _restore_kv(self, after: Any = None) -> None:
        """Issue the copies of the KV still on the host (layers 0 .. L-1, in the order they went out); each layer
        waits for its own copy at first use."""
        if self._swapped is not None:
            rt = self.runtime
            rt.residency.make_room(self.id, self._swapped.slab_bytes())  # the continuation may have taken it
            self._attach_kv(rt.swap.swap_in(self._swapped, after=after), self._kv[:self.layer])
            self._swapped = None
            rt.tracer.mark("restore.kv_issued")

    def _attach_kv(self, rs: ResidentState, keys: Iterable[Any]) -> None:
        alloc = self.cache.allocator
        for key in keys:
            i = key.index
            self.cache.attach(i, KVBlock(rs.tensors[key], alloc))
            self.cache.layers[i].before_use = (lambda k=key: rs.wait(k))

    # -- resume / generate ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def resume(self) -> torch.Tensor | None:
        """Continue from layer L (restoring first if paused); return full logits of the prompt (batch, seq, vocab).

        Layers ``0..L-1`` are never recomputed. The returned logits' last position gives the first new token.
        On a SWAPPED session (paused or evicted between decode steps) it brings the KV back, layer by layer behind
        events, and returns None; ``generate`` then continues where it stopped.
        """
        rt = self.runtime
        if self.state is SessionState.SWAPPED:
            with rt.residency.in_use(self):
                self._swap_in_decoding()
            return None
        self._require((SessionState.CHECKPOINT, SessionState.PAUSED), "resume")
        if self.layer < self.num_layers:  # a streamed model starts loading layer L now, before the head comes back
            rt.prefetch_layers(self.layer)
        with rt.residency.in_use(self):
            if self.state is SessionState.PAUSED:
                self._restore_head()
            # NOTE: the KV copies of layers < L are issued right behind the head on the in stream, so the link never
            # idles between them; layers L.. never read that KV, so they compute while it streams in. The copies
            # wait only for the work queued before them (``before``); the first decode step waits only for what
            # it uses.
            before = timing_event(device=rt.device)
            self._restore_kv(after=before)
            logits = self._continue()
            self._free_head()
            return logits

    def _continue(self) -> torch.Tensor:
        rt = self.runtime
        self.state = SessionState.RUNNING
        rt.residency.touch(self)
        self.cache.allocate(range(self.layer, self.num_layers))
        parts = rt.parts
        kwargs = (rebuild_kwargs(self._template, self._head.views(), self.cache)
                  if self.layer < parts.num_layers else None)  # none needed past the last layer
        with exact_attention():
            logits = replay_from(rt.model, self.layer, self._head.view(HIDDEN), kwargs, parts)
        self._checkpoint = None
        # a copy, not a view: a view of the last position would keep the whole prompt's logits (seq x vocab, 262 MB
        # at 2048 tokens of a 32000-token fp32 vocabulary) alive until generate, per resumed session
        self._next_logits = logits[:, -1].clone()
        return logits

    def _free_head(self) -> None:
        self.runtime.slab.free(self._head.buf, after=timing_event(device=self.runtime.device))
        self._head = None

    @torch.no_grad()
    def generate(self, n: int, *, return_logits: bool = False):
        """Decode ``n`` greedy tokens after the resumed position; returns token ids (batch, n).

        With ``return_logits`` also the logits that chose each token (batch, n, vocab). Raises
        :class:`~djinn_core.errors.CacheCapacityExceeded` past ``max_new_tokens`` in total.
        """
        if self.state is SessionState.SWAPPED:  # paused or evicted between decode steps: bring the KV back first
            self.resume()
        self._require(SessionState.RUNNING, "generate (resume first)")
        check_int("n", n, 0)
        done = sum(t.shape[1] for t in self.generated)
        if done + n > self.max_new_tokens:
            raise CacheCapacityExceeded(f"session {self.id}: {done} + {n} tokens exceed max_new_tokens="
                                        f"{self.max_new_tokens}")
        rt = self.runtime
        if n == 0:
            empty = torch.empty(self.input_ids.shape[0], 0, dtype=torch.long, device=rt.device)
            vocab = rt.model.config.vocab_size
            return (empty, torch.empty(*empty.shape, vocab, device=rt.device)) if return_logits else empty
        logits = self._next_logits
        with rt.residency.in_use(self), exact_attention(), rt.decode_graphs():
            if self.generated:  # the last token chosen earlier has not been fed yet
                logits = decode_step(rt.model, self.cache, self.generated[-1][:, -1:])
            tokens, steps = greedy(rt.model, self.cache, logits, n)
        self.generated.append(tokens)
        self._next_logits = None
        return (tokens, steps) if return_logits else tokens

    # -- fork / close --------------------------------------------------------------------------------------------
    def fork(self, n: int) -> list["BreakpointSession"]:
        """``n`` new sessions at this checkpoint (restored first if paused): own head, KV of layers ``0..L-1``
        shared copy-on-write. Each can be edited, paused, resumed and closed independently.

        All or nothing: the n children are resident together next to this checkpoint when it returns.
        :class:`AdmissionRefused` (nothing done) when that can never fit in the slab; :class:`SlabExhausted`
        (nothing evicted) when it cannot fit now, even after evicting every idle session; after any error no child
        is left behind.
        """
        check_int("n", n, 1)
        self._require((SessionState.CHECKPOINT, SessionState.PAUSED), "fork")
        rt, res = self.runtime, self.runtime.residency
        head_bytes = self._head.nbytes if self._head is not None else self._swapped.items[HEAD].nbytes
        heads = n * rt.slab.aligned_size(head_bytes)
        mine = self.slab_bytes() if self._swapped is None else self._swapped.slab_bytes() + self.slab_bytes()
        if mine + heads > rt.slab.capacity:
            raise AdmissionRefused(f"fork({n}) of session {self.id} needs {heads} bytes for {n} heads of "
                                   f"{head_bytes} bytes next to the {mine} bytes of its checkpoint, but the whole "
                                   f"slab holds {rt.slab.capacity} bytes; it can never be admitted")
        with res.in_use(self):  # the children's allocations never evict their parent
            self.restore()
            self.cache.wait_ready()  # the children read these blocks on the current stream
            if res.admit(heads, protect=(self.id,)) is not Admission.OK:
                st = rt.slab.stats
                raise SlabExhausted(heads, st.free, st.capacity,
                                    f"fork({n}) of session {self.id} needs {heads} slab bytes for its children's "
                                    f"heads: {st.free} of {st.capacity} are free and the rest is held by sessions "
                                    "in use (admission LATER); nothing was evicted")
            children: list[BreakpointSession] = []
            with contextlib.ExitStack() as in_use:
                try:
                    for _ in range(n):
                        child = rt.open_like(self)
                        children.append(child)
                        in_use.enter_context(res.in_use(child))  # never evicted while its siblings are made
                        child._become_fork_of(self)
                except BaseException:
                    for child in children:
                        child.close()
                    raise
            return children

    def _become_fork_of(self, parent: "BreakpointSession") -> None:
        buf = self.runtime.residency.allocate(self.id, (parent._head.nbytes,), torch.uint8, tag=f"s{self.id}.head")
        buf.view().copy_(parent._head.buf.view())  # current stream
        self._head = PackedHead(buf, parent._head_layout)
        self.cache.share_prefix(parent.cache, range(parent.layer))
        self._template, self._head_layout = dict(parent._template), parent._head_layout
        self.layer = parent.layer
        self.state = SessionState.CHECKPOINT
        self._checkpoint = Checkpoint(self)

    def close(self) -> None:
        """Release everything the session holds (slab blocks, host blocks). Idempotent."""
        if self.state is SessionState.CLOSED:
            return
        if self._swapped is not None:
            self.runtime.swap.release(self._swapped)
            self._swapped = None
        if self._head is not None:
            self._free_head()
        self.cache.release()
        self.state = SessionState.CLOSED
        self._checkpoint = None
        self.runtime.forget(self)

    def __repr__(self) -> str:
        return f"BreakpointSession(id={self.id}, state={self.state.value}, layer={self.layer})"
