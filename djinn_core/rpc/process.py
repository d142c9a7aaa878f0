"""``djinn serve`` in a child process, for scripts and tests (:class:`ServerProcess`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from djinn_core.errors import ConfigError

log = logging.getLogger(__name__)

READY_PREFIX = "djinn serve:"  # the line ``djinn serve`` prints once bound; it ends with the address


class ServerProcess:
    """``djinn serve`` in a child process (its own interpreter, GIL and CUDA context), for scripts and tests.

    ``ServerProcess(["--model", "llama-tiny", "--device", "cpu"])`` starts it on a free port and waits (at most
    ``start_timeout_s``) for its address; ``stop()`` sends SIGTERM and waits for a clean exit (SIGKILL after
    ``stop_timeout_s``). The child's output is drained on a thread (kept in :attr:`output`), so it never blocks on a
    full pipe. Use as a context manager.
    """

    def __init__(self, args: list[str], *, start_timeout_s: float = 300.0, stop_timeout_s: float = 60.0,
                 cwd: str | Path | None = None, env: dict[str, str] | None = None):
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "djinn_core.cli", "serve", "--port", "0", *args]
        self.stop_timeout_s = stop_timeout_s
        self.output: list[str] = []
        self.address: str | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(cmd, cwd=cwd or root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._reader = threading.Thread(target=self._drain_output, name="djinn-serve-output", daemon=True)
        self._reader.start()
        if not self._ready.wait(start_timeout_s) or self.address is None:
            self.stop()
            raise ConfigError(f"djinn serve did not start within {start_timeout_s:g} s:\n{''.join(self.output[-40:])}")

    def _drain_output(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if self.address is None and line.startswith(READY_PREFIX):
                self.address = line.rsplit(" ", 1)[-1].strip()
                self._ready.set()
        self._ready.set()  # the child exited (before or after starting)

    def stop(self) -> int:
        """SIGTERM, wait for exit (SIGKILL after ``stop_timeout_s``); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("djinn serve did not stop within %.0f s: killed", self.stop_timeout_s)
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
