"""Reports: pytest-benchmark JSON in, a Markdown claims table, a provenance block and PNG plots out.

Every verdict in a report is recomputed from the raw statistics (:func:`djinn_core.bench.claims.evaluate`), never copied
from the JSON; a stored verdict that disagrees with the recomputed one is flagged.

Plots are drawn from what the tests put in ``extra_info``:

- claims whose parameters include a numeric one (``layer``, ``sessions``, ``chunk_mib``, ``size_mib``...) give a
  "measured and reference vs parameter" plot per claim (the resume crossover plot is one of these);
- ``info["vram"]`` (a :meth:`VramSampler.to_dict`) gives a memory timeline with its marks, and a PCIe trace when
  sampled;
- ``info["layer_timeline"]`` (rows with ``layer``, ``copy_start_ms``, ``copy_end_ms``, ``compute_start_ms``,
  ``compute_end_ms``) gives a per-layer copy/compute Gantt chart;
- ``info["swaps"]`` (:func:`djinn_core.memory.swap_items.swap_timeline` rows) gives each swap's rate over the run,
  one panel per direction, beside the rate of the copies bracketing it where there were any.

A claim must pass in several runs at one clean commit, so a report may have runs beside it: ``<folder>/runs/
<stem>.run<N>.json`` (N from 2: the report itself is run 1), found by :func:`discover_runs` or named explicitly.
:func:`run_spread` recomputes every claim of every run and gives, per claim, the runs that recorded it, the runs it
passed in and the min / median / max of its ratio; the report gets a "Spread over N runs" section from it.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from djinn_core.bench.claims import describe, evaluate, make_record, what_was_measured
from djinn_core.bench.plots import report_plots
from djinn_core.errors import ConfigError

log = logging.getLogger(__name__)

GiB = 2**30


@dataclass(frozen=True)
class ClaimRow:
    test: str
    claim: str
    method: str
    params: dict[str, Any]
    measured: float
    unit: str
    reference: float | None
    reference_method: str
    ratio: float
    op: str
    bound: float
    passed: bool
    stored_passed: bool | None
    record: dict[str, Any]

    @property
    def key(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.test}::{self.claim}[{params}]"


def load_benchmark_json(path: str | Path) -> dict[str, Any]:
    """Read a pytest-benchmark JSON file; a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such benchmark JSON: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not JSON: {e}") from e
    if not isinstance(data, dict) or "benchmarks" not in data or "machine_info" not in data:
        raise ConfigError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks'/'machine_info')")
    return data


def claim_rows(data: dict[str, Any]) -> list[ClaimRow]:
    """Every claim of every benchmark, re-evaluated from its raw fields; :class:`ConfigError` for a malformed one."""
    rows = []
    for bench in data.get("benchmarks", []):
        test = bench.get("fullname") or bench.get("name", "?")
        records = list((bench.get("extra_info") or {}).get("claims", []))
        mine = [_row(test, rec) for rec in records]
        completed = _incomplete_test_record(bench, mine)
        rows += mine + ([_row(test, completed)] if completed is not None else [])
    return rows


def _row(test: str, rec: Any) -> ClaimRow:
    """One claim record re-evaluated from its raw fields; :class:`ConfigError` for a malformed one."""
    try:
        ev = evaluate(rec)
        return ClaimRow(test, rec["claim"], rec["method"], rec.get("params", {}), ev.measured, rec.get("unit", ""),
                        ev.reference, rec.get("reference_method", ""), ev.ratio, rec["op"], rec["bound"], ev.passed,
                        rec.get("passed"), rec)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        name = rec.get("claim") if isinstance(rec, dict) else rec
        raise ConfigError(f"{test}: malformed claim record {name!r} ({type(e).__name__}: {e})") from e


