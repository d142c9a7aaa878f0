"""exp4, breakpoint sessions over a streamed model (issue 21): the 48-layer Llama-2-70B architecture streamed under a
24 GiB VRAM budget, with its ring, session slab and activations split by
:class:`~djinn_core.streaming.budget_split.RingFirstSplit`.

An edit at layer L costs only what follows it: a session's edit -> logits streams layers ``L..n-1`` and computes
them, so its time is bounded by ``max(bytes of layers L.. / same-run pinned ceiling, their compute)``. It is measured
against two ways to get the same logits on the same streamed model:

* **recompute from 0**: a fresh session each time (``run_to(L)``, the edit, ``resume()``): every layer streams;
* **nnsight-style**: one whole forward with the edit applied by a forward pre-hook on layer L -- what nnsight's
  ``trace`` runs (its logits are bitwise those of a plain hook, ``PEERS.md``).

Used by the claims in ``tests_exp2/test_exp4_streamed_sessions.py`` (h100) and by their CPU plumbing versions alike.
"""

from __future__ import annotations

import logging
import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from transformers import DynamicCache

from djinn_core.bench.experiments.exp2_streaming import (ARCH, DEVICE_OVERHEAD_MARGIN, SEED, free_device_memory,
                                                         nvml_used_bytes)
from djinn_core.bench.timing import TimingStats, back_to_back, time_cuda, time_host
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.vram_budget import allocator_limit
from djinn_core.models import build_model, exact_attention
from djinn_core.runtime import BreakpointSession, plain_run
from djinn_core.runtime.streamed import StreamedBreakpointRuntime
from djinn_core.streaming import StreamedModel, StreamingPolicy, WeightPack, place_resident_
from djinn_core.streaming.budget_split import RingFirstSplit

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
LAYERS = 48  # the exp2 host pack: 48 distinct 70B layers (~77 GiB pinned)
BUDGET_BYTES = 24 * GiB  # ring + resident modules + session slab + activations + CUDA context
RING_SLOTS = 4
EDIT_LAYERS = (1, 24, 47)
PROMPT_TOKENS = 512
NEW_TOKENS = 64  # greedy tokens of the bitwise claims
CHUNK_BYTES = 64 * MiB
HOST_POOL_BYTES = 2 * GiB  # paused sessions' state (pinned on CUDA); the weight pack is pinned apart
EDIT_BOUND = 1.1  # edit -> logits <= 1.1 x max(transfer of layers L.. at the ceiling, their compute)
BATCH_KS = (1, 8, 32, 64)  # sessions per batched decode step
BATCH_CONTEXT = 512  # prompt tokens of the batched sessions (the 2026-11-30 anchor's context)
BATCH_BOUND = 0.9  # tokens/s >= 0.9 x k x ceiling / streamed bytes while the pass is copy-bound
BATCH_PEER_BOUND = 1.2  # at every k, Djinn's batched decode >= 1.2x DeepSpeed ZeRO-Inference's tokens/s, same model
BATCH_WINDOW = 4  # back-to-back decode steps per timed sample (aggregate tokens/s of a decode loop)


def steering_vector(hidden_size: int, device: torch.device | str, dtype: torch.dtype, scale: float = 4.0
                    ) -> torch.Tensor:
    """A fixed random direction (seed 5) added to the hidden state at the breakpoint."""
    v = torch.randn(hidden_size, generator=torch.Generator().manual_seed(5)) * scale
    return v.to(device=device, dtype=dtype)


