"""Start N ranks on this host, or run as one rank under ``torchrun``; the command line serves one prompt per rank
from a partitioned streamed model.

:func:`spawn` runs ``fn(group, *args)`` in ``nprocs`` fresh processes (the ``spawn`` start method: safe after CUDA
was initialised in the parent), one per rank, joined through a free TCP port on 127.0.0.1; it returns when all have
finished and raises if one failed.

Command line (each rank builds the architecture with seeded random weights, pins its shards, prefills its own prompt
and decodes greedily; rank 0 prints one JSON line per rank and writes them to ``--out``)::

    python -m djinn_core.distributed.launch --nproc-per-node 2 --arch llama2-70b --budget-gib 24
    torchrun --nproc-per-node 2 -m djinn_core.distributed.launch --arch llama2-70b --budget-gib 24
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp

from djinn_core.distributed.group import DEFAULT_TIMEOUT_S, RankGroup, destroy_group, free_port, init_group
from djinn_core.validation import check_int

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20


def _worker(rank: int, fn: Callable[..., Any], nprocs: int, port: int, backend: str | None, timeout_s: float,
            threads: int | None, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nprocs),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs))
    if threads is not None:
        torch.set_num_threads(threads)
    group = init_group(backend=backend, timeout_s=timeout_s)
    try:
        fn(group, *args)
    finally:
        destroy_group()


def spawn(fn: Callable[..., Any], nprocs: int, *, args: Sequence[Any] = (), backend: str | None = None,
          timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None) -> None:
    """Run ``fn(group, *args)`` on ranks ``0..nprocs-1``, one new process each, on this host.

    ``fn`` and ``args`` must be picklable (a module-level function). ``backend``: as :func:`init_group` (NCCL where
    CUDA is available, else gloo). ``threads``: torch intra-op threads per rank; by default the CPU cores shared out
    under gloo, torch's default under NCCL. Raises ``torch.multiprocessing.ProcessRaisedException`` (or
    ``ProcessExitedException``) when a rank fails.
    """
    check_int("nprocs", nprocs, 1)
    gloo = backend == "gloo" or (backend is None and not torch.cuda.is_available())
    if threads is None and gloo:
        threads = max(1, (os.cpu_count() or 1) // nprocs)
    mp.start_processes(_worker, args=(fn, nprocs, free_port(), backend, timeout_s, threads, tuple(args)),
                       nprocs=nprocs, join=True, start_method="spawn")


# ------------------------------------------------------------------------------------------------ the command line
def _prompt(tokens: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, tokens), generator=g).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def serve_prompt(group: RankGroup, opts: argparse.Namespace) -> dict[str, Any]:
    """One rank of the command line: build, prefill this rank's prompt (seed ``opts.prompt_seed + rank``), decode
    greedily. Returns the rank's tokens, a SHA-256 of its logits' bytes, host-clock timings (ms) and stream stats."""
    from transformers import DynamicCache

    from djinn_core.distributed.partitioned import build_partitioned_streamed_model

    t0 = time.perf_counter()
    sm = build_partitioned_streamed_model(
        opts.arch, group=group, budget_bytes=int(opts.budget_gib * GiB), chunk_bytes=opts.chunk_mib * MiB,
        seed=opts.seed, dtype=opts.dtype, num_layers=opts.layers, max_tokens=opts.tokens + opts.decode_steps + 1,
        prefill_tokens=opts.tokens, max_slots=opts.max_slots, progress=group.rank == 0)
    build_s = time.perf_counter() - t0
    try:
        device = group.device
        ids = _prompt(opts.tokens, sm.model.config.vocab_size, opts.prompt_seed + group.rank, device)
        digest = hashlib.sha256()
        cache = DynamicCache()
        _sync(device)
        t0 = time.perf_counter()
        out = sm.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        digest.update(out.logits.float().cpu().numpy().tobytes())
        tokens, step_ms = [], []
        for _ in range(opts.decode_steps):
            tokens.append(int(nxt))
            t0 = time.perf_counter()
            out = sm.model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            digest.update(out.logits.float().cpu().numpy().tobytes())
        tokens.append(int(nxt))
        return {"rank": group.rank, "world_size": group.world_size, "device": str(device), "build_s": build_s,
                "prompt_seed": opts.prompt_seed + group.rank, "tokens": tokens, "logits_sha256": digest.hexdigest(),
                "prefill_ms": prefill_ms, "decode_step_ms": step_ms, "stats": sm.stats()}
    finally:
        sm.remove()


def _run_rank(group: RankGroup, opts: argparse.Namespace) -> None:
    result = serve_prompt(group, opts)
    results = group.gather_objects(result)
    if group.rank == 0:
        lines = [json.dumps(r, default=str) for r in results]
        print("\n".join(lines), flush=True)
        if opts.out:
            Path(opts.out).write_text("\n".join(lines) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m djinn_core.distributed.launch",
                                description="Serve one prompt per rank from a partitioned streamed model.")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks to start on this host (default: GPUs here, else 2); ignored under torchrun")
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default: nccl with CUDA, else gloo")
    p.add_argument("--arch", default="llama-tiny", help="a named architecture (djinn_core.models.ARCHITECTURES)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the architecture's)")
    p.add_argument("--budget-gib", type=float, default=24.0, help="VRAM budget per rank, GiB")
    p.add_argument("--chunk-mib", type=int, default=64, help="host-to-device copy chunk, MiB")
    p.add_argument("--max-slots", type=int, default=4, help="ring slots at most")
    p.add_argument("--tokens", type=int, default=32, help="prompt tokens per rank")
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--seed", type=int, default=0, help="weight seed (the same on every rank)")
    p.add_argument("--prompt-seed", type=int, default=1, help="rank r's prompt uses prompt_seed + r")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank (default: see spawn)")
    p.add_argument("--out", default=None, help="rank 0 writes the ranks' JSON lines here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    opts = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        if opts.threads is not None:
            torch.set_num_threads(opts.threads)
        group = init_group(backend=opts.backend)
        try:
            _run_rank(group, opts)
        finally:
            destroy_group()
        return 0
    nprocs = opts.nproc_per_node or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    spawn(_run_rank, nprocs, args=(opts,), backend=opts.backend, threads=opts.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
