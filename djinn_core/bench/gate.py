"""What the CI gate asks of a committed report (``tests_core/test_committed_reports.py``): provenance that names its
machine, a GPU that matches the folder it sits in, and a clean tree.

A results folder is named after the machine that measured it (:data:`FOLDER_GPUS`): ``reports/h200/`` holds JSONs
whose ``machine_info`` names one H200, ``reports/h200x2/`` two. A report measured on a dirty tree (uncommitted
changes: the code that ran is not the commit it names) is refused unless it is listed as known history by the caller.

Further runs of a report sit in ``reports/<gpu>/runs/<stem>.run<N>.json`` (:func:`run_problems`): each names a
committed report ``reports/<gpu>/<stem>.json``, was measured at its commit on a clean tree (no history excuses a dirty
run) and on the GPU(s) of the folder and of that report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection

from djinn_core.bench.report import FIRST_RUN_FILE, RUNS_DIR, parse_run_file, provenance

# results folder -> (substring of the GPU name every report in it must carry, number of GPUs)
FOLDER_GPUS: dict[str, tuple[str, int]] = {"h100": ("H100", 1), "h200": ("H200", 1), "h200x2": ("H200", 2),
                                           "h200x4": ("H200", 4)}
REQUIRED_PROVENANCE = ("gpu", "driver", "torch", "transformers", "commit", "date")


def report_key(path: Path) -> str:
    """``<folder>/<file>`` of a committed report, the key of known-history lists."""
    return f"{path.parent.name}/{path.name}"


def provenance_problems(path: Path, data: dict[str, Any], *, known_dirty: Collection[str] = ()) -> list[str]:
    """Why the report at ``path`` (its JSON ``data``) cannot stand as committed evidence; empty when it can.

    ``known_dirty``: :func:`report_key` of reports measured on a dirty tree that are kept as history."""
    prov = provenance(data)
    problems = [f"provenance lacks {f}" for f in REQUIRED_PROVENANCE if not prov.get(f)]
    folder = path.parent.name
    if folder not in FOLDER_GPUS:
        problems.append(f"results folder {folder!r} names no known machine ({', '.join(sorted(FOLDER_GPUS))})")
    else:
        name, count = FOLDER_GPUS[folder]
        if name not in (prov.get("gpu") or ""):
            problems.append(f"not an {name} run ({prov.get('gpu')})")
        if prov.get("gpu_count") != count:
            problems.append(f"{folder} holds runs on {count} GPU(s); this one saw {prov.get('gpu_count')}")
    dirty = prov.get("commit_dirty")
    if dirty is not False and not (dirty is True and report_key(path) in known_dirty):
        problems.append(f"measured on a tree whose state is dirty={dirty!r} (commit {prov.get('commit')}): the code "
                        "that ran is not the commit it names")
    return problems


def main_report_path(run_path: Path) -> Path | None:
    """The report ``<folder>/<stem>.json`` that the run file ``<folder>/runs/<stem>.run<N>.json`` is a run of;
    ``None`` when the file's name or place is not a run file's."""
    parsed = parse_run_file(run_path)
    if parsed is None or run_path.parent.name != RUNS_DIR:
        return None
    return run_path.parent.parent / f"{parsed[0]}.json"


def run_problems(run_path: Path, run_data: dict[str, Any], main_data: dict[str, Any] | None) -> list[str]:
    """Why the run file at ``run_path`` (its JSON ``run_data``) cannot stand as a further run of the report whose JSON
    is ``main_data`` (``None``: that report is not there); empty when it can.

    A run carries the provenance a report must (:func:`provenance_problems`, judged in the report's folder, with no
    dirty history excused), is named ``<stem>.run<N>.json`` with N from 2 (the report is run 1) in its folder's
    ``runs/``, and shares the report's commit and GPU(s) on a clean tree: only then do the two count as runs of one
    commit."""
    parsed = parse_run_file(run_path)
    main_path = main_report_path(run_path)
    if parsed is None or main_path is None:
        return [f"{run_path.name} is not named <stem>.run<N>.json inside a {RUNS_DIR}/ folder"]
    problems = []
    if parsed[1] < FIRST_RUN_FILE:
        problems.append(f"run number {parsed[1]}: run files count from {FIRST_RUN_FILE} (the report itself is run 1)")
    problems += provenance_problems(main_path.parent / run_path.name, run_data)
    if main_data is None:
        return problems + [f"names report {report_key(main_path)}, which is not committed"]
    run, main = provenance(run_data), provenance(main_data)
    if run.get("commit") != main.get("commit"):
        problems.append(f"measured at commit {run.get('commit')}, its report {report_key(main_path)} at "
                        f"{main.get('commit')}")
    if main.get("commit_dirty") is not False:
        problems.append(f"its report {report_key(main_path)} was measured on a tree whose state is "
                        f"dirty={main.get('commit_dirty')!r}: runs must share one clean commit")
    for field in ("gpu", "gpu_count"):
        if run.get(field) != main.get(field):
            problems.append(f"ran with {field}={run.get(field)!r}, its report with {main.get(field)!r}")
    return problems
