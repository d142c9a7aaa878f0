"""Same-run copy ceilings: what the PCIe link and copy engines give *now*, on given buffers.

Every bandwidth claim divides by a ceiling measured in the same run, ideally on the very buffers the claim uses and
interleaved with its runs: the link's rate wanders (docs/notes/bench.md). A ceiling
is the median of event-timed copies after warm-up; the host-to-device and device-to-host copies run on a side stream
with ``non_blocking=True``. The bidirectional ceiling times one copy each way issued at once on two streams; its
bandwidth counts both directions' bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from djinn_core.bench.timing import TimingStats, require_cuda, time_cuda
from djinn_core.errors import ConfigError
from djinn_core.trace import Span, make_mark
from djinn_core.validation import check_int

log = logging.getLogger(__name__)

DIRECTIONS = ("h2d", "d2h", "bidir")


@dataclass(frozen=True)
class CopyCeiling:
    """A measured copy bandwidth. ``GBps`` = bytes moved (both directions for ``bidir``) / median time, in 1e9 B/s."""

    direction: str
    nbytes: int  # bytes of one copy (per direction)
    pinned: bool
    timing: TimingStats

    @property
    def bytes_moved(self) -> int:
        return self.nbytes * (2 if self.direction == "bidir" else 1)

    @property
    def GBps(self) -> float:
        return self.bytes_moved / (self.timing.median_ms * 1e-3) / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {"direction": self.direction, "nbytes": self.nbytes, "pinned": self.pinned,
                "bytes_moved": self.bytes_moved, "GBps": self.GBps, "timing": self.timing.to_dict()}


def _is_registered(host: torch.Tensor) -> bool:
    """Whether ``host``'s memory is page-locked through cudaHostRegister (the CUDA driver knows its pointer)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python, present beside CUDA builds of torch
    except ImportError:
        return False
    err, attrs = cudart.cudaPointerGetAttributes(host.data_ptr())
    return err == cudart.cudaError_t.cudaSuccess and attrs.type == cudart.cudaMemoryType.cudaMemoryTypeHost


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def copy_ceiling_on(
    host: torch.Tensor,
    dev: torch.Tensor,
    direction: str,
    *,
    host2: torch.Tensor | None = None,
    dev2: torch.Tensor | None = None,
    warmup: int = 3,
    repeats: int = 10,
) -> CopyCeiling:
    """Measure a copy ceiling on the caller's buffers (same byte count, any dtypes).

    ``h2d`` copies ``host -> dev``; ``d2h`` copies ``dev -> host``; ``bidir`` copies ``host -> dev`` and ``dev2 ->
    host2`` at once on two side streams (both pairs required, each of ``nbytes``). Contents of the destination
    buffers are overwritten.
    """
    require_cuda("copy_ceiling_on")
    _check_direction(direction)
    if host.device.type != "cpu" or dev.device.type != "cuda":
        raise ConfigError("copy_ceiling_on needs a host (CPU) tensor and a CUDA tensor")
    nbytes = host.numel() * host.element_size()
    if dev.numel() * dev.element_size() != nbytes:
        raise ConfigError("host and device buffers must have the same byte count")
    hb, db = host.view(-1).view(torch.uint8), dev.view(-1).view(torch.uint8)
    s_in = torch.cuda.Stream(device=dev.device)
    s_out = torch.cuda.Stream(device=dev.device)
    cur = torch.cuda.current_stream(dev.device)
    if direction == "bidir":
        if host2 is None or dev2 is None:
            raise ConfigError("a bidirectional ceiling needs a second host/device buffer pair")
        if host2.numel() * host2.element_size() != nbytes or dev2.numel() * dev2.element_size() != nbytes:
            raise ConfigError("bidirectional buffers must all have the same byte count")
        hb2, db2 = host2.view(-1).view(torch.uint8), dev2.view(-1).view(torch.uint8)

    def run() -> None:
        # side streams start after the timing stream's start event and the timing stream waits for them
        s_in.wait_stream(cur)
        s_out.wait_stream(cur)
        if direction in ("h2d", "bidir"):
            with torch.cuda.stream(s_in):
                db.copy_(hb, non_blocking=True)
        if direction == "d2h":
            with torch.cuda.stream(s_out):
                hb.copy_(db, non_blocking=True)
        if direction == "bidir":
            with torch.cuda.stream(s_out):
                hb2.copy_(db2, non_blocking=True)
        cur.wait_stream(s_in)
        cur.wait_stream(s_out)

    timing = time_cuda(run, warmup=warmup, repeats=repeats, stream=cur)
    # page-locked either way: torch's pinned allocator or cudaHostRegister (which is_pinned() may not report)
    pinned = bool(host.is_pinned()) or _is_registered(host)
    c = CopyCeiling(direction, nbytes, pinned, timing)
    log.info("ceiling %s %s %.1f MiB: %.2f GB/s", direction, "pinned" if pinned else "pageable", nbytes / 2**20, c.GBps)
    return c


