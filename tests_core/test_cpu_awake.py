"""cpu_awake.py: the keep-awake loops start pinned and SCHED_IDLE, stop (also with their parent), and bad CPU sets
are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import djinn_core

from djinn_core.cpu_awake import CpuAwake
from djinn_core.errors import ConfigError

pytestmark = [pytest.mark.cpu,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keep-awake loops need Linux")]


def _children(awake: CpuAwake) -> list[int]:
    return [p.pid for p in awake._procs]


def test_loops_run_one_per_cpu_pinned_and_idle_class_then_stop():
    cpu = sorted(os.sched_getaffinity(0))[0]
    with CpuAwake([cpu]) as awake:
        assert awake.running and awake.cpus == [cpu]
        (pid,) = _children(awake)
        assert os.sched_getaffinity(pid) == {cpu}
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    assert not awake.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_default_covers_every_allowed_cpu_and_stop_is_idempotent():
    awake = CpuAwake()
    assert awake.cpus == sorted(os.sched_getaffinity(0))
    awake.start()
    try:
        assert len(_children(awake)) == len(awake.cpus)
    finally:
        awake.stop()
        awake.stop()
    assert not awake.running


@pytest.mark.parametrize("cpus", [[], [10_000], [True]])
def test_bad_cpu_sets_are_config_errors(cpus):
    with pytest.raises(ConfigError):
        CpuAwake(cpus)


def test_loops_die_with_the_process_that_started_them():
    code = ("import os, sys, time; from djinn_core.cpu_awake import CpuAwake; "
            "a = CpuAwake([sorted(os.sched_getaffinity(0))[0]]).start(); "
            "print(a._procs[0].pid, flush=True); os._exit(0)")  # no stop(): only the parent's death ends the loop
    root = str(Path(djinn_core.__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": root}, check=True)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("a keep-awake loop outlived its parent")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
