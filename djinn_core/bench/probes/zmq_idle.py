"""Raw ZeroMQ one-way latency after the sender was busy or idle, without Djinn's server code.

A sender thread and a busy-polling receiver thread in one process (so ``time.perf_counter`` is one clock) share a
DEALER/ROUTER pair over loopback TCP (or ``ipc``). Each round the sender spins or sleeps ``ms``, stamps the time,
sends 128 KiB (a resume reply's logits), and the receiver records when ``recv`` returned. Medians (ms) per
(transport, wait, ms). Rows: ``plain``; ``qos`` (``/dev/cpu_dma_latency`` held at 0 us, where writable);
``idle_spin`` (one busy-looping process per CPU under ``SCHED_IDLE``: no core ever goes idle, so a wake-up never
waits for an idle core to come back); ``hb<us>`` (the receiver sends the sender a 1-byte heartbeat every <us>
microseconds while it waits, keeping both I/O threads busy). If the latency after a 20 ms wait exceeds the one after
0 ms here too, a slow RPC reply leg is ZeroMQ's I/O threads waking (or the cores they sleep on), not Djinn's server.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import struct
import tempfile
import threading
import time

import zmq

DEVICE = "cpu"
PAYLOAD = bytes(128 << 10)


def _wait(kind: str, ms: float) -> None:
    if kind == "sleep":
        time.sleep(ms * 1e-3)
        return
    end = time.perf_counter() + ms * 1e-3
    while time.perf_counter() < end:
        pass


def one_way_ms(endpoint: str, kind: str, ms: float, rounds: int, heartbeat_us: float = 0.0) -> float:
    """Median one-way latency; sender and receiver in separate ZeroMQ contexts (an I/O thread each, as a client and
    a server in two processes have). ``heartbeat_us`` > 0: while waiting, the receiver sends the sender a 1-byte
    frame this often (the sender drains them before each send), so both I/O threads keep handling traffic."""
    ctx_rx, ctx_tx = zmq.Context(), zmq.Context()
    rx = ctx_rx.socket(zmq.ROUTER)
    rx.bind(endpoint)
    tx = ctx_tx.socket(zmq.DEALER)
    tx.connect(endpoint)
    tx.send(b"hello")
    peer = rx.recv_multipart()[0]  # connected both ways
    sent: list[float] = []
    got: list[float] = []
    arrived = threading.Event()
    period = heartbeat_us * 1e-6

    def receiver() -> None:
        next_hb = time.perf_counter() + period
        while len(got) < rounds:
            try:
                rx.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                if period and time.perf_counter() >= next_hb:
                    rx.send_multipart([peer, b"h"])
                    next_hb = time.perf_counter() + period
                continue
            got.append(time.perf_counter())
            arrived.set()
            next_hb = time.perf_counter() + period

    t = threading.Thread(target=receiver)
    t.start()
    for _ in range(rounds):
        _wait(kind, ms)
        while tx.poll(0):  # heartbeats that arrived meanwhile
            tx.recv()
        arrived.clear()
        sent.append(time.perf_counter())
        tx.send(PAYLOAD)
        arrived.wait()  # one message in flight at a time; the sender blocks, leaving its core to the I/O threads
    t.join()
    tx.close(0)
    rx.close(0)
    ctx_tx.term()
    ctx_rx.term()
    return statistics.median((g - s) * 1e3 for s, g in zip(sent[10:], got[10:]))


def _spin(cpu: int) -> None:
    import os

    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    while True:
        pass


@contextlib.contextmanager
def idle_spinners(on: bool):
    """One SCHED_IDLE busy loop per CPU while open (none when ``on`` is false)."""
    if not on:
        yield
        return
    import multiprocessing as mp
    import os

    procs = [mp.Process(target=_spin, args=(c,), daemon=True) for c in sorted(os.sched_getaffinity(0))]
    for pr in procs:
        pr.start()
    time.sleep(0.5)
    try:
        yield
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            pr.join()


@contextlib.contextmanager
def pm_qos(on: bool):
    if not on:
        yield True
        return
    try:
        f = open("/dev/cpu_dma_latency", "wb", buffering=0)
    except OSError:
        yield False
        return
    f.write(struct.pack("i", 0))
    try:
        yield True
    finally:
        f.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--rows", nargs="+", default=["plain", "idle_spin", "qos", "hb100", "hb50"],
                   help="plain, idle_spin, qos, hb<us> (receiver heartbeats every <us>)")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as d:
        endpoints = {"tcp": "tcp://127.0.0.1:5599", "ipc": f"ipc://{d}/probe"}
        for rowname in args.rows:
            qos, spin = rowname == "qos", rowname == "idle_spin"
            hb = float(rowname[2:]) if rowname.startswith("hb") else 0.0
            with pm_qos(qos) as held, idle_spinners(spin):
                if not held:
                    print("qos: /dev/cpu_dma_latency not writable here; skipped", flush=True)
                    continue
                for name, ep in endpoints.items():
                    row = {f"{kind}{ms:g}": one_way_ms(ep, kind, ms, args.rounds, hb)
                           for kind, ms in (("spin", 0), ("spin", 1.3), ("spin", 20), ("sleep", 1.3), ("sleep", 20))}
                    print(f"{rowname:9s} {name:3s} " + " ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)
    return 0