def measure_copy_ceiling(
    nbytes: int,
    direction: str = "h2d",
    *,
    pinned: bool = True,
    device: torch.device | str = "cuda",
    warmup: int = 3,
    repeats: int = 10,
) -> CopyCeiling:
    """Allocate fresh buffers of ``nbytes`` (host pinned or pageable) and measure a copy ceiling on them."""
    check_int("nbytes", nbytes, 1)
    _check_direction(direction)
    require_cuda("measure_copy_ceiling")
    device = torch.device(device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(7)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host2 = dev2 = None
    if direction == "bidir":
        host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        dev2 = torch.empty(nbytes, dtype=torch.uint8, device=device)
    try:
        return copy_ceiling_on(host, dev, direction, host2=host2, dev2=dev2, warmup=warmup, repeats=repeats)
    finally:
        del host, dev, host2, dev2


class LinkBracket:
    """Reference copies right around each large swap, for :attr:`djinn_core.memory.swap.SwapEngine.bracket`.

    The link's rate wanders from one copy to the next (docs/notes/bench.md), so a swap is best compared with copies
    taken next to it rather than with a ceiling measured before or after the run. Set on an engine, this copies up
    to ``nbytes`` the swap's way (``"in"``: host to device, ``"out"``: device to host) between its own pinned host
    buffer and device buffer, on the swap's stream right before its first copy and right after its last, for every
    swap of at least ``min_swap_bytes``; :func:`djinn_core.memory.swap_items.swap_timeline` then reports each
    bracketed swap's rate over the brackets' (``over_bracket``). The copies take link time of their own (twice the
    swap's bytes, up to ``nbytes`` each), so a bracketed run is a measurement, not normal use. The buffers' contents
    mean nothing (both directions share them). On the CPU the buffers are plain memory and the copies synchronous.
    """

    def __init__(self, nbytes: int, device: torch.device | str, *, min_swap_bytes: int | None = None):
        check_int("nbytes", nbytes, 1)
        self.nbytes = nbytes
        self.min_swap_bytes = nbytes if min_swap_bytes is None else check_int("min_swap_bytes", min_swap_bytes, 0)
        device = torch.device(device)
        cuda = device.type == "cuda"
        if cuda:
            require_cuda("LinkBracket")
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.copies = 0

    def __call__(self, direction: str, stream: Any, nbytes: int) -> Span | None:
        """Copy ``min(nbytes, self.nbytes)`` bytes the ``direction`` way on the current stream (the engine makes the
        swap's stream current) and return its :class:`Span`; ``None`` for a swap smaller than ``min_swap_bytes``."""
        if direction not in ("in", "out"):
            raise ConfigError(f"direction must be 'in' or 'out', got {direction!r}")
        if nbytes < self.min_swap_bytes:
            return None
        n = min(nbytes, self.nbytes)
        host, dev = self.host[:n], self.dev[:n]
        start = make_mark("bracket-start", stream)
        if direction == "in":
            dev.copy_(host, non_blocking=stream is not None)
        else:
            host.copy_(dev, non_blocking=stream is not None)
        self.copies += 1
        return Span(f"bracket-{direction}", start, make_mark("bracket-end", stream), {"nbytes": n})
