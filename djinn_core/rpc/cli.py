"""The ``djinn serve`` and ``djinn route`` commands: their arguments (:func:`add_serve_parser`,
:func:`add_route_parser`; importable without torch, ZeroMQ or transformers: the ``djinn`` parser is built at every
start) and :func:`cmd_serve` / :func:`cmd_route`, which import them when they run."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from djinn_core.errors import ConfigError
from djinn_core.rpc.config import REPLY_WAITS, ServerConfig
from djinn_core.rpc.service import LoopService  # light: no torch, no ZeroMQ

log = logging.getLogger(__name__)

_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """``"4GiB"``, ``"512M"``, ``"1048576"`` -> bytes (binary units)."""
    s = text.strip().lower()
    num = s.rstrip("kmgib")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if unit not in _UNITS or not 0 <= value < 1 << 60:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (use e.g. 4GiB, 512M, 1048576)")
    return int(value * _UNITS[unit])


def vram_budget_spec(text: str) -> str:
    """A ``--vram-budget`` spelling checked as :func:`djinn_core.memory.vram_budget.parse_budget` reads it."""
    from djinn_core.memory.vram_budget import parse_budget

    try:
        parse_budget(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def read_token(token_file: str | None) -> str | None:
    """The auth token: the stripped contents of ``token_file``, else ``$DJINN_TOKEN``, else None (no auth).
    :class:`ConfigError`, naming the file, when it is missing, unreadable, not text or empty."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the token file {token_file}: {getattr(e, 'strerror', None) or e}") from None
        if not token:
            raise ConfigError(f"token file {token_file} is empty")
        return token
    return os.environ.get("DJINN_TOKEN") or None


def check_stream_args(args: argparse.Namespace) -> None:
    """``--stream`` needs ``--vram-budget`` (the ring, the session slab and the activations are sized from it) and
    takes no ``--slab-bytes`` (the budget's split decides the slab); ``--ring-slots`` and ``--session-tokens`` shape
    that split and apply to ``--stream`` only. :class:`ConfigError` otherwise, before anything loads."""
    if args.stream:
        if args.vram_budget is None:
            raise ConfigError("--stream needs --vram-budget: the weight ring, the session slab and the activations "
                              "share that budget (e.g. --vram-budget 24GiB)")
        if args.slab_bytes is not None:
            raise ConfigError("--stream takes no --slab-bytes: the slab is what the --vram-budget split leaves after "
                              "the ring, the resident modules and the activations")
    elif args.ring_slots is not None or args.session_tokens is not None:
        raise ConfigError("--ring-slots and --session-tokens apply to --stream only")


def _vram_budget(args: argparse.Namespace, device: Any) -> tuple[int | None, int]:
    """(budget bytes or None, device overhead bytes the streaming split reserves) for ``--vram-budget``.

    On CUDA the budget resolves against the card and torch's allocator is capped at it less the CUDA context, before
    anything loads (the weights count against the budget). Without ``--stream`` a non-CUDA device is refused. With
    ``--stream`` on another device (the CPU) the budget is the streaming budget only -- the ring, the slab and the
    activations are sized from it -- and nothing caps the allocator (there is none to cap); ``card`` has no meaning
    there and is refused."""
    if args.vram_budget is None:
        return None, 0
    if device.type != "cuda":
        if not args.stream:
            raise ConfigError(f"--vram-budget applies to a CUDA device, not {device} (with --stream it is the "
                              "streaming budget on any device)")
        from djinn_core.memory.vram_budget import parse_budget

        nbytes, _ = parse_budget(args.vram_budget)
        if nbytes is None:
            raise ConfigError(f"--vram-budget card needs a CUDA device; on {device} give --stream a byte count "
                              "(e.g. 64MiB)")
        log.info("--stream on %s: --vram-budget %s (%d bytes) is the streaming budget (ring + slab + activations); "
                 "no allocator cap off CUDA", device, args.vram_budget, nbytes)
        return nbytes, 0
    from djinn_core.memory.vram_budget import cap_allocator, card_total_bytes, resolve_budget

    budget = resolve_budget(args.vram_budget, "--vram-budget", card_total_bytes(device.index or 0))
    enforced = cap_allocator(budget.bytes, device)  # before the model loads: the weights count against the budget
    overhead = 0
    if args.stream:  # the split plans within the allocator's cap: it reserves the context (at least 1 GiB, as
        from djinn_core.streaming.builder import DEFAULT_CUDA_OVERHEAD_BYTES  # build_streamed_model does)

        overhead = max(int(enforced["outside_allocator_bytes"]), DEFAULT_CUDA_OVERHEAD_BYTES)
    return budget.bytes, overhead


