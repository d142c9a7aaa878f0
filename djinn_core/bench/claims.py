"""One schema for every claim, and the arithmetic that checks it.

A claim is a measured figure compared with a bound, as a ratio to a reference measured in the same run:

- ``bandwidth``: measured GB/s = ``bytes_moved`` / median of ``timing``; ratio = measured / ``ceiling_GBps``.
- ``ratio``: ratio = measured / reference, each either a number or the median of a timing.
- ``check``: ratio = the value itself (an absolute claim: a count of unequal tokens, peak bytes over budget...).

:func:`evaluate` recomputes a recorded claim from its raw statistics, so a report or the CI gate never trusts a stored
verdict. :class:`ClaimRecorder` writes claims into pytest-benchmark's ``extra_info`` (first) and asserts them
(second), so a failing claim is still saved with its numbers.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

from djinn_core.errors import ConfigError
from djinn_core.bench.timing import TimingStats

OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, "==": operator.eq,
                                                  ">": operator.gt, "<": operator.lt}
KINDS = ("bandwidth", "ratio", "check")
REL_TOL = 1e-9


class ClaimFailed(AssertionError):
    """A claim's measured ratio misses its bound. Carries the recorded claim."""

    def __init__(self, record: dict[str, Any]):
        self.record = record
        super().__init__(describe(record))


def _median(x: TimingStats | dict | float | int) -> float:
    if isinstance(x, TimingStats):
        return x.median_ms
    if isinstance(x, dict):
        return TimingStats.from_dict(x).median_ms
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ConfigError(f"expected a number or TimingStats, got {type(x).__name__}")
    return float(x)


def _timing_dict(x: Any) -> dict | None:
    if isinstance(x, TimingStats):
        return x.to_dict()
    if isinstance(x, dict):
        return x
    return None


@dataclass(frozen=True)
class Evaluation:
    measured: float
    reference: float | None
    ratio: float
    passed: bool


def evaluate(record: dict[str, Any]) -> Evaluation:
    """Recompute a recorded claim from its raw fields (timings' samples, bytes, ceiling, bound)."""
    kind = record.get("kind")
    op = record.get("op")
    if kind not in KINDS:
        raise ConfigError(f"claim {record.get('claim')!r}: unknown kind {kind!r}")
    if op not in OPS:
        raise ConfigError(f"claim {record.get('claim')!r}: unknown op {op!r}")
    bound = float(record["bound"])
    reference: float | None
    if kind == "bandwidth":
        timing = record["timing"]
        measured = record["bytes_moved"] / (_median(timing) * 1e-3) / 1e9
        reference = float(record["ceiling_GBps"])
        ratio = measured / reference
    elif kind == "ratio":
        measured = _median(record["timing"]) if record.get("timing") else float(record["measured"])
        reference = (_median(record["reference_timing"]) if record.get("reference_timing")
                     else float(record["reference"]))
        ratio = measured / reference if reference != 0 else math.inf
    else:
        measured = float(record["measured"])
        reference = None
        ratio = measured
    passed = bool(OPS[op](ratio, bound)) and not math.isnan(ratio)
    return Evaluation(measured, reference, ratio, passed)


def describe(record: dict[str, Any]) -> str:
    ev = evaluate(record)
    params = ", ".join(f"{k}={v}" for k, v in record.get("params", {}).items())
    what = f"{record['claim']}[{params}] ({record['method']})"
    if record["kind"] == "bandwidth":
        detail = f"{ev.measured:.2f} GB/s vs ceiling {ev.reference:.2f} GB/s"
    elif record["kind"] == "ratio":
        detail = f"{ev.measured:.4g} {record.get('unit', '')} vs {record.get('reference_method', 'reference')} " \
                 f"{ev.reference:.4g} {record.get('unit', '')}"
    else:
        detail = f"value {ev.measured:.6g} {record.get('unit', '')}"
    verdict = "holds" if ev.passed else "FAILS"
    return f"{what}: {detail}; ratio {ev.ratio:.4g} {record['op']} {record['bound']} {verdict}"


