"""Diagnostic probes: one-off measurements that explain a claim's figure, run as ``djinn probe NAME [ARGS]``.

Each probe is a module here with a docstring (its first paragraph is its summary), ``DEVICE`` (``"cpu"``: runs anywhere;
``"cuda"``: needs a CUDA GPU), ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Probes print
their figures to stdout; they use only the library's public API and the experiments
(:mod:`djinn_core.bench.experiments`). What they found, and on which machine, is in ``reports/h100/probes/`` and
``docs/notes/bench.md``. Listing the probes imports none of them (no torch).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
import textwrap
from pathlib import Path
from types import ModuleType

from djinn_core.errors import ConfigError, DeviceUnavailable

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """Every probe's name, sorted (modules of this package not starting with ``_``)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if not m.name.startswith("_"))


def _summary(name: str) -> tuple[str, str]:
    """(the docstring's first paragraph, DEVICE) read from the module's source without importing it."""
    tree = ast.parse((HERE / f"{name}.py").read_text())
    doc = [" ".join((ast.get_docstring(tree) or "").split("\n\n")[0].split())]
    device = next((node.value.value for node in tree.body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "DEVICE" for t in node.targets)
                   and isinstance(node.value, ast.Constant)), "?")
    return (doc[0] if doc else ""), device


def listing() -> str:
    """One entry per probe: name, the device it needs, summary."""
    rows = []
    for name in names():
        summary, device = _summary(name)
        rows.append(f"  {name} [{device}]\n" + textwrap.fill(summary, 100, initial_indent=" " * 4,
                                                            subsequent_indent=" " * 4))
    return "probes (djinn probe NAME --help):\n" + "\n".join(rows)


def load(name: str) -> ModuleType:
    """The probe module ``name``; :class:`ConfigError` naming the known ones otherwise."""
    if name not in names():
        raise ConfigError(f"no probe named {name!r}; known: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")


def parser(name: str, module: ModuleType | None = None) -> argparse.ArgumentParser:
    """The probe's argument parser (``prog`` is ``djinn probe NAME``)."""
    module = module or load(name)
    p = argparse.ArgumentParser(prog=f"djinn probe {name}", description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    return p


def run(name: str, argv: list[str]) -> int:
    """Parse ``argv`` with the probe's parser and run it; :class:`DeviceUnavailable` when it needs a GPU this machine
    lacks."""
    module = load(name)
    args = parser(name, module).parse_args(argv)
    if module.DEVICE == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"probe {name} needs a CUDA GPU; this machine has none")
    return int(module.run(args) or 0)
