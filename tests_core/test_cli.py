import json
import subprocess
import sys

import pytest

from djinn_core.cli import build_parser, detect_profile, main

pytestmark = pytest.mark.cpu


def test_profile_detection_matches_the_hardware():
    import torch

    assert detect_profile() == ("cpu" if not torch.cuda.is_available() else detect_profile())


def test_djinn_info_prints_machine_facts(capsys):
    assert main(["info"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["packages"]["transformers"] == "5.17.0"
    assert "host_memory" in facts


def test_djinn_report_reports_bad_input_clearly(tmp_path):
    assert main(["report", str(tmp_path / "nope.json")]) == 2


def test_djinn_run_outside_a_checkout_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not a Djinn checkout"):
        main(["run", "--root", str(tmp_path)])


def test_console_script_is_declared():
    assert build_parser().prog == "djinn"
    out = subprocess.run([sys.executable, "-m", "djinn_core.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "run" in out.stdout and "report" in out.stdout
