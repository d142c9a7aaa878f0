"""Is a 64 KiB reply's read-and-decode slower after a long spin-wait, and does touching the decode path while
spinning keep it fast?

For spin lengths of 0, 1, 10 and 60 ms: spin as an RPC client does (a channel check, the clock, a ZeroMQ poll), then
time one read-and-decode of a 64 KiB reply from a shared-memory channel. Variant ``warm``: every 50 us of the spin,
also decode a copy of the reply. Medians in microseconds, conditions interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import zmq

from djinn_core.rpc.local_channel import ClientChannel, ServerChannel
from djinn_core.rpc.wire import decode, encode

DEVICE = "cpu"
SPINS_MS = (0.0, 1.0, 10.0, 60.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=30)


def run(args: argparse.Namespace) -> int:
    server = ServerChannel(1 << 20, (b"r",))
    client = ClientChannel(server.name, server.capacity)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.bind("tcp://127.0.0.1:0")
    reply = encode({"id": 1, "ok": True, "result": {}, "server_t": [1.0, 2.0, 3.0, 4.0]},
                   [torch.randn(1, 32000).half()])
    server.write_reply(1, reply)
    warm_copy = [bytes(f) for f in reply]

    def spin(ms: float, warm: bool) -> None:
        end = time.monotonic() + ms / 1e3
        next_warm = 0.0
        while True:
            client.reply_ready(2)
            now = time.monotonic()
            if now >= end:
                return
            sock.poll(0, zmq.POLLIN)
            if warm and now >= next_warm:
                decode([bytearray(f) for f in warm_copy], max_bytes=1 << 30, max_header_bytes=1 << 20)
                next_warm = now + 50e-6

    res: dict[tuple[float, bool], list[float]] = {}
    try:
        for _ in range(args.repeats):
            for ms in SPINS_MS:
                for warm in (False, True):
                    spin(ms, warm)
                    t0 = time.perf_counter()
                    decode(client.read_reply(), max_bytes=1 << 30, max_header_bytes=1 << 20)
                    res.setdefault((ms, warm), []).append((time.perf_counter() - t0) * 1e6)
    finally:
        sock.close(0)
        client.close()
        server.close()
    print(f"{'spin ms':>8}{'plain us':>10}{'warm us':>10}")
    for ms in SPINS_MS:
        print(f"{ms:>8.0f}{statistics.median(res[(ms, False)]):>10.1f}{statistics.median(res[(ms, True)]):>10.1f}")
    return 0
