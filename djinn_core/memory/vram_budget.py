"""The VRAM budget the memory claims run against: its spelling, how it resolves on this machine, and its enforcement.

A memory claim ("N paused sessions fit", "peak VRAM within budget", "eager PyTorch runs out at N") means something
only against a stated amount of GPU memory. The suite's claims were made for an H100 80GB card, so the default
budget is that card, whatever card runs the suite; ``card`` runs against the whole card instead.

Spellings (:func:`parse_budget`, case-insensitive, spaces ignored):

- ``80GB``: the H100 80GB card's usable memory as torch reports it (``total_memory`` of an "NVIDIA H100 80GB HBM3",
  :data:`H100_80GB_BYTES` = 85,017,493,504 bytes = 79.18 GiB, as recorded in ``reports/h100/*.json``). The marketing
  "80 GB" names this card, not 80e9 bytes: on an H100 80GB, ``80GB`` and ``card`` are the same budget.
- ``card``: the whole card this process runs on (``total_memory`` of CUDA device 0).
- a byte count: an integer (bytes), or a number with a binary unit, ``B``, ``KiB``, ``MiB``, ``GiB``, ``TiB``
  (``74.5GiB``). Decimal units (``GB``, ``MB``...) other than the ``80GB`` card name are refused as ambiguous.

Sources, first found wins: the pytest option ``--djinn-vram-budget``, the environment variable ``DJINN_VRAM_BUDGET``,
the default ``80GB``. An unparsable budget, or one explicitly larger than the card, is a :class:`ConfigError` (the
suite turns it into a usage error before any fixture runs: nothing is pinned or allocated).

Enforcement (:func:`enforce`): on a card larger than the budget, torch's caching allocator is capped with
``torch.cuda.set_per_process_memory_fraction``, so that an allocation that would fail on the budget's card fails here
too (the eager baseline runs out of memory where an 80 GB card would). The cap is the budget less what this process
already uses outside the allocator (CUDA context, loaded kernels), measured when the cap is set, so that the
allocator's ceiling plus that overhead is the budget, as on a card of that size. NVML's view (the whole device, every
process) and torch's (this process's allocator) are both reported against the budget by the claims.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

from djinn_core.errors import ConfigError

log = logging.getLogger(__name__)

GiB = 2**30
H100_80GB_BYTES = 85_017_493_504  # torch total_memory of an "NVIDIA H100 80GB HBM3" (reports/h100/*.json)
NAMED = {"80gb": (H100_80GB_BYTES, "the H100 80GB card's usable memory as torch reports it (85,017,493,504 bytes)")}
CARD = "card"
DEFAULT_SPEC = "80GB"
ENV_VAR = "DJINN_VRAM_BUDGET"
OPTION = "--djinn-vram-budget"
_BINARY = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DECIMAL = ("kb", "mb", "gb", "tb")
_NUMBER = re.compile(r"^([0-9]+(?:\.[0-9]*)?)([a-z]*)$")


@dataclass(frozen=True)
class VramBudget:
    """A resolved budget. ``bytes`` is None only for ``card`` on a machine without a GPU (nothing to run against)."""

    spec: str  # as given
    source: str  # OPTION, ENV_VAR or "default"
    bytes: int | None
    meaning: str  # the spelling in words
    card_bytes: int | None  # total_memory of CUDA device 0; None without a GPU

    @property
    def exceeds_card(self) -> bool:
        return self.bytes is not None and self.card_bytes is not None and self.bytes > self.card_bytes

    @property
    def below_card(self) -> bool:
        """Whether the card is larger than the budget (the budget must be enforced)."""
        return self.bytes is not None and self.card_bytes is not None and self.bytes < self.card_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["GiB"] = None if self.bytes is None else round(self.bytes / GiB, 3)
        d["fraction_of_card"] = (self.bytes / self.card_bytes) if self.bytes and self.card_bytes else None
        return d


def parse_budget(spec: str) -> tuple[int | None, str]:
    """(bytes or None for ``card``, meaning in words) of a budget spelling; :class:`ConfigError` if unparsable."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"VRAM budget must be '80GB', 'card' or a byte count like 74.5GiB, got {spec!r}")
    s = spec.strip().lower().replace(" ", "")
    if s == CARD:
        return None, "the whole card (torch total_memory of CUDA device 0)"
    if s in NAMED:
        return NAMED[s]
    m = _NUMBER.match(s)
    if m is None or m.group(2) not in _BINARY:
        hint = (" (decimal units are ambiguous: '80GB' names the H100 80GB card; write GiB/MiB or bytes)"
                if m is not None and m.group(2) in _DECIMAL else "")
        raise ConfigError(f"cannot read VRAM budget {spec!r}: use '80GB', 'card', bytes, or a number with "
                          f"B/KiB/MiB/GiB/TiB{hint}")
    value = float(m.group(1)) * _BINARY[m.group(2)]
    if value < 1 or value >= 2**60:
        raise ConfigError(f"VRAM budget {spec!r} is {value:.0f} bytes: out of range")
    return int(value), f"{int(value)} bytes as given"


