"""One schema for every claim, and the arithmetic that checks it.

A claim is a measured figure compared with a bound, as a ratio to a reference measured in the same run:

- ``bandwidth``: measured GB/s = ``bytes_moved`` / median of ``timing``; ratio = measured / ``ceiling_GBps``.
- ``ratio``: ratio = measured / reference, each either a number or the median of a timing.
- ``check``: ratio = the value itself (an absolute claim: a count of unequal tokens, peak bytes over budget...).
- ``precondition``: evaluated as ``check``, but it states that the experiment happened as its claims assume (the
  sessions oversubscribed VRAM, something was evicted, swaps were timed, the peer ran, bytes moved). A claim whose
  precondition does not hold says nothing: the recorder raises :class:`PreconditionFailed` at once (the test fails;
  it never skips and never passes), and the record stays in the JSON, so a report and the CI gate re-check it.

:func:`evaluate` recomputes a recorded claim from its raw statistics, so a report or the CI gate never trusts a stored
verdict. :class:`ClaimRecorder` writes claims into pytest-benchmark's ``extra_info`` (first) and asserts them
(second), so a failing claim is still saved with its numbers.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

from djinn_core.bench.timing import TimingStats
from djinn_core.errors import ConfigError
from djinn_core.validation import check_int, check_number

OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, "==": operator.eq,
                                                  ">": operator.gt, "<": operator.lt}
KINDS = ("bandwidth", "ratio", "check", "precondition")


class ClaimFailed(AssertionError):
    """A claim's measured ratio misses its bound. Carries the recorded claim."""

    def __init__(self, record: dict[str, Any]):
        self.record = record
        super().__init__(describe(record))


class PreconditionFailed(ClaimFailed):
    """The experiment did not happen as its claims assume (see ``precondition`` in the module doc)."""


def _median(x: TimingStats | dict | float | int) -> float:
    if isinstance(x, TimingStats):
        return x.median_ms
    if isinstance(x, dict):
        return TimingStats.from_dict(x).median_ms
    return float(check_number("timing", x, None))


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
    else:  # check, precondition
        measured = float(record["measured"])
        reference = None
        ratio = measured
    passed = bool(OPS[op](ratio, bound)) and not math.isnan(ratio)
    return Evaluation(measured, reference, ratio, passed)


def what_was_measured(record: dict[str, Any]) -> str:
    """The claim's measurement in words, with its unit: the record's ``what`` where the test gave one (else its claim
    name), then how the figure is formed from the method, the reference and the unit."""
    what = record.get("what") or record["claim"].replace("_", " ").replace("-", " ")
    unit = record.get("unit") or "no unit"
    if record["kind"] == "bandwidth":
        n = len((record.get("timing") or {}).get("samples_ms", ()))
        return (f"{what}: {record['method']}, {record.get('bytes_moved')} bytes moved / median of {n} timed repeats, "
                "in GB/s, over the pinned copy ceiling measured in the same run")
    if record["kind"] == "ratio":
        medians = " (medians of timed repeats)" if record.get("timing") or record.get("reference_timing") else ""
        reference = record.get("reference_method") or "the reference"
        return f"{what}: {record['method']} over {reference}, in {unit}{medians}"
    if record["kind"] == "precondition":
        return f"precondition: {what}, in {unit}"
    return f"{what}, in {unit}"


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
    if record["kind"] == "precondition":
        verdict = "holds" if ev.passed else "FAILS: the experiment did not happen as its claims assume"
        return f"precondition {what}: {detail} {record['op']} {record['bound']} {verdict}"
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
    check_number("bound", bound, None)
    record: dict[str, Any] = {"claim": claim, "kind": kind, "method": method, "params": dict(params or {}),
                              "bound": float(bound), "op": op, "unit": unit}
    record.update((k, v) for k, v in fields.items() if not (k == "what" and not v))
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
                  ceiling: Any = None, what: str = "") -> dict[str, Any]:
        """Bandwidth claim: (bytes_moved / median timing) / ceiling_GBps ``op`` bound. ``what``: what was moved, in
        words (for reports)."""
        check_int("bytes_moved", bytes_moved, 1)
        check_number("ceiling_GBps", ceiling_GBps, 0.0, strict_minimum=True)
        rec = make_record(claim, kind="bandwidth", method=method, bound=bound, op=op, params=params, unit="GB/s",
                          what=what, timing=timing.to_dict(), bytes_moved=bytes_moved,
                          ceiling_GBps=float(ceiling_GBps),
                          ceiling=ceiling.to_dict() if hasattr(ceiling, "to_dict") else ceiling)
        return self._record(rec, check=check)

    def ratio(self, claim: str, *, method: str, measured: TimingStats | float, reference: TimingStats | float,
              bound: float, op: str = "<=", params: dict[str, Any] | None = None, reference_method: str = "",
              unit: str = "ms", check: bool = True, what: str = "") -> dict[str, Any]:
        """Ratio claim: measured / reference ``op`` bound (timings compare by their medians). ``what``: the measured
        quantity in words (for reports)."""
        rec = make_record(claim, kind="ratio", method=method, bound=bound, op=op, params=params, unit=unit, what=what,
                          timing=_timing_dict(measured), reference_timing=_timing_dict(reference),
                          measured=None if isinstance(measured, TimingStats) else float(measured),
                          reference=None if isinstance(reference, TimingStats) else float(reference),
                          reference_method=reference_method)
        return self._record(rec, check=check)

    def check(self, claim: str, *, method: str, value: float, bound: float, op: str, unit: str = "",
              params: dict[str, Any] | None = None, check: bool = True, what: str = "") -> dict[str, Any]:
        """Absolute claim: value ``op`` bound. ``what``: what the value counts or measures, in words (for reports)."""
        rec = make_record(claim, kind="check", method=method, bound=bound, op=op, params=params, unit=unit, what=what,
                          measured=float(value))
        return self._record(rec, check=check)

    def precondition(self, name: str, *, value: float, op: str, bound: float, unit: str, what: str,
                     method: str = "precondition", params: dict[str, Any] | None = None) -> dict[str, Any]:
        """State that the experiment happened as its claims assume: value ``op`` bound, recorded like a claim (kind
        ``precondition``), then asserted at once: :class:`PreconditionFailed` when it does not hold. Record it
        before the claims it guards. ``what``: the condition's quantity in words (for reports)."""
        rec = make_record(name, kind="precondition", method=method, bound=bound, op=op, params=params, unit=unit,
                          what=what, measured=float(value))
        self._record(rec, check=False)
        if not rec["passed"]:
            raise PreconditionFailed(rec)
        return rec
