"""Is an uninterrupted greedy run of a random-weight fp16 model bitwise reproducible on this GPU, and under which
settings? Bitwise claims (pause/resume == uninterrupted) need a reference that agrees with itself first.

For each setting, two identical greedy runs (prefill then ``--steps`` decode steps) in a fresh process (settings
such as ``CUBLAS_WORKSPACE_CONFIG`` act at CUDA initialisation); prints which steps' logits differ, whether the tokens
agree and the largest absolute logit difference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

DEVICE = "cuda"
SETTINGS = {
    "default": {},
    "cublas_workspace": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    "no_reduced_precision_reduction": {"DJINN_PROBE_NO_REDUCED": "1"},
    "no_cudnn_sdpa": {"DJINN_PROBE_NO_CUDNN_SDPA": "1"},
    "deterministic": {"DJINN_PROBE_DETERMINISTIC": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    "sdpa_math": {"DJINN_PROBE_SDPA": "math"},
    "sdpa_flash": {"DJINN_PROBE_SDPA": "flash"},
    "sdpa_efficient": {"DJINN_PROBE_SDPA": "efficient"},
    "eager_attention": {"DJINN_PROBE_ATTN": "eager"},
}


def child(arch: str, tokens: int, steps: int) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import DynamicCache

    from djinn_core.models import build_model

    if os.environ.get("DJINN_PROBE_DETERMINISTIC"):
        torch.use_deterministic_algorithms(True)
    if os.environ.get("DJINN_PROBE_NO_REDUCED"):
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    if os.environ.get("DJINN_PROBE_NO_CUDNN_SDPA"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_model(arch, device="cuda", dtype=torch.float16, seed=0)
    model.config._attn_implementation = os.environ.get("DJINN_PROBE_ATTN", "sdpa")
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda", generator=g)
    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(os.environ.get("DJINN_PROBE_SDPA", ""))

    @torch.no_grad()
    def greedy():
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = [out.logits[:, -1].clone()]
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [tok.item()]
        for _ in range(steps):
            out = model(tok, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1].clone())
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok.item())
        return logits, toks

    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        a, ta = greedy()
        b, tb = greedy()
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y)]
    return {"steps_differing": diff, "tokens_equal": ta == tb,
            "max_abs_diff": max(float((x - y).abs().max()) for x, y in zip(a, b))}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="llama2-13b")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(child(args.arch, args.tokens, args.steps)))
        return 0
    results = {}
    for name, env in SETTINGS.items():
        out = subprocess.run([sys.executable, "-m", "djinn_core.cli", "probe", "determinism", "--child", "--arch",
                              args.arch, "--tokens", str(args.tokens), "--steps", str(args.steps)],
                             env={**os.environ, **env}, capture_output=True, text=True)
        lines = out.stdout.strip().splitlines()
        results[name] = json.loads(lines[-1]) if out.returncode == 0 and lines else {"error": out.stderr[-800:]}
        print(f"{name:16s} {results[name]}", flush=True)
    return 0