@contextmanager
def streamed_runtime(
    pack: WeightPack,
    device: torch.device,
    *,
    num_layers: int = LAYERS,
    budget_bytes: int = BUDGET_BYTES,
    ring_slots: int = RING_SLOTS,
    session_tokens: int = PROMPT_TOKENS + NEW_TOKENS,
    chunk_bytes: int = CHUNK_BYTES,
    host_pool_bytes: int = HOST_POOL_BYTES,
    record_timeline: bool = False,
    arch: str = ARCH,
    dtype: torch.dtype = torch.float16,
    activation_headroom_bytes: int | None = None,
    decode_batch: int = 1,
) -> Iterator[StreamedBreakpointRuntime]:
    """Breakpoint sessions over a fresh ``arch`` model of ``num_layers`` streamed from ``pack`` (layer i <- set
    i % pack.num_sets), under ``budget_bytes`` split by :class:`RingFirstSplit` (its activation headroom sized
    for batched decode steps of up to ``decode_batch`` sessions). On CUDA the split counts the
    memory the device already uses outside torch's allocator (the context) plus a margin, and torch's allocator is
    capped at the rest for the duration."""
    free_device_memory()
    cuda = device.type == "cuda"
    overhead = nvml_used_bytes(device) - torch.cuda.memory_reserved(device) + DEVICE_OVERHEAD_MARGIN if cuda else 0
    model = build_model(arch, num_layers=num_layers, dtype=dtype, materialize=False)
    split = RingFirstSplit(ring_slots=ring_slots, session_tokens=session_tokens, prefill_tokens=session_tokens,
                           activation_headroom_bytes=activation_headroom_bytes, decode_batch=decode_batch,
                           device_overhead_bytes=overhead)
    plan = split.split(model, budget_bytes, fused_attention=cuda)
    sm = rt = None
    with allocator_limit(budget_bytes - overhead + DEVICE_OVERHEAD_MARGIN, device):
        try:
            place_resident_(model, device, seed=SEED)
            policy = StreamingPolicy(chunk_bytes=min(chunk_bytes, plan.ring_bytes), ring_bytes=plan.ring_bytes)
            sm = StreamedModel(model, pack, policy, device=device, budget=plan, record_timeline=record_timeline,
                               layer_sets=[i % pack.num_sets for i in range(num_layers)])
            host_pool = HostPool(host_pool_bytes, segment_bytes=min(GiB, host_pool_bytes), pin=cuda)
            rt = StreamedBreakpointRuntime(sm, plan, host_pool=host_pool)
            yield rt
        finally:
            if rt is not None:
                rt.close_all()
            if sm is not None:
                sm.remove()
            del rt, sm, model
            free_device_memory()


def median_GBps(ceilings: list[Any]) -> float:
    """The median of same-run copy ceilings (GB/s); NaN without any (a CPU run)."""
    return statistics.median(c.GBps for c in ceilings) if ceilings else float("nan")


def _timer(device: torch.device) -> Callable[..., TimingStats]:
    return time_cuda if device.type == "cuda" else time_host


@dataclass
class EditCosts:
    """Edit -> logits at one layer, by three methods on one streamed model (ms), with what a resume streamed."""

    layer: int
    djinn: TimingStats  # edit a resident checkpoint at L, resume: layers L.. stream
    recompute: TimingStats  # a fresh session: run_to(L), edit, resume: every layer streams
    whole_forward: TimingStats  # one forward with the edit as a pre-hook on layer L (nnsight-style)
    resume_bytes: list[int]  # bytes streamed by each djinn edit -> logits (warm-up included)
    layer_bytes: int  # bytes streamed per layer
    compute_ms: float  # compute of layers L.. in one djinn resume (per-layer event marks; NaN without a timeline)
    ceilings: list[Any]  # pinned copy ceilings measured before each method's runs (CopyCeiling)

    @property
    def ceiling_GBps(self) -> float:
        return median_GBps(self.ceilings)

    @property
    def transfer_ms(self) -> float:
        """The bytes of layers L.. at the same-run ceiling (ms)."""
        return self.streamed_bytes / (self.ceiling_GBps * 1e9) * 1e3

    @property
    def streamed_bytes(self) -> int:
        """Bytes of layers L.. (what one djinn edit -> logits must move)."""
        return self.resume_bytes[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "djinn": self.djinn.to_dict(), "recompute_from_0": self.recompute.to_dict(),
                "nnsight_style_whole_forward": self.whole_forward.to_dict(), "resume_bytes": self.resume_bytes,
                "layer_bytes": self.layer_bytes, "compute_ms": self.compute_ms, "ceiling_GBps": self.ceiling_GBps,
                "ceilings_GBps": [c.GBps for c in self.ceilings]}