def _incomplete_test_record(bench: dict[str, Any], rows: list[ClaimRow]) -> dict[str, Any] | None:
    """A failed ``test_completed`` record for a benchmark whose test failed (``extra_info["test_outcome"]``, recorded
    by the claim fixture) while every claim it recorded (``rows``) passed: it stopped on an error outside its claims,
    so its report must not read as passing. None otherwise (a failed claim already fails the report)."""
    outcome = (bench.get("extra_info") or {}).get("test_outcome")
    if not isinstance(outcome, dict) or outcome.get("outcome") != "failed" or any(not r.passed for r in rows):
        return None
    error = str(outcome.get("error", "an error outside its claims"))
    return make_record("test_completed", kind="check", method=f"pytest's outcome of the test: {error}", bound=1.0,
                       op="==", unit="bool", what="the test ran to its end", measured=0.0)


def provenance(data: dict[str, Any]) -> dict[str, Any]:
    """The provenance block: the suite's machine facts, pytest-benchmark's machine and commit info, the date."""
    mi = data.get("machine_info", {})
    facts = mi.get("djinn", {})
    commit = data.get("commit_info", {})
    pk = facts.get("packages", {})
    return {
        "gpu": facts.get("gpu_name"),
        "gpu_memory_GiB": round(facts["gpu_memory_bytes"] / GiB, 1) if facts.get("gpu_memory_bytes") else None,
        "gpu_count": facts.get("gpu_count"),
        "vram_budget": _budget_words(facts.get("vram_budget")),
        "driver": facts.get("driver"),
        "cuda": facts.get("cuda_runtime"),
        "pcie": (f"Gen{facts['pcie_link_gen']} x{facts['pcie_link_width']}" if facts.get("pcie_link_gen") else None),
        "torch": facts.get("torch_version") or pk.get("torch"),
        "transformers": pk.get("transformers"),
        "accelerate": pk.get("accelerate"),
        "host_RAM_GiB": round(facts["host_memory"]["total"] / GiB, 1) if facts.get("host_memory") else None,
        "cpu": mi.get("cpu", {}).get("brand_raw"),
        "commit": commit.get("id"),
        "commit_dirty": commit.get("dirty"),
        "date": data.get("datetime") or facts.get("date_utc"),
    }


def parts_lines(data: dict[str, Any]) -> list[str]:
    """One Markdown line per part of a merged report (``djinn merge``): its file, date, GPU and tests. Parts may come
    from different lent machines of one kind; the date above is the earliest part's."""
    parts = (data.get("machine_info", {}).get("djinn", {}) or {}).get("parts") or []
    if not parts:
        return []
    lines = [f"- parts: {len(parts)}, joined by `djinn merge`"]
    for part in parts:
        tests = part.get("tests") or []
        names = ", ".join(t.rsplit("::", 1)[-1] for t in tests)
        lines.append(f"  - `{part.get('file')}`: {part.get('datetime')}, {part.get('gpu_uuid')}, "
                     f"{len(tests)} test{'s' if len(tests) != 1 else ''} ({names})")
    return lines


def _budget_words(budget: dict[str, Any] | None) -> str | None:
    """The run's VRAM budget in one line: spelling, bytes, source, and whether torch's allocator was capped."""
    if not budget:
        return None
    enf = budget.get("enforcement") or {}
    how = (f"allocator capped at {enf['allocator_cap_bytes']} bytes" if enf.get("enforced")
           else enf.get("why", "not enforced"))
    return f"{budget.get('spec')} = {budget.get('bytes')} bytes (from {budget.get('source')}; {how})"


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        return f"{x:.4g}"
    return "" if x is None else str(x)


