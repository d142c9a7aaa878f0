"""The experiments behind the claims are library code: importable without pytest, importing no test file or
fixture; and no test file imports another test file."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import djinn_core.bench.experiments as experiments

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parent.parent
TEST_DIRS = ("tests_core", "tests_exp2", "tests_exp3")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_test_file_imports_another_test_file():
    test_modules = {p.stem for d in TEST_DIRS for p in (ROOT / d).glob("*.py")}
    offenders = {}
    for d in TEST_DIRS:
        for path in (ROOT / d).glob("*.py"):
            bad = {m for m in _imported_modules(path)
                   if m.split(".")[0] in TEST_DIRS or m.split(".")[0] in test_modules}
            if bad:
                offenders[f"{d}/{path.name}"] = sorted(bad)
    assert not offenders, offenders


@pytest.mark.parametrize("name", [m.name for m in pkgutil.iter_modules(experiments.__path__)])
def test_every_experiment_is_library_code(name):
    module = importlib.import_module(f"djinn_core.bench.experiments.{name}")
    imported = _imported_modules(Path(module.__file__))
    assert not {m for m in imported if m.split(".")[0] in ("pytest", "fixtures", "conftest", *TEST_DIRS)}, imported