def make_record(
    claim: str,
    *,
    kind: str,
    method: str,
    bound: float,
    op: str,
    params: dict[str, Any] | None = None,
    unit: str = "",
    **fields: Any,
) -> dict[str, Any]:
    """Build a claim record and fill in measured/ratio/passed by :func:`evaluate`."""
    if not isinstance(claim, str) or not claim or not claim.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"claim must be a slug (letters, digits, '_' or '-'), got {claim!r}")
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if op not in OPS:
        raise ConfigError(f"op must be one of {sorted(OPS)}, got {op!r}")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or math.isnan(bound):
        raise ConfigError(f"bound must be a number, got {bound!r}")
    record: dict[str, Any] = {"claim": claim, "kind": kind, "method": method, "params": dict(params or {}),
                              "bound": float(bound), "op": op, "unit": unit}
    record.update(fields)
    ev = evaluate(record)
    record.update(measured=ev.measured, reference=ev.reference, ratio=ev.ratio, passed=ev.passed)
    return record


class ClaimRecorder:
    """Records claims into ``benchmark.extra_info`` and asserts them. One per test (the ``claim`` fixture).

    ``extra_info`` gets the foundation's schema: the last claim's ``claim``, ``method``, parameters, ``bytes_moved``,
    ``ceiling_GBps`` and ``ratio`` at top level, and every claim of the test under ``claims``; ``info`` holds extra
    data (timelines, traces, token lists).
    """

    def __init__(self, benchmark: Any):
        self.benchmark = benchmark
        self.records: list[dict[str, Any]] = []
        self._measured = False
        benchmark.extra_info.setdefault("claims", [])

    def measure(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` under pytest-benchmark (one round; the device timings inside are what claims use)."""
        if self._measured:
            return fn()
        self._measured = True
        return self.benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)

    def info(self, **data: Any) -> None:
        self.benchmark.extra_info.setdefault("info", {}).update(data)

    def _record(self, record: dict[str, Any], *, check: bool) -> dict[str, Any]:
        if not self._measured:  # pytest-benchmark saves only benchmarks that ran: make sure this one did
            self.measure(lambda: None)
        self.records.append(record)
        extra = self.benchmark.extra_info
        extra["claims"].append(record)
        extra.update({k: record.get(k) for k in ("claim", "method", "bytes_moved", "ceiling_GBps", "ratio", "bound",
                                                  "op", "passed")})
        extra.update(record["params"])
        if check and not record["passed"]:
            raise ClaimFailed(record)
        return record

    def bandwidth(self, claim: str, *, method: str, timing: TimingStats, bytes_moved: int, ceiling_GBps: float,
                  bound: float, params: dict[str, Any] | None = None, op: str = ">=", check: bool = True,
                  ceiling: Any = None) -> dict[str, Any]:
        """Bandwidth claim: (bytes_moved / median timing) / ceiling_GBps ``op`` bound."""
        if not isinstance(bytes_moved, int) or bytes_moved <= 0:
            raise ConfigError(f"bytes_moved must be a positive int, got {bytes_moved!r}")
        if not ceiling_GBps or ceiling_GBps <= 0:
            raise ConfigError(f"ceiling_GBps must be positive, got {ceiling_GBps!r}")
        rec = make_record(claim, kind="bandwidth", method=method, bound=bound, op=op, params=params, unit="GB/s",
                          timing=timing.to_dict(), bytes_moved=bytes_moved, ceiling_GBps=float(ceiling_GBps),
                          ceiling=ceiling.to_dict() if hasattr(ceiling, "to_dict") else ceiling)
        return self._record(rec, check=check)

    def ratio(self, claim: str, *, method: str, measured: TimingStats | float, reference: TimingStats | float,
              bound: float, op: str = "<=", params: dict[str, Any] | None = None, reference_method: str = "",
              unit: str = "ms", check: bool = True) -> dict[str, Any]:
        """Ratio claim: measured / reference ``op`` bound (timings compare by their medians)."""
        rec = make_record(claim, kind="ratio", method=method, bound=bound, op=op, params=params, unit=unit,
                          timing=_timing_dict(measured), reference_timing=_timing_dict(reference),
                          measured=None if isinstance(measured, TimingStats) else float(measured),
                          reference=None if isinstance(reference, TimingStats) else float(reference),
                          reference_method=reference_method)
        return self._record(rec, check=check)

    def check(self, claim: str, *, method: str, value: float, bound: float, op: str, unit: str = "",
              params: dict[str, Any] | None = None, check: bool = True) -> dict[str, Any]:
        """Absolute claim: value ``op`` bound."""
        rec = make_record(claim, kind="check", method=method, bound=bound, op=op, params=params, unit=unit,
                          measured=float(value))
        return self._record(rec, check=check)