def measure_edit_costs(rt: StreamedBreakpointRuntime, ids: torch.Tensor, layer: int, edit: Callable, *,
                       warmup: int = 1, repeats: int = 5, ceiling: Callable[[], Any] | None = None) -> EditCosts:
    """Edit -> full prompt logits at ``layer`` by the three methods, each timed ``repeats`` times after ``warmup``
    (CUDA events on the current stream on a GPU, the host clock on a CPU), with ``ceiling()`` measured before
    each method's runs. The djinn runs fork a resident checkpoint at ``layer`` untimed before each run."""
    timer = _timer(rt.device)
    sm = rt.streamed
    parent = rt.open(ids, max_new_tokens=1)
    parent.run_to(layer)
    box: dict[str, Any] = {}
    resume_bytes: list[int] = []
    ceilings: list[Any] = []

    def fork() -> None:
        _close(box.pop("s", None))
        box["s"] = parent.fork(1)[0]
        box["b"] = sm.bytes_streamed

    def djinn() -> None:
        s = box["s"]
        s.checkpoint.edit(edit)
        s.resume()
        resume_bytes.append(sm.bytes_streamed - box["b"])

    def fresh() -> None:
        _close(box.pop("s", None))
        box["s"] = rt.open(ids, max_new_tokens=1)

    def recompute() -> None:
        s = box["s"]
        s.run_to(layer).edit(edit)
        s.resume()

    target = rt.parts.norm if layer == rt.parts.num_layers else rt.parts.layers[layer]

    def whole_forward() -> None:
        def hook(module: Any, args: tuple, kwargs: dict):
            return (edit(args[0]), *args[1:]), kwargs

        handle = target.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad(), exact_attention():  # the kernels a session's resume runs under
                rt.model(ids, use_cache=False)
        finally:
            handle.remove()

    runs = {}
    for name, fn, before in (("djinn", djinn, fork), ("recompute", recompute, fresh),
                             ("whole_forward", whole_forward, None)):
        if ceiling is not None:
            ceilings.append(ceiling())
        runs[name] = timer(fn, warmup=warmup, repeats=repeats, before=before)
        if name == "djinn":
            compute = _compute_ms(sm, layer)
    _close(box.pop("s", None))
    parent.close()
    return EditCosts(layer, runs["djinn"], runs["recompute"], runs["whole_forward"], resume_bytes,
                     sm.layout.used_bytes, compute, ceilings)


@dataclass
class BatchRun:
    """Batched decode steps of ``k`` sessions over one streamed model (item 3 of issue 21)."""

    k: int
    step: TimingStats  # one decode_batch step of all k sessions (ms)
    bytes_per_step: int  # weight bytes streamed per step (counted by the streamed model)
    compute_ms: float  # compute of every layer in the last step (per-layer marks; NaN without a timeline)
    ceilings: list[Any]  # pinned copy ceilings measured before the steps
    lengths: list[int]  # the sessions' KV lengths at the first timed step (they differ: staggered joins)

    @property
    def ceiling_GBps(self) -> float:
        return median_GBps(self.ceilings)

    @property
    def transfer_ms(self) -> float:
        return self.bytes_per_step / (self.ceiling_GBps * 1e9) * 1e3

    @property
    def tokens_per_s(self) -> float:
        return self.k / (self.step.median_ms * 1e-3)

    @property
    def copy_bound_tokens_per_s(self) -> float:
        """k x ceiling / streamed bytes: the rate if every step took exactly its weight transfer."""
        return self.k * self.ceiling_GBps * 1e9 / self.bytes_per_step

    @property
    def copy_bound(self) -> bool:
        """The pass is copy-bound: its compute is shorter than its transfer at the ceiling."""
        return self.compute_ms < self.transfer_ms

    @property
    def weight_GBps(self) -> float:
        """Weight bytes streamed per step over the step's median: what a peer streaming another depth compares to."""
        return self.bytes_per_step / (self.step.median_ms * 1e-3) / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "step": self.step.to_dict(), "bytes_per_step": self.bytes_per_step,
                "compute_ms": self.compute_ms, "transfer_ms": self.transfer_ms, "ceiling_GBps": self.ceiling_GBps,
                "tokens_per_s": self.tokens_per_s, "copy_bound_tokens_per_s": self.copy_bound_tokens_per_s,
                "copy_bound": self.copy_bound, "weight_GBps": self.weight_GBps, "lengths": self.lengths}


