"""One endpoint over several Djinn servers (``djinn route``): a client never needs to know where its session lives.

A :class:`Router` binds one ZeroMQ endpoint that speaks the server's wire protocol (:mod:`djinn_core.rpc.wire`; a
:class:`~djinn_core.rpc.client.Client` of the router works unchanged) and holds one connection per *worker*: a
``djinn serve`` process, typically one per GPU. It keeps a map *global session id -> (worker, worker session id)* and
rewrites session ids both ways: in requests (``session``) and in replies (``open``'s and ``fork``'s ids, ``info``-like
results, ``sessions``' listings, and error messages that name a session).

* ``open`` goes to the worker a placement policy picks from every live worker's ``stats`` (default
  :class:`MostFreeSlab`: the most free slab bytes; ties go to the worker with fewer sessions, so a fresh pool spreads
  its first sessions, which hold no slab until they run). If that worker does not answer, the next is tried.
* ``fork`` stays on its parent's worker (the children share its device); every other session op goes to the
  session's worker.
* ``ping`` is answered here; ``stats`` returns the totals over the live workers (``sessions``, ``slab``, ... at the
  top level, as a server's) plus each worker's own stats under ``workers``.

Requests keep their client id on the way to the worker, so ownership between clients is enforced there exactly as on
a single server, and checked here too (a session id of another client is an :class:`UnknownSession`). Tensors pass
through (decoded, checked against the router's limits, and encoded again).

A worker that does not answer within ``worker_timeout_s`` (or answers "server shutting down") is *lost*: its
sessions answer :class:`~djinn_core.errors.WorkerLost` from then on, new sessions open on the other workers, and the
other sessions keep working. A lost worker is not retried (restart the router to take it back).

The router handles one request at a time (like a server's loop): while a worker computes, other clients wait. The
token is checked as a server checks it (constant time, before anything else is looked at), and the same token is
sent to the workers unless ``worker_token`` says otherwise. Sessions the router opened are left to the workers' idle
timeout when the router stops.
"""

from __future__ import annotations

import collections
import hmac
import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import zmq

from djinn_core.errors import (
    AuthenticationFailed,
    CheckpointStateError,
    ConfigError,
    DjinnError,
    ProtocolError,
    ServerUnavailable,
    UnknownSession,
    WorkerLost,
)
from djinn_core.rpc.config import ServerConfig
from djinn_core.rpc.ops import CLOSED_MEMORY, Request
from djinn_core.rpc.server import _error_header, _reply_id
from djinn_core.rpc.wire import Message, decode, decode_header, encode
from djinn_core.rpc.zmq_transport import ZmqClientTransport, ZmqServerTransport
from djinn_core.validation import check_number

log = logging.getLogger(__name__)

__all__ = ["MostFreeSlab", "PlacementPolicy", "Router", "WorkerRefused"]

ROUTER_CLIENT_ID = "djinn-router"  # the client id of the router's own requests to workers (stats)
DEFAULT_WORKER_TIMEOUT_S = 300.0
DEFAULT_MAX_REPLY_BYTES = 8 << 30
# totals over the workers' stats: top-level counters and the slab's byte counts
_SUMMED = ("sessions", "resident", "swapped", "clients", "requests", "errors", "evictions")
_SLAB_SUMMED = ("capacity", "used", "free")


class PlacementPolicy(Protocol):
    """Where a new session goes: ``choose`` gets each worker's ``stats`` (None for a lost worker) and returns the
    index of a live one."""

    def choose(self, stats: Sequence[dict[str, Any] | None]) -> int: ...


class MostFreeSlab:
    """The worker with the most free slab bytes (``stats["slab"]["free"]``); ties go to the one holding fewer
    sessions, then to the lowest index."""

    def choose(self, stats: Sequence[dict[str, Any] | None]) -> int:
        live = [(i, s) for i, s in enumerate(stats) if s is not None]
        if not live:
            raise ServerUnavailable("no live worker")

        def key(item: tuple[int, dict[str, Any]]) -> tuple[int, int, int]:
            i, s = item
            return (int((s.get("slab") or {}).get("free", 0)), -int(s.get("sessions", 0)), -i)

        return max(live, key=key)[0]


