"""What the CI gate asks of a committed report (``tests_core/test_committed_reports.py``): provenance that names its
machine, a GPU that matches the folder it sits in, and a clean tree.

A results folder is named after the machine that measured it (:data:`FOLDER_GPUS`): ``reports/h200/`` holds JSONs
whose ``machine_info`` names one H200, ``reports/h200x2/`` two. A report measured on a dirty tree (uncommitted
changes: the code that ran is not the commit it names) is refused unless it is listed as known history by the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection

from djinn_core.bench.report import provenance

# results folder -> (substring of the GPU name every report in it must carry, number of GPUs)
FOLDER_GPUS: dict[str, tuple[str, int]] = {"h100": ("H100", 1), "h200": ("H200", 1), "h200x2": ("H200", 2)}
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