@dataclass
class PeerBatchRun:
    """A peer's decode steps of one equal-length batch of ``k`` prompts (plain Hugging Face forwards over a
    ``DynamicCache``, the peer moving the weights), to compare with :class:`BatchRun` at the same k."""

    peer: str
    k: int
    step: TimingStats  # one decode step of the whole batch (ms)
    bytes_per_step: int  # the parameter bytes the peer brings to the GPU for each forward
    layers: int

    @property
    def tokens_per_s(self) -> float:
        return self.k / (self.step.median_ms * 1e-3)

    @property
    def weight_GBps(self) -> float:
        return self.bytes_per_step / (self.step.median_ms * 1e-3) / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {"peer": self.peer, "k": self.k, "step": self.step.to_dict(), "bytes_per_step": self.bytes_per_step,
                "layers": self.layers, "tokens_per_s": self.tokens_per_s, "weight_GBps": self.weight_GBps}


def measure_peer_batched_decode(module: Any, k: int, *, peer: str, bytes_per_step: int, device: torch.device | str,
                                context: int = BATCH_CONTEXT, steps: int = 3, warmup: int = 1,
                                window: int = BATCH_WINDOW, seed: int = 1) -> PeerBatchRun:
    """``k`` seeded prompts of ``context`` tokens prefilled as one batch (untimed), then ``steps`` timed windows of
    ``window`` back-to-back greedy decode steps after ``warmup`` untimed ones, timed as Djinn's
    (:func:`~djinn_core.bench.experiments.scaleout.time_decode_steps`). ``bytes_per_step``: the model's parameter
    bytes, counted before the peer took them over (ZeRO-3 empties the module's tensors)."""
    from djinn_core.bench.experiments.scaleout import time_decode_steps

    cfg = module.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (k, context), generator=g).to(device)
    timing = time_decode_steps(module, ids, steps=steps, warmup=warmup, window=window)
    return PeerBatchRun(peer, k, timing, bytes_per_step, cfg.num_hidden_layers)


@torch.no_grad()
def batched_divergence(model: Any, prompts: list[torch.Tensor], steps: int) -> list[dict[str, Any]]:
    """Where batched decode first departs from each session decoded alone (recorded, never claimed: a batch of k rows
    and its padding change GEMM and attention shapes, so the kernels differ). Each prompt (batch 1, lengths may
    differ) is prefilled alone; then ``steps`` batched steps of all of them (:func:`padded_step_reference`, the
    protocol of :func:`~djinn_core.runtime.batch.decode_batch`) against :func:`~djinn_core.runtime.plain_run` of each
    alone. Per session: its prompt length, the first step whose logits differ bitwise and the first whose token
    differs (None: never within ``steps``), and the largest absolute logit difference."""
    sessions = [PlainSession(model, ids) for ids in prompts]
    chose: list[list[torch.Tensor]] = [[] for _ in sessions]
    for _ in range(steps):
        _, step_logits = padded_step_reference(model, sessions)
        for i, lg in enumerate(step_logits):
            chose[i].append(lg)
    out = []
    for i, (ids, s) in enumerate(zip(prompts, sessions)):
        _, tokens, solo_logits = plain_run(model, ids, steps)
        batched_tokens = torch.cat(s.generated, dim=1)
        batched_logits = torch.stack([lg[0] for lg in chose[i]])  # (steps, vocab)
        solo = solo_logits[0].to(batched_logits.dtype)
        logits_equal = [torch.equal(batched_logits[t], solo[t]) for t in range(steps)]
        tokens_equal = [int(batched_tokens[0, t]) == int(tokens[0, t]) for t in range(steps)]
        out.append({"session": i, "prompt_tokens": ids.shape[1],
                    "first_step_logits_differ": next((t for t, eq in enumerate(logits_equal) if not eq), None),
                    "first_step_token_differs": next((t for t, eq in enumerate(tokens_equal) if not eq), None),
                    "max_abs_logit_difference": float((batched_logits.float() - solo.float()).abs().max())})
    return out