def _make_runtime(args: argparse.Namespace, device: Any) -> tuple[Any, str]:
    """The runtime ``djinn serve`` serves, and a note for its start line ("" when resident)."""
    budget_bytes, overhead = _vram_budget(args, device)
    if not args.stream:
        from djinn_core.rpc.loading import load_model, make_runtime

        model = load_model(args.model, device=device, dtype=args.dtype, seed=args.seed, num_layers=args.num_layers)
        return make_runtime(model, slab_bytes=args.slab_bytes, host_pool_bytes=args.host_pool_bytes), ""
    import json

    from djinn_core.rpc.loading import make_streamed_runtime
    from djinn_core.streaming.budget_split import RingFirstSplit

    shape = {k: v for k, v in (("ring_slots", args.ring_slots), ("session_tokens", args.session_tokens))
             if v is not None}
    split = RingFirstSplit(device_overhead_bytes=overhead, **shape)
    runtime = make_streamed_runtime(args.model, budget_bytes=budget_bytes, split=split, device=device,
                                    dtype=args.dtype, seed=args.seed, num_layers=args.num_layers,
                                    host_pool_bytes=args.host_pool_bytes)
    plan = runtime.split
    log.info("--stream: VRAM split %s", json.dumps(plan.to_dict(), sort_keys=True))
    mib = 1 << 20
    note = (f" (streamed under {budget_bytes / mib:.0f} MiB: ring {plan.slots} x {plan.layer_bytes / mib:.1f}"
            f" MiB, slab {plan.slab_bytes / mib:.1f} MiB = {plan.sessions_resident} sessions of "
            f"{plan.session_tokens} tokens)")
    return runtime, note