def claims_table(rows: list[ClaimRow]) -> str:
    """One row per claim: what was measured (in words, with its unit), the figure, its reference, the ratio and the
    bound it is held to. A ``check`` claim holds its value itself to the bound: it has no reference and no ratio; nor
    has a ``precondition`` (what must have happened for the claims beside it to mean anything)."""
    head = "| claim | what was measured | parameters | measured | reference | ratio | bound | result |\n" \
           "|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r.params.items()) or "none"
        kind = r.record["kind"]
        if kind == "bandwidth":
            ref = f"{_fmt(r.reference)} GB/s (same-run ceiling)"
        elif r.reference is not None:
            ref = f"{_fmt(r.reference)} {r.unit} ({r.reference_method or 'reference'})".replace("  ", " ")
        else:
            ref = "none"
        absolute = kind in ("check", "precondition")
        ratio, bound = (("n/a", f"{r.op} {_fmt(r.bound)} {r.unit}".rstrip()) if absolute
                        else (_fmt(r.ratio), f"ratio {r.op} {_fmt(r.bound)}"))
        verdict = "pass" if r.passed else "**FAIL**"
        if r.stored_passed is not None and r.stored_passed != r.passed:
            verdict += " (stored verdict disagrees)"
        lines.append(f"| {r.claim} | {what_was_measured(r.record)} | {params} | {_fmt(r.measured)} {r.unit} | {ref} "
                     f"| {ratio} | {bound} | {verdict} |")
    return head + "\n".join(lines) + "\n"


PRESSURE_JSON = "exp3_memory_pressure.json"  # read beside a resume JSON for the capabilities table's session counts