def measure_batched_decode(rt: StreamedBreakpointRuntime, ids: torch.Tensor, k: int, *, warmup: int = 1,
                           repeats: int = 3, window: int = BATCH_WINDOW, stagger: int = 4,
                           ceiling: Callable[[], Any] | None = None) -> BatchRun:
    """``k`` sessions forked from one prompt checkpointed at the last layer (so their resumes stream nothing), joining
    the batch over ``stagger`` steps (session ``i`` at step ``i % stagger``: lengths differ), then ``repeats`` timed
    windows of ``window`` back-to-back :func:`~djinn_core.runtime.batch.decode_batch` steps of all k after
    ``warmup`` untimed ones, as a decode loop runs them (each step queued behind the running one); the step's time is
    its window's over ``window``. All sessions are closed after."""
    from djinn_core.runtime.batch import decode_batch

    sm = rt.streamed
    steps = (warmup + repeats) * window
    parent = rt.open(ids, max_new_tokens=stagger + steps + 1)
    parent.run_to(rt.parts.num_layers)
    children = parent.fork(k)
    parent.close()
    try:
        for c in children:
            c.resume()
        for step in range(stagger):
            decode_batch(rt, [c for i, c in enumerate(children) if i % stagger <= step])
        lengths = [c.cache.layers[0].length for c in children]
        ceilings = [ceiling()] if ceiling is not None else []
        before = sm.bytes_streamed
        timing = _timer(rt.device)(back_to_back(lambda: decode_batch(rt, children), window), warmup=warmup,
                                   repeats=repeats).per(window)
        per_step = (sm.bytes_streamed - before) // steps
        if ceiling is not None:
            ceilings.append(ceiling())
        return BatchRun(k, timing, per_step, _compute_ms(sm, 0), ceilings, lengths)
    finally:
        for c in children:
            c.close()


def _close(s: BreakpointSession | None) -> None:
    if s is not None:
        s.close()


def _compute_ms(sm: StreamedModel, layer: int) -> float:
    """Compute time of layers ``layer..`` in the last complete pass (per-layer marks; NaN without a timeline)."""
    if not sm.record_timeline:
        return float("nan")
    rows = [r for r in sm.read_timeline() if r["layer"] >= layer and r["compute_end_ms"] is not None]
    return sum(r["compute_end_ms"] - r["compute_start_ms"] for r in rows)


