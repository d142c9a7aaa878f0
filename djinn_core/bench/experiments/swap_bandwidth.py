"""Swap bandwidth: one session's per-layer KV moved between the slab and the pinned host pool by the swap engine,
against copy ceilings measured on the very bytes the swap moves, interleaved with the swaps repeat by repeat.

:class:`SwapBench` holds two sessions ("a", "b") of ``kv.<i>`` items (K and V of one layer, the layout the breakpoint
sessions use) in one slab and one host pool, and puts them back in place, untimed, before every repeat: "a" in the
slab's lower half, "b" in the upper half, each session's host blocks in one pinned segment. :func:`interleaved`
alternates one ceiling sample and one swap sample. The ceiling copies run on the sessions' own bytes and overwrite
them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from djinn_core.bench.ceilings import copy_ceiling_on
from djinn_core.bench.timing import TimingStats, time_host
from djinn_core.errors import ConfigError
from djinn_core.memory.host_pool import HostPool
from djinn_core.memory.slab import Slab, SlabTensor
from djinn_core.memory.swap import ResidentState, SwapEngine, SwappedState
from djinn_core.models import architecture_config, model_sizes

MODEL = "llama2-13b"
TOKENS = 2048
REPEATS = 10
SESSIONS = ("a", "b")


class SwapBench:
    """Two sessions' per-layer KV in one slab and one host pool, and the moves the benchmarks time.

    Slab: ``2 * kv_bytes`` (+ one alignment unit); host pool: two segments of ``kv_bytes``, so one session's host copy
    fills one segment.
    """

    def __init__(self, device: torch.device, *, num_layers: int | None = None, tokens: int = TOKENS,
                 checksums: bool = False):
        config = architecture_config(MODEL, num_layers=num_layers)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = config.num_hidden_layers
        self.item_shape = (2, 1, config.num_key_value_heads, tokens, head_dim)  # (K|V, batch, kv_heads, seq, head_dim)
        self.dtype = torch.float16
        self.item_bytes = torch.Size(self.item_shape).numel() * self.dtype.itemsize
        self.kv_bytes = model_sizes(config, self.dtype).kv_bytes(tokens)
        if self.layers * self.item_bytes != self.kv_bytes:
            raise ConfigError(f"{self.layers} per-layer items of {self.item_bytes} bytes do not add up to the "
                              f"model's {self.kv_bytes} KV bytes")
        self.device = device
        self.slab = Slab(2 * self.kv_bytes + 256, device)
        self.pool = HostPool(2 * self.kv_bytes, segment_bytes=self.kv_bytes, pin=device.type == "cuda")
        self.engine = SwapEngine(self.slab, self.pool, checksums=checksums)
        self.names = [f"kv.{i}" for i in range(self.layers)]
        self.resident: dict[str, dict[str, SlabTensor]] = {}
        self.swapped: dict[str, SwappedState] = {}
        g = torch.Generator(device=device).manual_seed(13)
        for sid in SESSIONS:
            items = {}
            for name in self.names:
                t = self.slab.allocate(self.item_shape, self.dtype, tag=f"{sid}:{name}")
                t.view().copy_(torch.randn(self.item_shape, generator=g, device=device, dtype=self.dtype))
                items[name] = t
            self.resident[sid] = items

    # -- moves (asynchronous on CUDA) ------------------------------------------------------------------------------
    def swap_out(self, sid: str) -> SwappedState:
        state = self.engine.swap_out(self.resident.pop(sid))
        self.swapped[sid] = state
        return state

    def swap_in(self, sid: str) -> ResidentState:
        res = self.engine.swap_in(self.swapped.pop(sid), order=self.names)
        self.resident[sid] = res.tensors
        return res

    def place(self, on_slab: set[str]) -> None:
        """Untimed reset: "a" in the lower half of the slab, "b" in the upper, then the others out to the host.

        Completes every copy on the current stream before returning (the timer then drains that stream)."""
        for sid in list(self.resident):
            self.swap_out(sid).wait()
        for sid in SESSIONS:
            self.swap_in(sid).wait_all()
        for sid in SESSIONS:
            if sid not in on_slab:
                self.swap_out(sid).wait()

    # -- the buffers the ceilings run on (the slab's and pool's own bytes) ------------------------------------------
    def slab_half(self, k: int) -> torch.Tensor:
        return self.slab.raw_bytes(k * self.kv_bytes, self.kv_bytes)

    def host_segment(self, k: int) -> torch.Tensor:
        return self.pool.raw_bytes(k, 0, self.kv_bytes)


def interleaved(ceiling: Callable[[], TimingStats], run: Callable[[], Any], before: Callable[[], Any],
                timer: Callable[..., TimingStats], repeats: int = REPEATS) -> tuple[TimingStats, TimingStats]:
    """Alternate one ceiling sample and one run sample, ``repeats`` times, after one warm-up of each."""
    ceiling()
    timer(run, warmup=0, repeats=1, before=before)
    c, r = [], []
    for _ in range(repeats):
        c.extend(ceiling().samples_ms)
        r.extend(timer(run, warmup=0, repeats=1, before=before).samples_ms)
    clock = "host" if timer is time_host else "cuda_event"
    return TimingStats(tuple(c), clock), TimingStats(tuple(r), clock)


def cuda_ceiling(direction: str, host: torch.Tensor, dev: torch.Tensor, host2: torch.Tensor | None = None,
                 dev2: torch.Tensor | None = None) -> Callable[[], TimingStats]:
    """One sample of a copy ceiling on these buffers (no warm-up), for :func:`interleaved`."""
    return lambda: copy_ceiling_on(host, dev, direction, host2=host2, dev2=dev2, warmup=0, repeats=1).timing


