"""The Djinn server: breakpoint sessions behind a transport (ZeroMQ, and shared memory for clients on this host).

The server owns the model, the device and every session's state; clients (:mod:`djinn_core.rpc.client`) hold nothing
but session ids and receive only what they ask for (logits, token ids, a hidden state), never the KV cache.

One thread (the *server thread*) owns the transport and the :class:`~djinn_core.runtime.BreakpointRuntime`: it
polls for requests, executes them one at a time in arrival order (the runtime is single-threaded) and, between
requests, frees sessions idle for longer than ``idle_timeout_s`` and logs stats. All model compute therefore runs on
the server thread's current CUDA stream.

Wire format: :mod:`djinn_core.rpc.wire` (a JSON header, then raw tensor buffers; nothing is ever unpickled). A request
header carries ``op``, ``id`` (echoed in the reply), ``client`` (the client-chosen id that owns the sessions it
opens), ``token``, ``session`` and ``args``. A reply carries ``ok`` and ``result`` or ``error: {type, message}``.
Transports: :mod:`djinn_core.rpc.transport`; sessions and ops: :mod:`djinn_core.rpc.ops`.

Security: the server binds 127.0.0.1 by default; any other address needs an auth token (:class:`ConfigError` at
start otherwise). The token travels in clear text: beyond loopback, use it inside a trusted network or an SSH tunnel.
The client id separates sessions between clients; it is not a secret (anyone holding the token may claim any id).
No message, with or without a token, can stop the loop: the header is bounded before it is parsed
(:func:`~djinn_core.rpc.wire.decode_header`), the token is checked before anything else, and every error is answered.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import torch

from djinn_core.errors import ConfigError, DjinnError, ProtocolError
from djinn_core.rpc.config import ServerConfig, is_loopback
from djinn_core.rpc.ops import Request, Result, SessionOps
from djinn_core.rpc.service import LoopService
from djinn_core.rpc.shm_transport import ShmServerTransport
from djinn_core.rpc.transport import ServerTransport
from djinn_core.rpc.wire import (HostStaging, check_token, decode, decode_header, encode, encode_header,
                                  encode_tensors, error_header, register_host, reply_id, request_header,
                                  tensor_descs)
from djinn_core.rpc.zmq_transport import ZmqServerTransport
from djinn_core.runtime import BreakpointRuntime
from djinn_core.runtime.streamed import StreamedBreakpointRuntime
from djinn_core.trace import timing_event

log = logging.getLogger(__name__)

__all__ = ["Server", "ServerConfig", "is_loopback"]


def _ok_header(rid: Any, result: Any, descs: list[dict[str, Any]], times: tuple[float, float, float],
               t_done: float | None = None) -> bytes:
    """Frame 0 of a successful reply. ``server_t``: the host monotonic clock (system-wide on Linux) at receipt, op
    start, op returned (its device work queued) -- ``times`` -- and op end (``t_done``, its results on the host), so a
    client on the same host can split its round trip into request transit, dispatch, op (launch and wait) and reply.
    A header sent before the op's end leaves it (and ``server_ms``) None: it comes with the tensor frames."""
    t_op = times[1]
    return encode_header({"id": rid, "ok": True, "result": result,
                          "server_ms": None if t_done is None else (t_done - t_op) * 1e3,
                          "server_t": [*times, t_done]}, descs)