def resolve_budget(spec: str | None, source: str, card_bytes: int | None) -> VramBudget:
    """The budget of ``spec`` (None: the default) on a card of ``card_bytes`` (None: no GPU). An explicit budget
    larger than the card is a :class:`ConfigError`; the default one is kept and reported (the memory claims then
    fail their ``budget_within_card`` precondition on that card)."""
    if spec is None:
        spec, source = DEFAULT_SPEC, "default"
    nbytes, meaning = parse_budget(spec)
    if nbytes is None:
        nbytes = card_bytes
    budget = VramBudget(spec, source, nbytes, meaning, card_bytes)
    if budget.exceeds_card and source != "default":
        raise ConfigError(f"VRAM budget {spec!r} ({nbytes / GiB:.2f} GiB, from {source}) is larger than this card "
                          f"({card_bytes / GiB:.2f} GiB): nothing was run; pick at most 'card'")
    return budget


def budget_from(option: str | None, environ: Mapping[str, str], card_bytes: int | None) -> VramBudget:
    """The budget from the pytest option, else ``DJINN_VRAM_BUDGET``, else the default."""
    if option is not None:
        return resolve_budget(option, OPTION, card_bytes)
    if environ.get(ENV_VAR):
        return resolve_budget(environ[ENV_VAR], ENV_VAR, card_bytes)
    return resolve_budget(None, "default", card_bytes)


def card_total_bytes(index: int = 0) -> int | None:
    """torch ``total_memory`` of CUDA device ``index``; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(index).total_memory)


def allocator_cap(budget_bytes: int, total_bytes: int, outside_bytes: int) -> tuple[int, float]:
    """(cap in bytes, fraction of ``total_bytes``) for torch's allocator so that the cap plus ``outside_bytes``
    (device memory this process holds outside the allocator) is ``budget_bytes``. :class:`ConfigError` if the
    overhead alone fills the budget."""
    cap = budget_bytes - outside_bytes
    if cap <= 0 or total_bytes <= 0:
        raise ConfigError(f"VRAM budget of {budget_bytes} bytes leaves nothing for the allocator "
                          f"({outside_bytes} bytes already used outside it)")
    return cap, min(1.0, cap / total_bytes)


def cap_allocator(budget_bytes: int, device: Any) -> dict[str, Any]:
    """Cap torch's caching allocator on CUDA ``device`` so that it plus what the device already holds outside it
    (measured now: this process's CUDA context and loaded kernels, and any other process's memory on the device, which
    on a card of the budget's size would take from it too) is ``budget_bytes``; returns what was done.
    :class:`ConfigError` for a budget larger than the card. Also what ``djinn serve --vram-budget`` needs: two
    servers on one GPU share one budget, as they would share an 80 GB card."""
    import torch

    device = torch.device(device)
    if device.index is None:  # set_per_process_memory_fraction needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)  # creates the CUDA context: its memory counts as outside
    if budget_bytes > total:
        raise ConfigError(f"VRAM budget of {budget_bytes} bytes is larger than the card ({total} bytes)")
    outside = max(0, (total - free) - torch.cuda.memory_reserved(device))
    cap, fraction = allocator_cap(budget_bytes, total, outside)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    log.info("VRAM budget: torch allocator capped at %.2f GiB (%.4f of %.2f GiB; %.2f GiB used outside it)",
             cap / GiB, fraction, total / GiB, outside / GiB)
    if outside > 4 * GiB:  # more than a CUDA context: another process holds part of the budget
        log.warning("VRAM budget: %.2f GiB of the device is used outside this allocator (another process?); it "
                    "counts against the budget, leaving %.2f GiB", outside / GiB, cap / GiB)
    return {"enforced": True, "how": "torch.cuda.set_per_process_memory_fraction", "fraction": fraction,
            "allocator_cap_bytes": cap, "outside_allocator_bytes": outside, "total_bytes": total,
            "budget_bytes": budget_bytes}


@contextmanager
def allocator_fraction(fraction: float, device: Any) -> Iterator[None]:
    """Cap torch's caching allocator on CUDA ``device`` at ``fraction`` of the card for the block, then put back the
    cap that held before it (the run's budget from :func:`enforce`, or none): an experiment that runs under a
    budget of its own, or a reference that needs more than the run's budget, never leaves the run uncapped."""
    import torch

    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    before = torch.cuda.get_per_process_memory_fraction(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, fraction), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(before, device)


@contextmanager
def allocator_limit(limit_bytes: int, device: Any) -> Iterator[None]:
    """:func:`allocator_fraction` at ``limit_bytes`` of the card on a CUDA ``device``; nothing on another device
    (no allocator to cap)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    with allocator_fraction(limit_bytes / torch.cuda.get_device_properties(device).total_memory, device):
        yield


def enforce(budget: VramBudget, device: Any) -> dict[str, Any]:
    """Cap torch's caching allocator on ``device`` to the budget when the card is larger (see the module doc);
    returns what was done, for the benchmark JSON. Call before the run allocates (the cap holds from then on)."""
    if budget.bytes is None or budget.card_bytes is None or device.type != "cuda":
        return {"enforced": False, "why": "no CUDA device"}
    if not budget.below_card:
        why = ("the budget is larger than the card: memory claims fail their budget precondition"
               if budget.exceeds_card else "the budget is the whole card: the card enforces it")
        return {"enforced": False, "why": why,
                "budget_bytes": budget.bytes, "card_bytes": budget.card_bytes}
    return cap_allocator(budget.bytes, device)


def allocatable_bytes(device: Any, enforcement: Mapping[str, Any] | None) -> int:
    """How many more bytes torch's allocator can get on ``device``: the driver's free memory, and under an enforced
    budget at most the allocator cap less what the allocator already reserved."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    if enforcement and enforcement.get("enforced"):
        return max(0, min(free, enforcement["allocator_cap_bytes"] - torch.cuda.memory_reserved(device)))
    return free
