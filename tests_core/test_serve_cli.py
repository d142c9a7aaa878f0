"""``djinn serve`` with bad input: a one-line typed error and a non-zero exit, never a traceback."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from djinn_core.cli import main
from djinn_core.rpc.cli import parse_bytes, read_token

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]


def test_a_missing_token_file_is_a_one_line_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-token"
    proc = subprocess.run([sys.executable, "-m", "djinn_core.cli", "serve", "--model", "llama-tiny",
                           "--token-file", str(missing)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out and str(missing) in out, out
    assert len([line for line in out.splitlines() if line.strip()]) == 1, out


@pytest.mark.parametrize("content, match", [(None, "cannot read"), (b"", "empty"), (b"\xff\xfe\x00", "cannot read")],
                         ids=["directory", "empty", "not text"])
def test_unreadable_token_files_are_config_errors(tmp_path, content, match):
    path = tmp_path / "token"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    from djinn_core.errors import ConfigError

    with pytest.raises(ConfigError, match=match) as ei:
        read_token(str(path))
    assert str(path) in str(ei.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_without_a_gpu_is_device_unavailable(caplog):
    with caplog.at_level(logging.ERROR):
        rc = main(["serve", "--model", "llama-tiny", "--device", "cuda", "--port", "0"])
    assert rc == 2
    assert any("no CUDA GPU" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("argv, match", [
    (["--port", "70000"], "port"),
    (["--idle-timeout-s", "nan"], "idle_timeout_s"),
    (["--busy-poll-s", "inf"], "busy_poll_s"),
    (["--max-sessions", "0"], "max_sessions"),
    (["--local-channel-bytes", "100"], "local_channel_bytes"),
    (["--token-file", "/"], "cannot read the token file /"),
    (["--host", "0.0.0.0"], "token"),
    (["--dtype", "int8", "--device", "cpu"], "dtype"),
    (["--model", "no-such-model", "--device", "cpu"], "neither"),
])
def test_bad_serve_arguments_are_typed_errors(argv, match, caplog):
    base = ["--model", "llama-tiny", "--port", "0"]
    with caplog.at_level(logging.ERROR):
        rc = main(["serve", *base, *argv])
    assert rc == 2
    assert any(match in r.getMessage() for r in caplog.records), caplog.text


def test_byte_counts_parse_and_absurd_ones_are_refused():
    import argparse

    assert parse_bytes("4GiB") == 4 << 30 and parse_bytes("512M") == 512 << 20 and parse_bytes("1048576") == 1 << 20
    for bad in ("1e400", "nan", "-1", "4TB", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bytes(bad)


def test_the_serve_parser_loads_without_torch_zmq_or_transformers():
    code = ("import sys, argparse; from djinn_core.rpc.cli import add_serve_parser; "
            "add_serve_parser(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('torch', 'zmq', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_an_unknown_reply_wait_is_refused_by_the_config_and_the_cli(capsys):
    from djinn_core.errors import ConfigError
    from djinn_core.rpc.config import ServerConfig

    assert ServerConfig(reply_wait="block").reply_wait == "block"
    with pytest.raises(ConfigError, match="reply_wait"):
        ServerConfig(reply_wait="sleep")
    with pytest.raises(SystemExit):  # argparse's choices: a usage error naming them
        main(["serve", "--model", "llama-tiny", "--port", "0", "--reply-wait", "sleep"])
    assert "poll" in capsys.readouterr().err