@torch.no_grad()
def session_run(rt: StreamedBreakpointRuntime, ids: torch.Tensor, layer: int, edit: Callable | None,
                new_tokens: int, *, fork: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A session paused at ``layer``, swapped to the host and resumed (through a fork of it with ``fork``), edited,
    decoding ``new_tokens`` greedily: (prompt logits, tokens, step logits), on the CPU."""
    s = rt.open(ids, max_new_tokens=new_tokens)
    s.run_to(layer)
    s.pause()
    run = s
    if fork:
        run = s.fork(1)[0]
        s.close()
    if edit is not None:
        run.restore().edit(edit)
        run.pause()
    logits = run.resume()
    tokens, steps = run.generate(new_tokens, return_logits=True)
    run.close()
    return logits.cpu(), tokens.cpu(), steps.cpu()


@torch.no_grad()
def resident_reference(model: Any, ids: torch.Tensor, layer: int, edit: Callable | None, new_tokens: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same through plain Hugging Face forwards on a resident model (:func:`plain_run`), on the CPU."""
    logits, tokens, steps = plain_run(model, ids, new_tokens, layer=layer, edit=edit)
    return logits.cpu(), tokens.cpu(), steps.cpu()


class PlainSession:
    """The reference of one session in a batch: prefilled alone by plain Hugging Face forwards (:func:`plain_run`,
    with the same edit as a pre-hook at ``layer``), its K/V per layer kept as plain tensors (batch 1). With
    ``keep_prompt_logits`` the prompt's logits stay too, on the CPU (``prompt_logits``)."""

    def __init__(self, model: Any, ids: torch.Tensor, layer: int | None = None, edit: Callable | None = None, *,
                 keep_prompt_logits: bool = False):
        cache = DynamicCache(config=model.config)
        with exact_attention():
            logits = plain_run(model, ids, 0, cache=cache, layer=layer, edit=edit)[0]
        self.kv = [[lay.keys, lay.values] for lay in cache.layers]  # (1, kv_heads, length, head_dim) each
        self.next_logits: torch.Tensor | None = logits[:, -1].clone()  # not a view that keeps every position
        self.prompt_logits = logits.cpu() if keep_prompt_logits else None
        self.generated: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        return self.kv[0][0].shape[2]


@torch.no_grad()
def padded_step_reference(model: Any, sessions: list[PlainSession]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One batched greedy step by a plain forward: the same protocol as :func:`~djinn_core.runtime.batch.decode_batch`
    (a session with unconsumed prefill logits takes its token from them; the others feed their last token), over a
    ``DynamicCache`` holding the fed sessions' K/V left-padded with zeros, a 2-D padding mask and each session's
    length as its position id. Returns (tokens, the logits that chose them), one (1, ...) tensor per session."""
    from djinn_core.runtime.batch import padding_mask

    tokens: list[Any] = [None] * len(sessions)
    chose: list[Any] = [None] * len(sessions)
    fed = [i for i, s in enumerate(sessions) if s.next_logits is None]
    for i, s in enumerate(sessions):
        if s.next_logits is not None:
            chose[i], tokens[i], s.next_logits = s.next_logits, s.next_logits.argmax(-1, keepdim=True), None
    if fed:
        members = [sessions[i] for i in fed]
        lengths = [s.length for s in members]
        past = max(lengths)
        cache = DynamicCache(config=model.config)
        for j in range(len(members[0].kv)):
            _, kvh, _, hd = members[0].kv[j][0].shape
            keys = members[0].kv[j][0].new_zeros((len(members), kvh, past, hd))
            values = torch.zeros_like(keys)
            for row, s in enumerate(members):
                keys[row, :, past - s.length:] = s.kv[j][0][0]
                values[row, :, past - s.length:] = s.kv[j][1][0]
            cache.update(keys, values, j)
        device = members[0].kv[0][0].device
        ids = torch.cat([s.generated[-1] for s in members])
        with exact_attention():
            logits = model(ids, attention_mask=padding_mask(lengths, 1, device),
                           position_ids=torch.tensor(lengths, device=device)[:, None], past_key_values=cache,
                           use_cache=True).logits[:, -1]
        for row, s in enumerate(members):
            for j, lay in enumerate(cache.layers):
                s.kv[j] = [torch.cat([s.kv[j][0], lay.keys[row:row + 1, :, past:]], 2),
                           torch.cat([s.kv[j][1], lay.values[row:row + 1, :, past:]], 2)]
            chose[fed[row]] = logits[row:row + 1]
            tokens[fed[row]] = logits[row:row + 1].argmax(-1, keepdim=True)
    for s, t in zip(sessions, tokens):
        s.generated.append(t)
    return tokens, chose


def join_leave_schedule(sessions: int, tokens: int) -> list[list[int]]:
    """The members of each batched step when session ``i`` decodes in steps ``i .. i + tokens - 1``: it joins ``i``
    steps after the first and leaves as many before the last, so every session gets ``tokens`` tokens and the batch's
    composition changes at both ends."""
    return [[i for i in range(sessions) if i <= t < i + tokens] for t in range(tokens + sessions - 1)]


Case = tuple[int, bool, bool]  # (L, edited, through a fork)


@torch.no_grad()
def batched_session_runs(rt: StreamedBreakpointRuntime, prompts: list[torch.Tensor], cases: list[Case],
                         edit: Callable, new_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Sessions at different lengths (one per prompt), each paused at its case's L and swapped to the host, forked
    and edited as its case says, resumed (its prompt logits), then decoding ``new_tokens`` greedy tokens together by
    :func:`~djinn_core.runtime.batch.decode_batch` on :func:`join_leave_schedule`: per session (prompt logits,
    tokens (1, n), the logits that chose them (1, n, vocab)), on the CPU. All sessions are closed after."""
    from djinn_core.runtime.batch import decode_batch

    sessions: list[BreakpointSession] = []
    firsts = []
    try:
        for ids, (layer, edited, forked) in zip(prompts, cases):
            s = rt.open(ids, max_new_tokens=new_tokens)
            sessions.append(s)
            s.run_to(layer)
            s.pause()
            if forked:
                sessions[-1] = s.fork(1)[0]
                s.close()
                s = sessions[-1]
            if edited:
                s.restore().edit(edit)
                s.pause()
            firsts.append(s.resume().cpu())
        tokens: list[list[torch.Tensor]] = [[] for _ in sessions]
        chose: list[list[torch.Tensor]] = [[] for _ in sessions]
        for members in join_leave_schedule(len(sessions), new_tokens):
            toks, logits = decode_batch(rt, [sessions[i] for i in members], return_logits=True)
            for i, t, lg in zip(members, toks, logits):
                tokens[i].append(t.cpu())
                chose[i].append(lg.cpu())
    finally:
        for s in sessions:
            s.close()
    return [(f, torch.cat(t, 1), torch.stack(c, 1)) for f, t, c in zip(firsts, tokens, chose)]


@torch.no_grad()
def batched_resident_reference(model: Any, prompts: list[torch.Tensor], cases: list[Case], edit: Callable,
                               new_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The same by plain Hugging Face forwards on a resident model: each prompt prefilled alone with its case's edit
    as a pre-hook (:class:`PlainSession`), then the same schedule of padded batched steps
    (:func:`padded_step_reference`); the same triples, on the CPU."""
    refs = [PlainSession(model, ids, layer, edit if edited else None, keep_prompt_logits=True)
            for ids, (layer, edited, _) in zip(prompts, cases)]
    chose: list[list[torch.Tensor]] = [[] for _ in refs]
    for members in join_leave_schedule(len(refs), new_tokens):
        _, logits = padded_step_reference(model, [refs[i] for i in members])
        for i, lg in zip(members, logits):
            chose[i].append(lg.cpu())
    return [(r.prompt_logits, torch.cat(r.generated, 1).cpu(), torch.stack(c, 1)) for r, c in zip(refs, chose)]


def unequal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Unequal elements, by bit pattern, of (prompt logits, tokens, step logits)."""
    def diff(x: torch.Tensor, y: torch.Tensor) -> int:
        if x.shape != y.shape:
            return max(x.numel(), y.numel())
        if x.is_floating_point():
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
            x, y = x.view(bits), y.view(bits)
        return int((x != y).sum())

    return {"prompt_logits": diff(a[0], b[0]), "tokens": diff(a[1], b[1]), "step_logits": diff(a[2], b[2])}


__all__ = ["BATCH_BOUND", "BATCH_CONTEXT", "BATCH_KS", "BATCH_PEER_BOUND", "BATCH_WINDOW", "BatchRun", "Case", "EDIT_BOUND",
           "EDIT_LAYERS", "EditCosts", "PeerBatchRun", "PlainSession", "batched_divergence",
           "batched_resident_reference", "batched_session_runs", "join_leave_schedule", "measure_batched_decode",
           "measure_edit_costs", "measure_peer_batched_decode", "padded_step_reference", "resident_reference",
           "session_run", "steering_vector", "streamed_runtime", "unequal"]
