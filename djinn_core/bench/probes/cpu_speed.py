"""How fast the same pure-Python loop runs on each CPU of this machine, pinned and unpinned, twice over.

Each measurement is a fresh Python process (pinned with ``os.sched_setaffinity`` or left to the scheduler) that times
``sum(range(100000))`` 30 times and prints the median and minimum in milliseconds. Differences between CPUs, or
between the two passes, are the host's speed varying under the same code.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

DEVICE = "cpu"
LOOP = """
import os, statistics, sys, time
if int(sys.argv[1]) >= 0:
    os.sched_setaffinity(0, {int(sys.argv[1])})
xs = []
for _ in range(30):
    t = time.perf_counter(); sum(range(100000)); xs.append((time.perf_counter() - t) * 1e3)
print("%.3f %.3f" % (statistics.median(xs), min(xs)))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--unpinned", type=int, default=3, help="unpinned runs per pass")


def _loop(cpu: int) -> str:
    out = subprocess.run([sys.executable, "-c", LOOP, str(cpu)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def run(args: argparse.Namespace) -> int:
    print("pass  where        median_ms min_ms")
    for rep in range(1, args.passes + 1):
        for cpu in sorted(os.sched_getaffinity(0)):
            print(f"{rep:<5} cpu{cpu:<9} {_loop(cpu)}", flush=True)
        for _ in range(args.unpinned):
            print(f"{rep:<5} {'unpinned':<12} {_loop(-1)}", flush=True)
    return 0
