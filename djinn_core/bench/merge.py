"""One report from several pytest processes: a report whose tests take longer than one call on a lent GPU (600 s)
runs as parts (``pytest -k`` selections of the same files, each its own JSON), and ``djinn merge`` joins them.

The parts must share what makes them one measurement: the commit and its tree state, the GPU model, the driver, torch,
the VRAM budget, and no test may appear in two parts. The merged JSON keeps the first part's machine and commit
blocks and records every part (file, date, host, GPU UUID, tests) under ``machine_info["djinn"]["parts"]``, so the
report and the CI gate see one pytest-benchmark JSON and the provenance still says how it was made. Parts measured on
different machines of the same kind are allowed and named.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

from djinn_core.bench.report import load_benchmark_json
from djinn_core.errors import ConfigError

# what must be equal across parts: (label, getter)
_SAME = (
    ("commit", lambda d: (d.get("commit_info") or {}).get("id")),
    ("tree state (dirty)", lambda d: (d.get("commit_info") or {}).get("dirty")),
    ("GPU", lambda d: _facts(d).get("gpu_name")),
    ("driver", lambda d: _facts(d).get("driver")),
    ("torch", lambda d: _facts(d).get("torch_version")),
    ("VRAM budget", lambda d: (_facts(d).get("vram_budget") or {}).get("bytes")),
)


def _facts(data: dict[str, Any]) -> dict[str, Any]:
    return (data.get("machine_info") or {}).get("djinn") or {}


def merge_parts(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The parts' pytest-benchmark JSONs joined into one (see the module doc); :class:`ConfigError` naming what
    differs, or a test measured twice."""
    if len(paths) < 2:
        raise ConfigError("merge needs at least two parts")
    parts = [(Path(p), load_benchmark_json(p)) for p in paths]
    first_path, first = parts[0]
    for label, get in _SAME:
        want = get(first)
        for path, data in parts[1:]:
            if get(data) != want:
                raise ConfigError(f"{path} differs from {first_path} in its {label}: {get(data)!r} against {want!r}")
    merged = copy.deepcopy(first)
    merged["benchmarks"] = []
    seen: dict[str, Path] = {}
    records = []
    for path, data in parts:
        names = []
        for bench in data.get("benchmarks", []):
            name = bench.get("fullname") or bench.get("name")
            if name in seen:
                raise ConfigError(f"{name} is measured in both {seen[name]} and {path}")
            seen[name] = path
            names.append(name)
            merged["benchmarks"].append(bench)
        facts = _facts(data)
        records.append({"file": path.name, "datetime": data.get("datetime"), "node": (data.get("machine_info") or {})
                        .get("node"), "gpu_uuid": facts.get("gpu_uuid"), "tests": names})
    merged.setdefault("machine_info", {}).setdefault("djinn", {})["parts"] = records
    dates = [str(r["datetime"]) for r in records if r["datetime"]]
    merged["datetime"] = min(dates) if dates else first.get("datetime")
    return merged


def write_merged(paths: Sequence[str | Path], out: str | Path) -> Path:
    """:func:`merge_parts` written to ``out``; returns its path."""
    out = Path(out)
    out.write_text(json.dumps(merge_parts(paths), indent=1))
    return out


__all__ = ["merge_parts", "write_merged"]
