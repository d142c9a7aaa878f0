import json
import logging
import subprocess
import sys

import pytest

from djinn_core.bench.profiles import detect_profile, profile_missing_reason
from djinn_core.cli import build_parser, main

pytestmark = pytest.mark.cpu

ROOT_IMPORTS_NOTHING_HEAVY = """
import sys
from djinn_core.cli import build_parser
build_parser().format_help()
heavy = sorted(m for m in ("torch", "transformers", "zmq", "matplotlib") if m in sys.modules)
print(",".join(heavy))
"""


def test_the_cli_module_and_its_help_import_neither_torch_nor_the_rpc_stack():
    out = subprocess.run([sys.executable, "-c", ROOT_IMPORTS_NOTHING_HEAVY], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at `djinn --help`: {out.stdout.strip()}"


def test_djinn_help_answers_in_a_subprocess_and_names_every_command():
    out = subprocess.run([sys.executable, "-m", "djinn_core.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("run", "report", "info", "probe", "serve"):
        assert cmd in out.stdout
    assert build_parser().prog == "djinn"


def test_profile_detection_matches_the_hardware():
    import torch

    assert detect_profile() in ("cpu", "gpu", "h100")
    if not torch.cuda.is_available():
        assert detect_profile() == "cpu"
        assert "CUDA GPU" in profile_missing_reason("gpu") and "CUDA GPU" in profile_missing_reason("h100")
    assert profile_missing_reason("cpu") is None


def test_djinn_run_refuses_a_profile_the_hardware_cannot_run(caplog, tmp_path):
    if profile_missing_reason("h100") is None:
        pytest.skip("this machine can run the h100 profile")
    with caplog.at_level(logging.ERROR, logger="djinn_core.cli"):
        assert main(["run", "--profile", "h100", "--out", str(tmp_path)]) == 2
    assert "nothing was run" in caplog.text and "needs" in caplog.text
    assert not list(tmp_path.iterdir()), "no suite ran, so nothing was written"


def test_djinn_info_prints_machine_facts(capsys):
    assert main(["info"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["packages"]["transformers"] == "5.17.0"
    assert "host_memory" in facts


def test_djinn_report_reports_bad_input_clearly(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="djinn_core.cli"):
        assert main(["report", str(tmp_path / "nope.json")]) == 2
    assert "no such benchmark JSON" in caplog.text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"machine_info": {}, "benchmarks": [{"extra_info": {"claims": [{"claim": "x"}]}}]}))
    assert main(["report", str(bad)]) == 2
    assert "claim 'x'" in caplog.text
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"machine_info": {}, "benchmarks": []}))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["report", str(good), "--out-dir", str(blocker / "sub")]) == 2  # cannot write there: said, not raised


def test_djinn_run_outside_a_checkout_is_a_clear_error(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="djinn_core.cli"):
        assert main(["run", "--profile", "cpu", "--root", str(tmp_path)]) == 2
    assert "not a Djinn checkout" in caplog.text


def test_unknown_arguments_are_refused_except_where_a_subcommand_takes_them(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--bogus"])
    assert e.value.code == 2 and "--bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # serve hands the rest to its own parser, which wants --model
        main(["serve"])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err


def test_djinn_probe_lists_the_probes_and_refuses_unknown_ones(capsys, caplog):
    assert main(["probe", "--list"]) == 0
    out = capsys.readouterr().out
    assert "wire_cost [cpu]" in out and "determinism [cuda]" in out
    with caplog.at_level(logging.ERROR, logger="djinn_core.cli"):
        assert main(["probe", "no_such_probe"]) == 2
    assert "no probe named 'no_such_probe'" in caplog.text