def capabilities_table(resume: dict[str, Any], pressure: dict[str, Any] | None = None, layer: int = 40) -> str | None:
    """Method, resume latency at ``layer``, concurrent 2048-token sessions, state editing: every figure from the
    resume benchmarks' info (and, when given, the memory-pressure run's); what no run measured says so."""
    at_l = next(((b.get("extra_info") or {}).get("info") or {} for b in resume.get("benchmarks", [])
                 if (b.get("extra_info") or {}).get("L") == layer
                 and "djinn_ms" in ((b.get("extra_info") or {}).get("info") or {})), None)
    if at_l is None:
        return None
    edit_ok = [r.passed for r in claim_rows(resume) if r.claim == "edit_bitwise_equal_to_plain_forward_hook"]
    djinn_sessions = eager_sessions = "not measured"
    if pressure is not None:
        done, eager = [], None
        for b in pressure.get("benchmarks", []):
            extra = b.get("extra_info") or {}
            info = extra.get("info") or {}
            eager = info.get("eager", eager)
            verdicts = {r["claim"]: r["passed"] for r in extra.get("claims", [])}
            if extra.get("sessions") and verdicts.get("sessions_completed_fraction") and \
                    verdicts.get("sessions_with_tokens_unequal_to_solo_run"):
                done.append((int(extra["sessions"]), info.get("oversubscription")))
        if done:
            n, over = max(done)
            djinn_sessions = (f"{n} of {n}, all bitwise equal to solo runs (the largest N run; demand "
                              f"{_fmt(over)}x the VRAM budget)")
        if eager:
            eager_sessions = (f"{eager['sessions_held']} (out of memory at {eager['oom_at_session']}; "
                              f"{eager['predicted_sessions']} predicted from free memory)")
    editing = ("yes: edit at the checkpoint, bitwise equal to a forward hook" if edit_ok and all(edit_ok)
               else "edit claim failing" if edit_ok else "not measured")
    rows = [("Djinn (pause, swap, resume from L)", f"{_fmt(at_l['djinn_ms'])} ms", djinn_sessions, editing),
            ("eager PyTorch (everything kept on the GPU)", f"{_fmt(at_l['eager_ms'])} ms (nothing moves)",
             eager_sessions, "only by a hook inside a whole forward"),
            ("recompute (forward 0..L again)", f"{_fmt(at_l['recompute_ms'])} ms", "not measured",
             "only by a hook inside the recompute"),
            ("manual pinned offload (hidden state only)", f"{_fmt(at_l['manual_ms'])} ms", "not measured",
             "by hand; its KV is not restored")]
    lines = [f"| method | resume latency at L={layer} (median) | concurrent 2048-token sessions | state editing |",
             "|---|---|---|---|"]
    lines += [f"| {m} | {lat} | {n} | {e} |" for m, lat, n, e in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# several runs of one report: the spread of every claim over them

RUNS_DIR = "runs"  # beside a report: <folder>/runs/<stem>.run<N>.json
RUN_FILE = re.compile(r"^(?P<stem>.+)\.run(?P<n>[0-9]+)\.json$")
FIRST_RUN_FILE = 2  # the report's own JSON is run 1


def parse_run_file(path: str | Path) -> tuple[str, int] | None:
    """``(stem, N)`` of a run file named ``<stem>.run<N>.json``; ``None`` for any other name."""
    m = RUN_FILE.match(Path(path).name)
    return (m["stem"], int(m["n"])) if m else None


def discover_runs(json_path: str | Path) -> list[Path]:
    """The run files of the report ``json_path`` (``<its folder>/runs/<stem>.run<N>.json``), by run number: what
    :func:`write_report` folds into the report's spread when it is not given its runs."""
    json_path = Path(json_path)
    found = []
    for p in (json_path.parent / RUNS_DIR).glob(f"{glob.escape(json_path.stem)}.run*.json"):
        parsed = parse_run_file(p)
        if parsed is not None and parsed[0] == json_path.stem and p.is_file():
            found.append((parsed[1], p.name, p))
    return [p for _, _, p in sorted(found)]


@dataclass(frozen=True)
class RunProvenance:
    """One run of a report: its file's name and where and when it was measured."""

    file: str
    date: str | None
    commit: str | None
    gpu: str | None


def _shortfall(op: str, ratio: float, bound: float) -> float:
    """How near ``ratio`` comes to failing ``op bound``: larger is nearer, positive is past the bound (for ``<=`` how
    far the ratio lies above the bound, for ``>=`` how far below, for ``==`` how far from it). Used to pick the worst
    run; a NaN ratio (a claim that cannot pass) is the worst of all."""
    if op in ("<=", "<"):
        d = ratio - bound
    elif op in (">=", ">"):
        d = bound - ratio
    else:
        d = abs(ratio - bound)
    return math.inf if math.isnan(d) else d


@dataclass(frozen=True)
class SpreadRow:
    """One claim over the runs of a report: its recomputed row in each run (``None`` where a run did not record it,
    say because its test failed before recording) and the figures of the spread table."""

    key: str  # ClaimRow.key
    occurrence: int  # 1; n for the n-th record of one key within a run (a test that records a claim twice)
    claim: str
    params: dict[str, Any]
    kind: str
    unit: str
    op: str
    files: tuple[str, ...]  # every run's file, in run order
    rows: tuple[ClaimRow | None, ...]  # per run, in the order of ``files``

    @property
    def recorded(self) -> list[tuple[str, ClaimRow]]:
        """``(file, row)`` of the runs that recorded the claim."""
        return [(f, r) for f, r in zip(self.files, self.rows) if r is not None]

    @property
    def missing(self) -> list[str]:
        """The runs that did not record the claim."""
        return [f for f, r in zip(self.files, self.rows) if r is None]

    @property
    def runs_recorded(self) -> int:
        return len(self.recorded)

    @property
    def runs_passed(self) -> int:
        """Runs whose recomputed verdict passes (each run held to its own recorded bound)."""
        return sum(r.passed for _, r in self.recorded)

    @property
    def passed_every_run(self) -> bool:
        return self.runs_passed == len(self.files)

    @property
    def ratios(self) -> list[float]:
        """The ratio in every run that recorded the claim (the value itself for ``check`` and ``precondition``)."""
        return [r.ratio for _, r in self.recorded]

    def _finite(self) -> list[float]:
        return [x for x in self.ratios if not math.isnan(x)]

    @property
    def min(self) -> float:
        return min(self._finite(), default=math.nan)

    @property
    def median(self) -> float:
        finite = self._finite()
        return statistics.median(finite) if finite else math.nan

    @property
    def max(self) -> float:
        return max(self._finite(), default=math.nan)

    @property
    def bounds(self) -> list[float]:
        """The distinct bounds the runs held the claim to, ascending: one, unless the bound is derived from a figure of
        the run (a ceiling, a pool size)."""
        return sorted({r.bound for _, r in self.recorded})

    @property
    def headroom(self) -> float | None:
        """How far the worst run lies inside its bound, relative to the bound: for ``<=`` (bound - ratio) / |bound|,
        for ``>=`` (ratio - bound) / |bound|; negative past it. None for ``==`` claims and a bound of 0 (no relative
        measure)."""
        _, row = self.worst
        if self.op not in ("<=", "<", ">=", ">") or row.bound == 0 or math.isnan(row.ratio):
            return None
        return -_shortfall(self.op, row.ratio, row.bound) / abs(row.bound)

    @property
    def swing(self) -> float:
        """(max - min) of the ratio over the runs, relative to the worst run's bound (0 when the runs agree)."""
        bound = self.worst[1].bound
        return (self.max - self.min) / abs(bound) if bound else math.nan

    @property
    def worst(self) -> tuple[str, ClaimRow]:
        """``(file, row)`` of the run closest to failing, or failing: a failing run first, then by the op (for ``<=``
        the ratio farthest above its bound, the largest when the bound is one; for ``>=`` the farthest below, the
        smallest; for ``==`` the farthest from it); the earliest on a tie."""
        return max(self.recorded, key=lambda fr: (not fr[1].passed, _shortfall(self.op, fr[1].ratio, fr[1].bound)))


@dataclass(frozen=True)
class RunSpread:
    """The runs of one report at one clean commit, and the spread of each claim over them (first the report's own
    claims in its order, then any that only later runs recorded)."""

    runs: tuple[RunProvenance, ...]
    commit: str
    rows: tuple[SpreadRow, ...]

    @property
    def passed_every_run(self) -> list[SpreadRow]:
        return [r for r in self.rows if r.passed_every_run]


def _keyed_rows(rows: list[ClaimRow]) -> dict[tuple[str, int], ClaimRow]:
    """A run's rows by ``(ClaimRow.key, n)``, n counting the records of one key in recording order, so that the n-th
    record of a key a test records more than once is compared with the n-th of every other run (one commit, one code
    path)."""
    seen: dict[str, int] = {}
    keyed = {}
    for r in rows:
        seen[r.key] = seen.get(r.key, 0) + 1
        keyed[(r.key, seen[r.key])] = r
    return keyed


def run_spread(main_json: str | Path, run_jsons: Sequence[str | Path]) -> RunSpread:
    """Recompute every claim of the report ``main_json`` (run 1) and of its ``run_jsons`` (runs 2...), and give each
    claim's spread over them.

    The files must be runs of one report: pytest-benchmark JSONs measured at the same commit, each on a clean tree (a
    dirty tree ran code that is not the commit it names, so its figures cannot count towards that commit), on the
    same GPU(s). A run that lacks a claim (its test failed before recording it) is listed as missing for that claim,
    not refused. :class:`ConfigError` names the file and the reason otherwise."""
    paths = [Path(main_json), *(Path(p) for p in run_jsons)]
    seen_paths: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen_paths:
            raise ConfigError(f"{p} is named twice among the runs of {paths[0]} (as {seen_paths[p.resolve()]}): "
                              "a run would count twice")
        seen_paths[p.resolve()] = p
    datas = [load_benchmark_json(p) for p in paths]
    provs = [provenance(d) for d in datas]
    main_prov = provs[0]
    if not main_prov.get("commit"):
        raise ConfigError(f"{paths[0]} names no commit: its runs cannot be shown to be of one commit")
    for p, prov in zip(paths, provs):
        if prov.get("commit") != main_prov["commit"]:
            raise ConfigError(f"{p} was measured at commit {prov.get('commit')}, {paths[0]} at {main_prov['commit']}: "
                              "runs of one report must share one commit")
        if prov.get("commit_dirty") is not False:
            raise ConfigError(f"{p} was measured on a tree whose state is dirty={prov.get('commit_dirty')!r} (commit "
                              f"{prov.get('commit')}): the code that ran is not the commit it names, so it is no run "
                              "of that commit")
        for field in ("gpu", "gpu_count"):
            if prov.get(field) != main_prov.get(field):
                raise ConfigError(f"{p} ran with {field}={prov.get(field)!r}, {paths[0]} with "
                                  f"{main_prov.get(field)!r}: runs of one report must share one machine")
    files = tuple(p.name for p in paths)
    keyed = [_keyed_rows(claim_rows(d)) for d in datas]
    order: dict[tuple[str, int], None] = {}
    for k in keyed:
        order.update(dict.fromkeys(k))
    spread_rows = []
    for key, occurrence in order:
        per_run = tuple(k.get((key, occurrence)) for k in keyed)
        present = [r for r in per_run if r is not None]
        first = present[0]
        ops = {r.op for r in present}
        if len(ops) > 1:
            raise ConfigError(f"{key} is held to {' and '.join(sorted(ops))} in different runs: the runs did not run "
                              "the same code")
        spread_rows.append(SpreadRow(key, occurrence, first.claim, first.params, first.record["kind"], first.unit,
                                     first.op, files, per_run))
    runs = tuple(RunProvenance(p.name, prov.get("date"), prov.get("commit"), prov.get("gpu"))
                 for p, prov in zip(paths, provs))
    return RunSpread(runs, main_prov["commit"], tuple(spread_rows))


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def spread_section(spread: RunSpread) -> str:
    """The report's "Spread over N runs" section: a sentence (runs, commit, dates, claims that passed in every run),
    a line per run, and a table with a row per claim: runs passed / recorded, min, median and max of the ratio (the
    value for ``check`` and ``precondition`` claims), the bound, and the run closest to failing."""
    n = len(spread.runs)
    rows = spread.rows
    everywhere = len(spread.passed_every_run)
    dates = _and([_fmt(r.date) or "no date" for r in spread.runs])
    sentence = (f"{n} runs of this report at commit {spread.commit} (clean tree), dated {dates}: {everywhere} of "
                f"{len(rows)} claims passed in every run")
    n_missing = sum(bool(r.missing) for r in rows)
    n_failed = sum(r.runs_passed < r.runs_recorded for r in rows)
    if n_failed:
        sentence += f"; {n_failed} failed in at least one run"
    if n_missing:
        sentence += f"; {n_missing} not recorded in every run"
    lines = [f"## Spread over {n} runs", "",
             sentence + ". Every verdict is recomputed from each run's raw statistics, each run held to its own "
                        "recorded bound.", ""]
    lines += [f"- run {i}: `{r.file}`, date {_fmt(r.date) or 'none'}, commit {_fmt(r.commit) or 'none'}"
              for i, r in enumerate(spread.runs, 1)]
    lines += ["", "| claim | parameters | runs passed / recorded | min | median | max | bound | worst run |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r.params.items()) or "none"
        claim = f"{r.claim} (record {r.occurrence})" if r.occurrence > 1 else r.claim
        counts = f"{r.runs_passed} / {r.runs_recorded}"
        if r.missing:
            counts += " (not recorded in " + ", ".join(f"`{f}`" for f in r.missing) + ")"
        absolute = r.kind in ("check", "precondition")
        unit = f" {r.unit}" if absolute and r.unit else ""
        bound = " or ".join(_fmt(b) for b in r.bounds)
        bound = f"{r.op} {bound}{unit}" if absolute else f"ratio {r.op} {bound}"
        worst_file, worst = r.worst
        worst_cell = f"`{worst_file}` ({_fmt(worst.ratio)}{unit}{'' if worst.passed else ', **FAIL**'})"
        lines.append(f"| {claim} | {params} | {counts} | {_fmt(r.min)}{unit} | {_fmt(r.median)}{unit} "
                     f"| {_fmt(r.max)}{unit} | {bound} | {worst_cell} |")
    lines += margins_lines(spread)
    return "\n".join(lines) + "\n"


NEAREST = 8  # rows of the "nearest their bounds" table


def margins_lines(spread: RunSpread, top: int = NEAREST) -> list[str]:
    """The ``top`` claims whose worst run lies nearest its bound (relative headroom; ``<=`` and ``>=`` claims with a
    nonzero bound), with how far the runs swung: a claim whose swing is as large as its headroom may fail on the next
    run. Empty when no claim has a relative headroom."""
    rated = sorted(((r.headroom, r) for r in spread.rows if r.headroom is not None), key=lambda hr: hr[0])[:top]
    if not rated:
        return []
    lines = ["", f"Nearest their bounds over the {len(spread.runs)} runs (headroom: how far the worst run lies inside "
                 "its bound, relative to the bound; swing: max - min over the runs, relative to the bound):", "",
             "| claim | parameters | worst run | bound | headroom | swing | note |", "|---|---|---|---|---|---|---|"]
    for headroom, r in rated:
        params = ", ".join(f"{k}={v}" for k, v in r.params.items()) or "none"
        worst_file, worst = r.worst
        if headroom < 0:
            note = "failed"
        elif r.swing >= headroom and r.swing > 0:
            note = "**the swing is as large as the headroom: it may fail on the next run**"
        elif r.swing == 0 and not r.missing:
            note = "the same in every run"
        else:
            note = ""
        if r.missing:  # its swing covers only the runs that recorded it
            note = "; ".join(filter(None, [note, f"recorded in {r.runs_recorded} of {len(spread.runs)} runs"]))
        lines.append(f"| {r.claim} | {params} | `{worst_file}` ({_fmt(worst.ratio)}) | {r.op} {_fmt(worst.bound)} "
                     f"| {headroom:+.1%} | {r.swing:.1%} | {note} |")
    return lines


def write_report(json_path: str | Path, out_dir: str | Path | None = None, name: str | None = None,
                 runs: Sequence[str | Path] | None = None) -> Path:
    """Write ``<out_dir>/<name>.md`` (and its PNG plots) for a pytest-benchmark JSON file. Returns the .md path.

    ``runs``: further runs of the same report (:func:`run_spread` says what makes them so), recorded in a "Spread over
    N runs" section; ``None`` takes those :func:`discover_runs` finds beside the JSON, an empty list none. Without
    runs the report is the JSON's alone."""
    json_path = Path(json_path)
    data = load_benchmark_json(json_path)
    runs = discover_runs(json_path) if runs is None else list(runs)
    spread = run_spread(json_path, runs) if runs else None
    out_dir = Path(out_dir) if out_dir else json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or json_path.stem
    rows = claim_rows(data)
    prov = provenance(data)
    plots = report_plots(data, rows, out_dir, name)
    n_fail = sum(not r.passed for r in rows)
    lines = [f"# Report: {name}", "",
             f"Source: `{json_path.name}`. {len(rows)} claims, {len(rows) - n_fail} pass, {n_fail} fail. "
             "Every verdict is recomputed from the raw statistics in the JSON.", "",
             "## Claims", "", claims_table(rows) if rows else "No claims recorded.\n"]
    if spread is not None:
        lines += [spread_section(spread)]
    lines += ["## Provenance", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in prov.items() if v is not None and v != ""]
    lines += parts_lines(data)
    pressure_path = json_path.parent / PRESSURE_JSON
    caps = capabilities_table(data, load_benchmark_json(pressure_path) if pressure_path.exists() else None)
    if caps:
        lines += ["", "## Capabilities", "",
                  f"Latencies from this run; session counts from `{PRESSURE_JSON}` beside it when present.", "", caps]
    if n_fail:
        lines += ["", "## Failing claims", ""]
        lines += [f"- {describe(r.record)}" for r in rows if not r.passed]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    log.info("wrote %s (%d claims, %d plots%s)", md, len(rows), len(plots),
             f", spread over {len(spread.runs)} runs" if spread else "")
    return md