def _serve_until_signal(service: LoopService, what: str) -> int:
    """Bind ``service``, print ``"<what>, listening on <address>"`` (the line scripts wait for), then serve on this
    thread until SIGINT or SIGTERM stops it; 0."""
    import signal

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        service.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    service.bind()
    print(f"{what}, listening on {service.address}", flush=True)
    service.serve_forever()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``djinn serve``: load the model, bind, serve until SIGINT/SIGTERM. Bad input raises a typed
    :class:`~djinn_core.errors.DjinnError` before anything is loaded where it can."""
    config = ServerConfig(host=args.host, port=args.port, token=read_token(args.token_file),
                          max_request_bytes=args.max_request_bytes, max_sessions=args.max_sessions,
                          max_sessions_per_client=args.max_sessions_per_client, idle_timeout_s=args.idle_timeout_s,
                          stats_interval_s=args.stats_interval_s, busy_poll_s=args.busy_poll_s,
                          local_channel_bytes=args.local_channel_bytes,
                          spin_zmq_every=args.spin_zmq_every,
                          reply_wait=args.reply_wait, bench_ops=args.bench_ops)  # checked before anything loads
    check_stream_args(args)
    from djinn_core.rpc.server import Server
    from djinn_core.validation import check_device

    if args.device:
        device = check_device(args.device)  # DeviceUnavailable: cuda asked for, no GPU
    else:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runtime, streamed = _make_runtime(args, device)
    return _serve_until_signal(Server(runtime, config), f"djinn serve: {args.model} on {device}{streamed}")


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``djinn serve`` (called by :mod:`djinn_core.cli`)."""
    d = ServerConfig
    p = subparsers.add_parser("serve", help="serve breakpoint sessions over RPC (ZeroMQ)",
                              description="Serve breakpoint sessions over ZeroMQ. The auth token is read from "
                                          "--token-file or the DJINN_TOKEN environment variable (never argv).")
    p.add_argument("--model", required=True,
                   help="architecture name (random weights, e.g. llama-tiny, llama2-13b), 'smollm2', or a .gguf path")
    p.add_argument("--host", default=d.host, help="address to bind (non-loopback needs a token)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port (0: any free port)")
    p.add_argument("--token-file", help="file holding the auth token (default: $DJINN_TOKEN, else no auth)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="float16 / bfloat16 / float32 (default: float16 on cuda, float32 on cpu)")
    p.add_argument("--seed", type=int, default=0, help="weight seed of an architecture name")
    p.add_argument("--num-layers", type=int, help="truncate an architecture to this many layers")
    p.add_argument("--slab-bytes", type=parse_bytes, help="device slab for session state (e.g. 8GiB)")
    p.add_argument("--host-pool-bytes", type=parse_bytes, help="pinned host pool for paused sessions (e.g. 16GiB)")
    p.add_argument("--vram-budget", type=vram_budget_spec,
                   help="cap this server's GPU memory as on a card of this size: '80GB' (the H100 80GB card), "
                        "'card', or bytes such as 24GiB; torch's caching allocator is capped at the budget less the "
                        "CUDA context (default: the whole card). With --stream, also the budget the weight ring, the "
                        "session slab and the activations are split from (on the CPU: only that, no cap)")
    p.add_argument("--stream", action="store_true",
                   help="stream the decoder layers through a weight ring, so a model larger than the budget serves "
                        "breakpoint sessions: needs --vram-budget, which a policy splits between the ring, the session "
                        "slab (no --slab-bytes) and the activations (the split is logged at start). On the CPU the "
                        "budget is the streaming budget only (no allocator cap)")
    p.add_argument("--ring-slots", type=int,
                   help="with --stream: whole-layer slots of the weight ring (default 4; >= 2 overlaps copy and "
                        "compute)")
    p.add_argument("--session-tokens", type=int,
                   help="with --stream: tokens (prompt + new) one session must fit in the slab (default 2048)")
    p.add_argument("--max-request-bytes", type=parse_bytes, default=d.max_request_bytes)
    p.add_argument("--max-sessions", type=int, default=d.max_sessions)
    p.add_argument("--max-sessions-per-client", type=int)
    p.add_argument("--idle-timeout-s", type=float, default=d.idle_timeout_s)
    p.add_argument("--stats-interval-s", type=float, default=d.stats_interval_s,
                   help="log stats this often (0: never)")
    p.add_argument("--busy-poll-s", type=float, default=d.busy_poll_s,
                   help="after a request, spin this long for the next one before sleeping (latency vs one busy core)")
    p.add_argument("--local-channel-bytes", type=parse_bytes, default=d.local_channel_bytes,
                   help="size of each direction of the shared-memory channel offered to clients on this host "
                        "(0: none)")
    p.add_argument("--spin-zmq-every", type=int, default=d.spin_zmq_every,
                   help="while spinning on shared-memory channels, poll the ZeroMQ socket once every this many spins "
                        "(a system call; 1: every spin)")
    p.add_argument("--reply-wait", choices=REPLY_WAITS, default=d.reply_wait,
                   help="how a reply's device-to-host copies are waited for: poll their event in a loop, or block in "
                        "the CUDA driver (as .cpu() does)")
    p.add_argument("--bench-ops", action="store_true",
                   help="offer the benchmarking op resume_timed (a fork resumed in the server's own process and "
                        "timed there: the in-process reference of the RPC claims)")
    p.set_defaults(fn=cmd_serve)
    return p


def cmd_route(args: argparse.Namespace) -> int:
    """``djinn route``: one endpoint over the ``djinn serve`` workers at ``--worker`` (:mod:`djinn_core.rpc.router`);
    routes until SIGINT/SIGTERM. Bad input raises a typed :class:`~djinn_core.errors.DjinnError` before binding."""
    config = ServerConfig(host=args.host, port=args.port, token=read_token(args.token_file),
                          max_request_bytes=args.max_request_bytes)
    from djinn_core.rpc.router import Router

    router = Router(args.worker, config, worker_timeout_s=args.worker_timeout_s)
    return _serve_until_signal(router, f"djinn route: {len(args.worker)} workers")


def add_route_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``djinn route`` (its parser imports nothing heavy, as :func:`add_serve_parser`)."""
    d = ServerConfig
    p = subparsers.add_parser("route", help="one endpoint over several djinn serve workers (one per GPU)",
                              description="Route breakpoint sessions over several `djinn serve` workers behind one "
                                          "ZeroMQ endpoint: new sessions go to the worker with the most free slab, "
                                          "forks stay with their parent. The auth token (--token-file or "
                                          "DJINN_TOKEN) is checked here and sent to the workers.")
    p.add_argument("--worker", action="append", required=True, metavar="ADDR",
                   help="a worker's endpoint, e.g. tcp://127.0.0.1:5557 (repeat for each worker)")
    p.add_argument("--host", default=d.host, help="address to bind (non-loopback needs a token)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port (0: any free port)")
    p.add_argument("--token-file", help="file holding the auth token (default: $DJINN_TOKEN, else no auth)")
    p.add_argument("--worker-timeout-s", type=float, default=300.0,
                   help="a worker that takes longer than this to answer one request is lost, with its sessions")
    p.add_argument("--max-request-bytes", type=parse_bytes, default=d.max_request_bytes)
    p.set_defaults(fn=cmd_route)
    return p


def main_route(args: argparse.Namespace) -> int:
    """``djinn route`` from :mod:`djinn_core.cli`: parse the rest of its line (``args.extra``) here, then run it."""
    parser = argparse.ArgumentParser(prog="djinn")
    add_route_parser(parser.add_subparsers(dest="cmd", required=True))
    route_args = parser.parse_args(["route", *args.extra], namespace=argparse.Namespace(verbose=args.verbose))
    return route_args.fn(route_args)
