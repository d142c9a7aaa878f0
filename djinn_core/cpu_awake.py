"""Keep CPUs from going idle with lowest-priority busy loops, so a thread woken on them starts at once.

An RPC reply crosses two ZeroMQ I/O threads (the server's and the client's) that sleep in ``epoll`` while the server
computes. On the lent H100's host (a virtual machine) the wake-up after a millisecond or more of idleness is slow:
``scripts/probe_zmq_idle.py`` (2026-11-27) measured raw ZeroMQ's one-way TCP latency of a 128 KiB message at
0.11 ms right after the sender's last one, 0.28-0.32 ms after the sender was busy 1.3-20 ms, and 0.13-0.17 ms after
the same waits with one ``SCHED_IDLE`` loop per CPU, as here. Holding PM QoS at 0 us left the 20 ms case at 0.28 ms.

Each loop is a separate process (a Python loop in a thread would take the GIL) pinned to one CPU and scheduled
``SCHED_IDLE``: it runs only when nothing else wants that CPU, so it takes no time from real work, but the CPU never
halts. The price is power: every covered CPU runs flat out. The loops die with the process that started them
(``PR_SET_PDEATHSIG``, and a parent check as a fallback) and on :meth:`CpuAwake.stop`. Linux only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Iterable

from .errors import ConfigError

log = logging.getLogger(__name__)

_LOOP = r"""
import ctypes, os, sys
cpu, parent = int(sys.argv[1]), int(sys.argv[2])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL
except Exception:
    pass
if os.getppid() != parent:
    sys.exit(0)
os.sched_setaffinity(0, {cpu})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
sys.stdout.write("ready\n")
sys.stdout.flush()
n = 0
while True:
    n += 1
    if not n & 0xFFFFF and os.getppid() != parent:
        break
"""


class CpuAwake:
    """One ``SCHED_IDLE`` busy-loop process per CPU in ``cpus`` (default: every CPU this process may run on).

    ``start()`` returns once every loop runs on its CPU; ``stop()`` ends them (idempotent). Also a context manager.
    """

    def __init__(self, cpus: Iterable[int] | None = None):
        if not sys.platform.startswith("linux") or not hasattr(os, "SCHED_IDLE"):
            raise ConfigError("keeping CPUs awake needs Linux (SCHED_IDLE and CPU affinity)")
        allowed = os.sched_getaffinity(0)
        chosen = sorted(allowed if cpus is None else set(cpus))
        bad = [c for c in chosen if isinstance(c, bool) or not isinstance(c, int) or c not in allowed]
        if bad or not chosen:
            raise ConfigError(f"cpus must be a non-empty subset of this process's CPUs {sorted(allowed)}, "
                              f"got {bad or chosen}")
        self.cpus = chosen
        self._procs: list[subprocess.Popen] = []

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def start(self, timeout_s: float = 30.0) -> "CpuAwake":
        if self._procs:
            return self
        me = str(os.getpid())
        try:
            for c in self.cpus:
                self._procs.append(subprocess.Popen([sys.executable, "-c", _LOOP, str(c), me],
                                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))
            deadline = time.monotonic() + timeout_s
            for p in self._procs:  # each says "ready" once pinned and SCHED_IDLE
                if p.stdout.readline().strip() != b"ready" or time.monotonic() > deadline:
                    raise ConfigError(f"a keep-awake loop did not start (exit code {p.poll()})")
        except BaseException:
            self.stop()
            raise
        log.info("keeping %d CPUs awake with SCHED_IDLE loops: %s", len(self.cpus), self.cpus)
        return self

    def stop(self) -> None:
        procs, self._procs = self._procs, []
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
            if p.stdout is not None:
                p.stdout.close()

    def __enter__(self) -> "CpuAwake":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # a forgotten instance never leaves loops behind in this process's lifetime
        try:
            self.stop()
        except Exception:
            pass
