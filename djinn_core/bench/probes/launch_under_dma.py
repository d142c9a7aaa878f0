"""Does a saturated PCIe link slow the host's kernel launches?

A resumed session's first decode step is launch-bound (hundreds of small kernels per token) while the KV restore
saturates host-to-device PCIe. This probe times, on the host, (a) 2000 launches of a tiny kernel and (b) one greedy
decode step of a narrow 40-layer Llama (launch-bound by construction), under four conditions, interleaved:
``idle``; ``h2d`` (a pinned host-to-device copy of ``NBYTES`` in flight on a side stream); ``d2h`` (the same size the
other way); ``after_d2h`` (right after such a copy was drained, the state a pause leaves). Prints medians in
microseconds per launch and milliseconds per decode step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

DEVICE = "cuda"
NBYTES = 1_751_121_920  # the KV a restore at L=40 moves on the Llama-2-13B architecture, 2048 tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=15)


def run(args: argparse.Namespace) -> int:
    dev = torch.device("cuda")
    host = torch.empty(NBYTES, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(NBYTES, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream()
    x = torch.zeros(16, device=dev)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=40, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1024)
    model = LlamaForCausalLM(cfg).to(dev, torch.float16).eval()
    ids = torch.randint(0, 1024, (1, 64), device=dev)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def launches() -> float:
        t0 = time.perf_counter()
        for _ in range(2000):
            x.add_(1)
        return (time.perf_counter() - t0) / 2000 * 1e6

    def decode() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(tok, past_key_values=cache, use_cache=True)
        dt = (time.perf_counter() - t0) * 1e3
        cache.crop(64)
        return dt

    def condition(name: str) -> None:
        torch.cuda.synchronize()
        if name in ("h2d", "d2h", "after_d2h"):
            with torch.cuda.stream(side):
                if name == "h2d":
                    gpu.copy_(host, non_blocking=True)
                else:
                    host.copy_(gpu, non_blocking=True)
            if name == "after_d2h":
                side.synchronize()

    res: dict[str, list[float]] = {}
    conds = ("idle", "h2d", "d2h", "after_d2h")
    for i in range(args.repeats + 2):
        for c in conds:
            for what, fn in (("launch_us", launches), ("decode_ms", decode)):
                condition(c)
                v = fn()
                if i >= 2:
                    res.setdefault(f"{c}_{what}", []).append(v)
                torch.cuda.synchronize()
    for c in conds:
        print(f"{c:10s} launch_us={statistics.median(res[c + '_launch_us']):.2f} "
              f"decode_ms={statistics.median(res[c + '_decode_ms']):.2f}", flush=True)
    return 0

