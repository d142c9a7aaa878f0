"""The diagnostic probes (``djinn probe NAME``): every one imports against the library as it is now, declares where
it runs and parses its own arguments; the cheap CPU ones run end to end."""

import importlib.util
from pathlib import Path

import pytest

from djinn_core.bench import probes
from djinn_core.cli import main

pytestmark = pytest.mark.cpu

EXPECTED = {"cold_after_spin", "cpu_speed", "determinism", "host_wake", "launch_under_dma", "next_token",
            "next_token_host", "restore_depth", "resume_host", "rpc_host", "rpc_placement", "rpc_spin", "launch_after_spin", "wire_cost", "zmq_idle"}


def test_the_probe_list_is_what_the_package_holds():
    assert set(probes.names()) == EXPECTED
    listing = probes.listing()
    assert all(f"{name} [" in listing for name in EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_probe_imports_and_parses_its_defaults(name):
    module = probes.load(name)
    assert module.DEVICE in ("cpu", "cuda")
    assert module.__doc__ and callable(module.run)
    probes.parser(name, module).parse_args([])  # every argument has a default


def test_no_probe_imports_a_test_file_or_the_old_scripts():
    for name in EXPECTED:
        source = importlib.util.find_spec(f"djinn_core.bench.probes.{name}").origin
        text = Path(source).read_text()
        assert "tests_exp" not in text and "scripts." not in text, name


def test_a_cpu_probe_runs_end_to_end(capsys):
    assert main(["probe", "wire_cost", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "read_reply + decode" in out and "encode_header" in out