class WorkerRefused(Exception):
    """A worker's error reply, forwarded to the client under the worker's own error type name."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name
        self.message = message


@dataclass
class _Route:
    worker: int
    wsid: int  # the session's id on its worker
    owner: str  # client id


class _Worker:
    """One worker server: its address, a DEALER connection, and why it was lost (None while it answers)."""

    def __init__(self, index: int, address: str, context: zmq.Context, *, timeout_s: float, max_reply_bytes: int):
        self.index = index
        self.address = address
        self.timeout_s = timeout_s
        self.lost: str | None = None
        self._ids = itertools.count(1)
        self.transport: ZmqClientTransport | None = ZmqClientTransport(
            address, context, busy_poll_s=0.0, max_reply_bytes=max_reply_bytes, paths=collections.Counter())

    def call(self, header: dict[str, Any], tensors: Sequence[torch.Tensor]) -> Message:
        """One request (``header`` without ``id``) and its reply; :class:`ServerUnavailable` after the timeout."""
        rid = next(self._ids)
        self.transport.send(rid, encode({**header, "id": rid}, tensors), bool(tensors))
        reply, _ = self.transport.receive(rid, str(header.get("op")), self.timeout_s)
        return reply

    def lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            log.warning("worker %d (%s) lost: %s; its sessions are gone", self.index, self.address, why)
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class Router:
    """One endpoint over the servers at ``workers`` (see the module docstring).

    Args:
        workers: the workers' ZeroMQ endpoints (``tcp://host:port``), at least one, all distinct.
        config: where the router listens and what it accepts: ``host``, ``port``, ``token``, ``max_request_bytes``,
            ``max_header_bytes``, ``tick_s`` and ``linger_ms`` of a :class:`ServerConfig` (non-loopback needs a token).
        worker_token: the token sent to the workers (default: ``config.token``).
        worker_timeout_s: how long a worker may take to answer one request before it is lost. A request waits for
            its worker: give this more than the longest op (a long ``generate``) takes.
        placement: picks the worker of each new session (default :class:`MostFreeSlab`).
        max_reply_bytes: the largest reply accepted from a worker.

    ``start()`` binds and serves on a new thread; ``serve_forever()`` on the calling thread (the CLI); ``stop()``
    from any thread or a signal handler.
    """

    def __init__(self, workers: Sequence[str], config: ServerConfig | None = None, *,
                 worker_token: str | None = None, worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT_S,
                 placement: PlacementPolicy | None = None, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES):
        if isinstance(workers, str) or not isinstance(workers, Sequence) or not workers:
            raise ConfigError(f"workers must be a non-empty list of endpoints, got {workers!r}")
        for a in workers:
            if not isinstance(a, str) or "://" not in a:
                raise ConfigError(f"a worker must be a ZeroMQ endpoint like tcp://127.0.0.1:5557, got {a!r}")
        if len(set(workers)) != len(workers):
            raise ConfigError(f"workers must be distinct, got {list(workers)}")
        if config is not None and not isinstance(config, ServerConfig):
            raise ConfigError(f"config must be a ServerConfig, got {type(config).__name__}")
        if worker_token is not None and (not isinstance(worker_token, str) or not worker_token):
            raise ConfigError("worker_token must be a non-empty string or None")
        self.placement = placement or MostFreeSlab()
        if not callable(getattr(self.placement, "choose", None)):
            raise ConfigError(f"placement must have a choose(stats) method, got {type(self.placement).__name__}")
        self.config = config or ServerConfig()
        self.worker_token = worker_token if worker_token is not None else self.config.token
        self.worker_timeout_s = float(check_number("worker_timeout_s", worker_timeout_s, 0, strict_minimum=True))
        self._ctx = zmq.Context()
        self.workers = [_Worker(i, a, self._ctx, timeout_s=self.worker_timeout_s, max_reply_bytes=max_reply_bytes)
                        for i, a in enumerate(workers)]
        self.routes: dict[int, _Route] = {}  # global session id -> where it lives
        self._by_worker: dict[tuple[int, int], int] = {}  # (worker, worker session id) -> global session id
        self._closed: collections.OrderedDict[int, str] = collections.OrderedDict()  # closed id -> owner
        self._next_sid = itertools.count(1)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.transport: ZmqServerTransport | None = None
        self.address: str | None = None
        self.started_at = time.monotonic()
        self.counters: collections.Counter[str] = collections.Counter()
        self.ops: dict[str, Callable[[Request], tuple[dict[str, Any], list[torch.Tensor], Any]]] = {
            "ping": self._op_ping, "stats": self._op_stats, "open": self._op_open, "fork": self._op_fork,
            "sessions": self._op_sessions, "close": self._op_close}

    # -- life ------------------------------------------------------------------------------------------------------
    def bind(self) -> str:
        """Bind the endpoint; returns the bound address (``tcp://host:port``)."""
        if self.transport is None:
            cfg = self.config
            self.transport = ZmqServerTransport(cfg.endpoint, max_frame_bytes=2 * cfg.max_request_bytes
                                                + cfg.max_header_bytes, linger_ms=cfg.linger_ms)
            self.address = self.transport.address
            log.info("djinn router listening on %s over %d workers (%s), auth %s", self.address, len(self.workers),
                     ", ".join(w.address for w in self.workers), "on" if cfg.token else "off")
        return self.address

    def start(self) -> "Router":
        """Bind, then route on a background thread; returns self."""
        if self._thread is not None:
            raise ConfigError("router already started")
        self.bind()
        self._thread = threading.Thread(target=self._run, name="djinn-router", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Bind and route on the calling thread until :meth:`stop`."""
        self.bind()
        self._run()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the router to stop and, if it runs on its own thread, wait for it (at most ``timeout_s``; a request
        waiting for a worker finishes first)."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("djinn router thread still busy %.1f s after stop()", timeout_s)

    def __enter__(self) -> "Router":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        tick_ms = max(1, int(self.config.tick_s * 1000))
        try:
            while not self._stopping.is_set():
                self.transport.serve(self._handle_guarded, tick_ms, False, self._stopping)
        finally:
            self.transport.close()
            for w in self.workers:
                w.close()
            self._ctx.term()
            self._stopped.set()
            log.info("djinn router on %s stopped (%d requests routed)", self.address, self.counters["requests"])

    # -- one request -----------------------------------------------------------------------------------------------
    def _handle_guarded(self, origin: Any, body: list[Any] | None, slot_id: int | None,
                        error: Exception | None) -> None:
        try:
            self._handle(origin, body, error)
        except Exception:  # _handle answers every error itself; this is the last line
            self.counters["errors"] += 1
            log.exception("a message could not be handled")

    def _handle(self, origin: Any, body: list[Any] | None, error: Exception | None) -> None:
        """Check a request as a server does (bounded header, then the token, then the rest), route it, answer."""
        self.counters["requests"] += 1
        rid: Any = None
        try:
            if error is not None:
                raise error
            if not body:
                raise ProtocolError("empty message")
            header = decode_header(body[0], max_header_bytes=self.config.max_header_bytes)
            rid = _reply_id(header.get("id"))
            self._authenticate(header.get("token"))
            req = Request(decode(body, max_bytes=self.config.max_request_bytes, header=header), origin)
            fn = self.ops.get(req.op, self._op_forward)
            result, tensors, timing = fn(req)
            self.transport.send(origin, rid, encode({"id": rid, "ok": True, "result": result, **(timing or {})},
                                                    tensors))
        except Exception as e:  # one bad request never stops the router
            self.counters["errors"] += 1
            type_name, message = ((e.type_name, e.message) if isinstance(e, WorkerRefused)
                                  else (type(e).__name__, str(e)))
            if isinstance(e, (DjinnError, WorkerRefused)):
                log.info("request %r refused: %s: %s", rid, type_name, message[:500])
            else:
                log.exception("request %r failed", rid)
            try:
                self.transport.send(origin, rid, encode(_error_header(rid, type_name, message[:2000])))
            except Exception:
                log.exception("could not send the error reply to request %r", rid)

    def _authenticate(self, token: Any) -> None:
        expected = self.config.token
        if expected is None:
            return
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), expected.encode()):
            raise AuthenticationFailed("missing or wrong auth token")

    # -- workers ---------------------------------------------------------------------------------------------------
    def _call(self, w: _Worker, req: Request | None, op: str, *, session: int | None = None,
              args: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()) -> Message:
        """``op`` on worker ``w`` for ``req``'s client (the router's own id without ``req``); the reply to a
        successful call. A worker that does not answer is lost (:class:`WorkerLost`); its refusals are raised as
        :class:`WorkerRefused`."""
        if w.lost is not None:
            raise WorkerLost(f"worker {w.index} ({w.address}) is lost: {w.lost}")
        header = {"op": op, "client": req.client if req is not None else ROUTER_CLIENT_ID,
                  "token": self.worker_token, "session": session, "args": args or {}}
        try:
            reply = w.call(header, tensors)
        except ServerUnavailable as e:
            w.lose(str(e))
            raise WorkerLost(f"worker {w.index} ({w.address}) stopped answering: {e}") from None
        except ProtocolError as e:  # an unreadable reply: the worker is not one we can talk to
            w.lose(f"unreadable reply: {e}")
            raise WorkerLost(f"worker {w.index} ({w.address}) sent an unreadable reply: {e}") from None
        if not reply.header.get("ok"):
            err = reply.header.get("error") or {}
            type_name, message = str(err.get("type", "RemoteError")), str(err.get("message", ""))
            if type_name == "ServerUnavailable":  # the worker is shutting down
                w.lose(message)
                raise WorkerLost(f"worker {w.index} ({w.address}) is shutting down: {message}")
            raise WorkerRefused(type_name, message)
        return reply

    def _live(self) -> list[_Worker]:
        return [w for w in self.workers if w.lost is None]

    def _add_route(self, worker: int, wsid: Any, owner: str) -> int:
        if not isinstance(wsid, int):
            raise ProtocolError(f"worker {worker} returned session id {wsid!r}")
        gid = next(self._next_sid)
        self.routes[gid] = _Route(worker, wsid, owner)
        self._by_worker[(worker, wsid)] = gid
        return gid

    def _drop_route(self, gid: int) -> None:
        route = self.routes.pop(gid, None)
        if route is not None:
            self._by_worker.pop((route.worker, route.wsid), None)
            self._closed[gid] = route.owner
            while len(self._closed) > CLOSED_MEMORY:
                self._closed.popitem(last=False)

    def _route(self, req: Request) -> _Route | None:
        """The route of ``req.session`` for its client; None for a session this client closed (the op answers
        itself). Errors as a server's: ProtocolError without a session, UnknownSession for one not this client's."""
        gid = req.session
        if gid is None:
            raise ProtocolError(f"op {req.op!r} needs a 'session'")
        route = self.routes.get(gid)
        if route is None or route.owner != req.client:
            if self._closed.get(gid) == req.client:
                return None
            raise UnknownSession(f"no open session {gid} for client {req.client!r}")
        w = self.workers[route.worker]
        if w.lost is not None:
            raise WorkerLost(f"session {gid} lived on worker {w.index} ({w.address}), which is lost: {w.lost}")
        return route

    @staticmethod
    def _timing(reply: Message) -> dict[str, Any]:
        """The worker's op timing, passed on (``server_ms``; ``server_t`` is on the host's monotonic clock)."""
        return {k: reply.header[k] for k in ("server_ms", "server_t") if k in reply.header}

    def _rename(self, text: str, route: _Route, gid: int) -> str:
        return re.sub(rf"\bsession {route.wsid}\b", f"session {gid}", text)

    # -- ops -------------------------------------------------------------------------------------------------------
    def _op_ping(self, req: Request) -> tuple[dict[str, Any], list[torch.Tensor], Any]:
        return {}, [], None

    def worker_stats(self) -> list[dict[str, Any] | None]:
        """Each worker's stats (None for a lost one; a worker that does not answer is lost here)."""
        out: list[dict[str, Any] | None] = []
        for w in self.workers:
            try:
                out.append(self._call(w, None, "stats").header.get("result") if w.lost is None else None)
            except (WorkerLost, WorkerRefused) as e:
                log.info("no stats from worker %d: %s", w.index, e)
                out.append(None)
        return out

    def stats(self) -> dict[str, Any]:
        """Totals over the live workers (``sessions``, ``resident``, ``swapped``, ``requests``, ``slab``: capacity,
        used and free bytes), each worker's stats under ``workers``, and the router's own counters."""
        per = self.worker_stats()
        totals: dict[str, Any] = {k: sum(int(s.get(k) or 0) for s in per if s) for k in _SUMMED}
        totals["slab"] = {k: sum(int((s.get("slab") or {}).get(k) or 0) for s in per if s) for k in _SLAB_SUMMED}
        return {**totals,
                "workers": [{"address": w.address, "lost": w.lost, "stats": s} for w, s in zip(self.workers, per)],
                "live_workers": sum(1 for s in per if s is not None),
                "router": {"address": self.address, "sessions": len(self.routes),
                           "requests": self.counters["requests"], "errors": self.counters["errors"],
                           "uptime_s": time.monotonic() - self.started_at}}

    def _op_stats(self, req: Request) -> tuple[dict[str, Any], list[torch.Tensor], Any]:
        return self.stats(), [], None

    def _op_open(self, req: Request) -> tuple[dict[str, Any], list[torch.Tensor], Any]:
        """On the worker the placement picks; a worker lost meanwhile is skipped and the choice made again."""
        while True:
            per = self.worker_stats()
            if all(s is None for s in per):
                raise ServerUnavailable(f"no live worker of {len(self.workers)}")
            i = self.placement.choose(per)
            if not (isinstance(i, int) and 0 <= i < len(per) and per[i] is not None):
                raise ConfigError(f"placement {type(self.placement).__name__} chose {i!r}, not a live worker")
            try:
                reply = self._call(self.workers[i], req, "open", args=req.args, tensors=req.tensors)
            except WorkerLost:
                continue
            gid = self._add_route(i, (reply.header.get("result") or {}).get("session"), req.client)
            return {"session": gid}, [], self._timing(reply)

    def _op_fork(self, req: Request) -> tuple[dict[str, Any], list[torch.Tensor], Any]:
        """On the parent's worker: the children share its device."""
        route = self._route(req)
        if route is None:
            raise CheckpointStateError(f"session {req.session} is closed")
        try:
            reply = self._call(self.workers[route.worker], req, "fork", session=route.wsid, args=req.args)
        except WorkerRefused as e:
            raise WorkerRefused(e.type_name, self._rename(e.message, route, req.session)) from None
        ids = (reply.header.get("result") or {}).get("sessions")
        if not isinstance(ids, list):
            raise ProtocolError(f"worker {route.worker} answered fork with {ids!r}")
        return {"sessions": [self._add_route(route.worker, c, req.client) for c in ids]}, [], self._timing(reply)

    def _op_sessions(self, req: Request) -> tuple[dict[str, Any], list[torch.Tensor], Any]:
        """This client's sessions on every live worker that the router opened, under their global ids."""
        mine = []
        for w in self._live():
            try:
                listed = (self._call(w, req, "sessions").header.get("result") or {}).get("sessions") or []
            except WorkerLost:
                continue
            for info in listed:
                gid = self._by_worker.get((w.index, info.get("session"))) if isinstance(info, dict) else None
                if gid is not None:
                    mine.append({**info, "session": gid})
        return {"sessions": mine}, [], None

    def _op_close(self, req: Request) -> tuple[dict[str, Any], list[torch.Tensor], Any]:
        """Idempotent, as on a server."""
        route = self._route(req)
        if route is None:
            return {}, [], None
        reply = self._forward(req, route)
        self._drop_route(req.session)
        return {}, [], self._timing(reply)

    def _op_forward(self, req: Request) -> tuple[dict[str, Any], list[torch.Tensor], Any]:
        """Any other op with a session: to the session's worker, ids rewritten both ways."""
        if req.session is None:
            raise ProtocolError(f"unknown op {str(req.op)[:64]!r} (the router forwards only ops on a session; its "
                                f"own: {sorted(self.ops)})")
        route = self._route(req)
        if route is None:
            raise CheckpointStateError(f"session {req.session} is closed")
        reply = self._forward(req, route)
        result = reply.header.get("result")
        if isinstance(result, dict) and "session" in result:
            result = {**result, "session": req.session}
        return result if isinstance(result, dict) else {}, reply.tensors, self._timing(reply)

    def _forward(self, req: Request, route: _Route) -> Message:
        try:
            return self._call(self.workers[route.worker], req, req.op, session=route.wsid, args=req.args,
                              tensors=req.tensors)
        except WorkerRefused as e:
            raise WorkerRefused(e.type_name, self._rename(e.message, route, req.session)) from None
