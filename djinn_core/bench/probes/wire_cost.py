"""Host cost of each step of a 64 KiB reply (last-position logits of a 32000-token vocabulary, fp16) through a
shared-memory channel, in a hot loop, next to a pure-Python speed reference. Medians in microseconds; the CUDA rows
only where a GPU is present.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from djinn_core.rpc.local_channel import ClientChannel, ServerChannel
from djinn_core.rpc.wire import decode, decode_header, encode, encode_header, encode_tensors

DEVICE = "cpu"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=2000, help="timed calls per step (the Python loop: a tenth)")


def _median_us(fn, n: int) -> float:
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(xs)


def run(args: argparse.Namespace) -> int:
    print(f"python {sys.version.split()[0]} on {platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    server = ServerChannel(1 << 20, (b"r",))
    client = ClientChannel(server.name, server.capacity)
    x = torch.randn(1, 32000).half()
    reply = encode({"id": 1, "ok": True, "result": {}}, [x])
    server.write_reply(1, reply)
    frames = client.read_reply()
    steps = {
        "python loop 1e5 (reference)": lambda: sum(range(100_000)),
        "encode_tensors (CPU tensor)": lambda: encode_tensors([x]),
        "encode_header": lambda: encode_header({"id": 1, "ok": True, "result": {}, "server_ms": 1.0,
                                                "server_t": [1.0, 2.0, 3.0]}, [{"dtype": "float16",
                                                                                "shape": [1, 32000],
                                                                                "nbytes": 64000}]),
        "write_reply": lambda: server.write_reply(1, reply),
        "read_reply": client.read_reply,
        "decode_header": lambda: decode_header(frames[0]),
        "bytearray(64 KB) copy": lambda: bytearray(frames[1]),
        "torch.frombuffer": lambda: torch.frombuffer(frames[1], dtype=torch.float16).view(1, 32000),
        "torch.empty(()) element_size": lambda: torch.empty((), dtype=torch.float16).element_size(),
        "read_reply + decode": lambda: decode(client.read_reply(), max_bytes=1 << 30, max_header_bytes=1 << 20),
    }
    if torch.cuda.is_available():
        g = torch.randn(1, 2048, 32000, device="cuda").half()
        steps["cuda slice[:, -1].cpu()"] = lambda: g[:, -1].cpu()
        steps["cuda synchronize"] = torch.cuda.synchronize
    try:
        for name, fn in steps.items():
            fn()
            n = max(1, args.repeats // 10) if "loop" in name else args.repeats
            print(f"{name:<32}{_median_us(fn, n):>10.2f}")
    finally:
        client.close()
        server.close()
    return 0