class Server(LoopService):
    """Serves breakpoint sessions of ``runtime`` (see the module docstring).

    ``start()`` binds (errors raise in the caller) and runs the loop on a new thread; ``serve_forever()`` runs it on
    the calling thread (the CLI); ``with Server(...) as srv:`` both (:class:`~djinn_core.rpc.service.LoopService`).
    ``stop()`` may be called from any thread or a signal handler: the request being executed completes, requests that
    arrive during ``drain_s`` are refused with "server shutting down", every session is closed and the transport
    closed.
    """

    def __init__(self, runtime: BreakpointRuntime, config: ServerConfig | None = None):
        if not isinstance(runtime, BreakpointRuntime):
            raise ConfigError(f"runtime must be a BreakpointRuntime, got {type(runtime).__name__}")
        super().__init__("server")
        self.runtime = runtime
        self.config = config or ServerConfig()
        self.sessions = SessionOps(runtime, self.config)
        self.transport: ServerTransport | None = None
        # device tensors of replies bound for a channel reach the host through pinned memory (wire.HostStaging)
        self._staging = HostStaging(self.config.local_channel_bytes, warm=self._warm_reply,
                                    block=self.config.reply_wait == "block")
        self._warm_descs: list[dict[str, Any]] = []  # the last staged reply's descriptors (see _warm_reply)
        self._pin = register_host  # how a channel is made memory the device copies a reply's tensors into
        self.started_at = time.monotonic()
        self._next_stats = 0.0
        self._next_sweep = 0.0
        self.ops: dict[str, Callable[[Request], Result]] = {
            "ping": self._op_ping, "stats": self._op_stats, **self.sessions.ops}

    # -- life ------------------------------------------------------------------------------------------------------
    def bind(self) -> str:
        """Bind the transports; returns the bound address (``tcp://host:port``)."""
        if self.transport is not None:
            return self.address
        cfg = self.config
        # the hard per-frame cap libzmq enforces (it drops the sender's connection); below it we answer clearly
        zmq_t = ZmqServerTransport(cfg.endpoint, max_frame_bytes=2 * cfg.max_request_bytes + cfg.max_header_bytes,
                                   linger_ms=cfg.linger_ms)
        self.transport = ShmServerTransport(zmq_t, channel_bytes=cfg.local_channel_bytes,
                                            max_channels=cfg.max_sessions, busy_poll_s=cfg.busy_poll_s,
                                            stop=self._stopping, zmq_every=cfg.spin_zmq_every)
        self.ops.update(self.transport.ops)
        self.address = zmq_t.address
        log.info("djinn server listening on %s (model on %s, auth %s, max request %d bytes, max sessions %d, "
                 "idle timeout %.1f s)", self.address, self.runtime.device, "on" if cfg.token else "off",
                 cfg.max_request_bytes, cfg.max_sessions, cfg.idle_timeout_s)
        return self.address

    # -- the loop (server thread) ----------------------------------------------------------------------------------
    def _run(self) -> None:
        transport, busy_poll_s, stopping = self.transport, self.config.busy_poll_s, self._stopping
        tick_ms = max(1, int(self.config.tick_s * 1000))
        try:
            with torch.no_grad():
                spin_until = 0.0
                while not stopping.is_set():
                    # spinning after a request, the next one is seen at once; else wait up to a tick
                    spinning = busy_poll_s and time.monotonic() < spin_until
                    if transport.serve(self._handle_guarded, tick_ms, spinning, stopping):
                        spin_until = time.monotonic() + busy_poll_s
                    self._housekeeping(time.monotonic())
            self._drain()
        finally:
            self._shutdown()

    def _housekeeping(self, now: float) -> None:
        if now >= self._next_sweep:
            self._next_sweep = now + self.config.tick_s
            self.sweep_idle(now)
        if self.config.stats_interval_s and now >= self._next_stats:
            self._next_stats = now + self.config.stats_interval_s
            s = self.stats()
            log.info("djinn server: %d sessions (%d resident, %d swapped), %d clients, slab %d/%d bytes used, "
                     "swap out %d / in %d bytes, %d requests, %d errors", s["sessions"], s["resident"], s["swapped"],
                     s["clients"], s["slab"]["used"], s["slab"]["capacity"], s["swap"]["bytes_out"],
                     s["swap"]["bytes_in"], s["requests"], s["errors"])

    def _drain(self) -> None:
        """Refuse what arrives during ``drain_s`` after a stop: those requests were in flight when it came."""
        deadline = time.monotonic() + self.config.drain_s
        while deadline - time.monotonic() > 0:
            self.transport.serve(self._refuse, 1, False, None)

    def _refuse(self, origin: Any, body: list[Any] | None, slot_id: int | None, error: Exception | None) -> None:
        """Answer "server shutting down" to a request, readable or not (a refusal never stops the drain)."""
        rid = slot_id
        if rid is None and body:
            try:
                rid = reply_id(decode_header(body[0], max_header_bytes=self.config.max_header_bytes).get("id"))
            except Exception:  # decode_header raises ProtocolError only; the refusal goes out without an id
                pass
        self.counters["refused"] += 1
        try:
            self._send(origin, error_header(rid, "ServerUnavailable", "server shutting down"))
        except Exception:
            log.exception("could not refuse request %r", rid)

    def _shutdown(self) -> None:
        n = self.sessions.free_all("server shut down")
        if self.transport is not None:
            self.transport.close()
        self._stopped.set()
        log.info("djinn server on %s stopped (%d sessions freed, %d requests served)", self.address, n,
                 self.counters["requests"])

    # -- one request -----------------------------------------------------------------------------------------------
    def _send(self, path: Any, header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> None:
        self.transport.send(path, header.get("id"), encode(header, tensors))

    def _warm_reply(self) -> None:
        """While the staging waits for the device: build a reply header like the last one, so that code is warm when
        the real one is built (``docs/notes/rpc.md``: after milliseconds of polling it runs several times slower)."""
        encode_header({"id": 0, "ok": True, "result": {}, "server_ms": 0.0, "server_t": [0.0, 0.0, 0.0, 0.0]},
                      self._warm_descs)

    def _handle(self, origin: Any, body: list[Any] | None, slot_id: int | None, error: Exception | None) -> None:
        """One request from ``origin`` (``slot_id``: the id its transport carried; ``error``: why its frames could
        not be read). Every reply, error replies included, goes back along the path the request earned: its origin
        until the token is checked."""
        t_recv = time.perf_counter()
        self.counters["requests"] += 1
        rid: Any = slot_id
        path = origin
        try:
            # the header is bounded (bytes, depth, numbers) and parsed once; the token is checked before anything
            # else of the request is looked at
            header = request_header(body, error, max_header_bytes=self.config.max_header_bytes)
            if slot_id is None:
                rid = reply_id(header.get("id"))
            elif header.get("id") != slot_id:
                raise ProtocolError(f"request id {header.get('id')!r} differs from its slot's ({slot_id})")
            check_token(self.config.token, header.get("token"))
            path = self.transport.reply_path(origin, header, rid)
            msg = decode(body, max_bytes=self.config.max_request_bytes, header=header)
            req = Request(msg, origin)
            fn = self.ops.get(req.op)
            if fn is None:
                raise ProtocolError(f"unknown op {str(req.op)[:64]!r}; known: {sorted(self.ops)}")
            # bench_ops: the device's span of the op (resume_timed reports it), from here to its copies' end
            ev0 = timing_event(device=self.runtime.device) if self.config.bench_ops else None
            ev1 = None
            t0 = time.perf_counter()
            result, tensors = fn(req)
            t_fn = time.perf_counter()
            # device -> host copies: the op's work is done after this
            staged = self.transport.stages(path) and self._staging.fits(tensors)
            times = (t_recv, t0, t_fn)
            if staged:
                descs = tensor_descs(tensors)
                self._warm_descs = descs
                # the header goes first, while the device works: the client reads it meanwhile, and what is left
                # after the wait is marking the tensors' bytes there (the op's end travels with them): the device
                # copies them into the channel itself where the channel could be pinned, else into the staging
                # buffer, whose bytes are then copied into the channel
                early = self.transport.send_head(path, rid, _ok_header(rid, result, descs, times),
                                                 [d["nbytes"] for d in descs])
                place = None
                try:
                    if early is not None:
                        place = early.place(self._pin)
                    descs, bufs = self._staging.start(tensors, place)
                    ev1 = timing_event(device=self.runtime.device) if ev0 is not None else None
                    # a header already sent needs no warm header built while polling (it would delay the copy)
                    self._staging.wait(warm=early is None)
                except BaseException:
                    if early is not None:
                        early.fail()
                    raise
                if early is not None:
                    early.complete(time.perf_counter(), None if place is not None else bufs)
                    self.counters["in_place" if place is not None else "header_first_staged"] += 1
                    self.counters["ok"] += 1
                    self._note_device_span(req.client, ev0, ev1)  # after the reply: it never delays one
                    return
            else:
                descs, bufs = encode_tensors(tensors)
                ev1 = (timing_event(device=self.runtime.device)  # encoding waited for the copies
                       if ev0 is not None and any(t.is_cuda for t in tensors) else None)
            head = _ok_header(rid, result, descs, times, time.perf_counter())
            self.transport.send(path, rid, [head, *bufs], staged)
            self.counters["ok"] += 1
            self._note_device_span(req.client, ev0, ev1)
        except Exception as e:  # one bad request never stops the server
            self.counters["errors"] += 1
            if isinstance(e, DjinnError):
                log.info("request %r refused: %s: %s", rid, type(e).__name__, str(e)[:500])
            else:
                log.exception("request %r failed", rid)
            try:  # the reply echoes only what was already checked: nothing untrusted is parsed again here
                self._send(path, error_header(reply_id(rid), type(e).__name__, str(e)[:2000]))
            except Exception:  # an error reply is plain JSON; log rather than die
                log.exception("could not send the error reply to request %r", rid)

    def _note_device_span(self, client: str, ev0: Any, ev1: Any) -> None:
        """``bench_ops``: the device's span of this client's op (its events complete), for resume_timed to report;
        one per client id, at most 4096 ids."""
        if ev0 is None or ev1 is None:
            return
        ev1.synchronize()  # recorded after the copies just waited for: at once
        spans = self.sessions.last_device_ms
        if len(spans) >= 4096 and client not in spans:
            spans.clear()
        spans[client] = ev0.elapsed_time(ev1)

    # -- housekeeping and stats ------------------------------------------------------------------------------------
    def sweep_idle(self, now: float | None = None) -> int:
        """Close sessions unused for longer than ``idle_timeout_s`` and free idle transport state; returns how many
        sessions (server thread only)."""
        now = time.monotonic() if now is None else now
        n = self.sessions.sweep_idle(now)
        if self.transport is not None:
            self.transport.sweep(now, self.config.idle_timeout_s)
        return n

    def stats(self) -> dict[str, Any]:
        """Sessions by state, slab / host pool / swap counters (bytes), VRAM (torch allocator) and request counts."""
        rt = self.runtime
        vram = None
        if rt.device.type == "cuda":
            ms = torch.cuda.memory_stats(rt.device)
            vram = {"allocated": torch.cuda.memory_allocated(rt.device),
                    "reserved": torch.cuda.memory_reserved(rt.device),
                    "max_allocated": torch.cuda.max_memory_allocated(rt.device),
                    "max_reserved": torch.cuda.max_memory_reserved(rt.device),
                    # the caching allocator's calls to the driver: each costs far more than a cached block
                    "device_allocs": ms.get("num_device_alloc", 0), "device_frees": ms.get("num_device_free", 0),
                    "alloc_retries": ms.get("num_alloc_retries", 0)}
        streamed = rt.stats() if isinstance(rt, StreamedBreakpointRuntime) else None  # split, streaming counters
        return {
            **self.sessions.counts(),
            "streamed": streamed,
            "slab": dataclasses.asdict(rt.slab.stats), "host_pool": dataclasses.asdict(rt.host_pool.stats),
            "swap": dataclasses.asdict(rt.swap.stats), "evictions": rt.evictions, "vram": vram,
            "device": str(rt.device),
            "requests": self.counters["requests"], "errors": self.counters["errors"],
            # replies to a channel sent header first, their tensors copied by the device into the channel itself
            # (in place) or through the staging buffer
            "header_first": {"in_place": self.counters["in_place"], "staged": self.counters["header_first_staged"]},
            "uptime_s": time.monotonic() - self.started_at,
            "limits": {"max_request_bytes": self.config.max_request_bytes, "max_sessions": self.config.max_sessions,
                       "max_sessions_per_client": self.config.per_client_limit,
                       "max_new_tokens": self.config.max_new_tokens, "idle_timeout_s": self.config.idle_timeout_s},
        }

    def _op_ping(self, req: Request) -> Result:
        return {}, []

    def _op_stats(self, req: Request) -> Result:
        return self.stats(), []

