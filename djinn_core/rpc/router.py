"""One endpoint over several Djinn servers (``djinn route``): a client never needs to know where its session lives.

A :class:`Router` binds one ZeroMQ endpoint that speaks the server's wire protocol (:mod:`djinn_core.rpc.wire`; a
:class:`~djinn_core.rpc.client.Client` of the router works unchanged) and holds one connection per *worker*: a
``djinn serve`` process, typically one per GPU. It keeps a map *global session id -> (worker, worker session id)* and
rewrites session ids both ways: in requests (``session``) and in replies (``open``'s and ``fork``'s ids, ``info``-like
results, ``sessions``' listings, and error messages that name a session).

* ``open`` goes to the worker a placement policy picks from every live worker's ``stats``, counting the sessions
  placed on it since those stats were taken (default :class:`MostFreeSlab`: the most free slab bytes per session,
  so a fresh pool spreads its first sessions, which hold no slab until they run). If that worker is lost before it
  answers, the choice is made again over the others.
* ``fork`` stays on its parent's worker (the children share its device); every other session op goes to the
  session's worker.
* ``ping`` is answered here; ``stats`` returns the totals over the live workers (``sessions``, ``slab``, ... at the
  top level, as a server's) plus each worker's own stats under ``workers``.

Concurrency: one loop (the *router thread*) polls the client-facing ROUTER socket and one DEALER socket per worker
together. A request is forwarded at once, under a router-assigned id (per worker) that maps its reply back to the
waiting client, whose own id the reply gets again; replies are relayed as they arrive. So requests for different
workers are in flight at the same time, and a slow op on one GPU delays only the requests queued behind it on that
worker. A worker serves one connection's requests in arrival order, so each session's requests keep their order.
Ops that need every worker (``open``'s placement, ``stats``, ``sessions``) ask them all at once and answer when the
last live one has: they wait for the busiest worker's queue, but nothing else waits for them.

Requests keep their client id on the way to the worker, so ownership between clients is enforced there exactly as on
a single server, and checked here too (a session id of another client is an :class:`UnknownSession`). Tensors pass
through (decoded, checked against the router's limits, and encoded again).

A worker with requests outstanding that sends no reply for ``worker_timeout_s`` (or answers "server shutting down",
or something unreadable) is *lost*: its outstanding requests and every later one for its sessions answer
:class:`~djinn_core.errors.WorkerLost`, new sessions open on the other workers, and the other sessions keep working.
A lost worker is not retried (restart the router to take it back).

The token is checked as a server checks it (constant time, before anything else is looked at), and the same token is
sent to the workers unless ``worker_token`` says otherwise. On ``stop()`` the router refuses new requests ("router
shutting down") and relays the replies to requests outstanding on workers for up to :data:`STOP_WAIT_S`; those
still waiting then are refused too. Sessions the router opened are left to the workers' idle timeout.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import zmq

from djinn_core.errors import (
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
from djinn_core.rpc.service import LoopService
from djinn_core.rpc.wire import (Message, check_token, decode, encode, error_header, reply_id,
                                  request_header)
from djinn_core.rpc.zmq_transport import REPLY_HEADER_BYTES, ZERO_COPY_BYTES, ZmqServerTransport
from djinn_core.validation import check_int, check_number

log = logging.getLogger(__name__)

__all__ = ["MostFreeSlab", "PlacementPolicy", "Router", "WorkerRefused"]

ROUTER_CLIENT_ID = "djinn-router"  # the client id of the router's own requests to workers (stats)
DEFAULT_WORKER_TIMEOUT_S = 300.0
DEFAULT_MAX_REPLY_BYTES = 8 << 30
STOP_WAIT_S = 10.0  # after stop(), how long requests outstanding on workers may still be answered
# totals over the workers' stats: top-level counters and the slab's byte counts
_SUMMED = ("sessions", "resident", "swapped", "clients", "requests", "errors", "evictions")
_SLAB_SUMMED = ("capacity", "used", "free")


class PlacementPolicy(Protocol):
    """Where a new session goes: ``choose`` gets each worker's ``stats`` (None for a lost worker) and returns the
    index of a live one."""

    def choose(self, stats: Sequence[dict[str, Any] | None]) -> int: ...


class MostFreeSlab:
    """The worker with the most free slab bytes per session once this one is added: ``stats["slab"]["free"] /
    (stats["sessions"] + 1)``; ties go to the one holding fewer sessions, then to the lowest index.

    Per session, not in total: a session takes no slab until it runs, so a burst of opens would otherwise all see
    the same free bytes and land on one worker. The router counts the sessions it placed on a worker after the
    worker's stats were taken (:meth:`Router._op_open`), so opens decided on one snapshot still spread."""

    def choose(self, stats: Sequence[dict[str, Any] | None]) -> int:
        live = [(i, s) for i, s in enumerate(stats) if s is not None]
        if not live:
            raise ServerUnavailable("no live worker")

        def key(item: tuple[int, dict[str, Any]]) -> tuple[float, int, int]:
            i, s = item
            sessions = int(s.get("sessions", 0))
            return (int((s.get("slab") or {}).get("free", 0)) / (sessions + 1), -sessions, -i)

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


@dataclass
class _Job:
    """One client request until it is answered (exactly once: ``done``)."""

    origin: Any  # the client's routing frames
    rid: Any  # the client's request id, echoed in the reply
    req: Request | None = None
    done: bool = False


# what a worker's reply comes to: the reply (ok), or WorkerRefused (its error reply), WorkerLost, ServerUnavailable
Outcome = Message | Exception


@dataclass
class _Pending:
    """A request outstanding on a worker: the job it serves and what to do with the outcome (on the router thread)."""

    job: _Job
    then: Callable[[Outcome], None]
    sent: float = field(default_factory=time.monotonic)


class _Worker:
    """One worker server: its address, a DEALER socket the router's loop polls, the requests outstanding on it
    (router request id -> :class:`_Pending`, oldest first), and why it was lost (None while it answers)."""

    def __init__(self, index: int, address: str, context: zmq.Context):
        self.index = index
        self.address = address
        self.lost: str | None = None
        self.outstanding: dict[int, _Pending] = {}
        self.last_reply = 0.0  # host monotonic time of its last reply
        self.opens_sent = 0  # opens forwarded to it: those after a stats request are not in that request's reply
        self._ids = itertools.count(1)
        self.sock: zmq.Socket | None = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        try:
            self.sock.connect(address)
        except zmq.ZMQError as e:
            self.close()
            raise ConfigError(f"cannot connect to worker {address!r}: {e}") from None

    def send(self, header: dict[str, Any], tensors: Sequence[torch.Tensor], pending: _Pending) -> None:
        """Forward one request (``header`` without ``id``; the router's id for it is added and maps the reply to
        ``pending``). Never waits: a worker whose queue is full refuses it (:class:`ServerUnavailable`)."""
        rid = next(self._ids)
        frames = encode({**header, "id": rid}, tensors)
        small = all(memoryview(f).nbytes < ZERO_COPY_BYTES for f in frames)
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=small)
        except zmq.Again:
            raise ServerUnavailable(f"worker {self.index} ({self.address}) has {len(self.outstanding)} requests "
                                    "queued and takes no more now") from None
        self.outstanding[rid] = pending

    def overdue(self, now: float, timeout_s: float) -> bool:
        """Requests wait and the worker has sent no reply for ``timeout_s`` (since the oldest was sent, or since its
        last reply: replies come in request order, so the oldest is the one it works on)."""
        if not self.outstanding:
            return False
        oldest = next(iter(self.outstanding.values())).sent
        return now - max(oldest, self.last_reply) > timeout_s

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Router(LoopService):
    """One endpoint over the servers at ``workers`` (see the module docstring).

    Args:
        workers: the workers' ZeroMQ endpoints (``tcp://host:port``), at least one, all distinct.
        config: where the router listens and what it accepts: ``host``, ``port``, ``token``, ``max_request_bytes``,
            ``max_header_bytes``, ``tick_s`` and ``linger_ms`` of a :class:`ServerConfig` (non-loopback
            needs a token).
        worker_token: the token sent to the workers (default: ``config.token``).
        worker_timeout_s: how long a worker with requests outstanding may go without replying before it is lost.
            Its requests run one at a time: give this more than the longest op (a long ``generate``) takes.
        placement: picks the worker of each new session (default :class:`MostFreeSlab`).
        max_reply_bytes: the largest reply accepted from a worker.

    ``start()`` binds and routes on a new thread; ``serve_forever()`` on the calling thread (the CLI); ``stop()``
    from any thread or a signal handler (:class:`~djinn_core.rpc.service.LoopService`). Everything else runs on the
    router thread.
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
        super().__init__("router")
        self.config = config or ServerConfig()
        self.worker_token = worker_token if worker_token is not None else self.config.token
        self.worker_timeout_s = float(check_number("worker_timeout_s", worker_timeout_s, 0, strict_minimum=True))
        self.max_reply_bytes = check_int("max_reply_bytes", max_reply_bytes, 1)
        self._ctx = zmq.Context()
        self.workers = [_Worker(i, a, self._ctx) for i, a in enumerate(workers)]
        self._poller = zmq.Poller()
        for w in self.workers:
            self._poller.register(w.sock, zmq.POLLIN)
        self.routes: dict[int, _Route] = {}  # global session id -> where it lives
        self._by_worker: dict[tuple[int, int], int] = {}  # (worker, worker session id) -> global session id
        self._closed: collections.OrderedDict[int, str] = collections.OrderedDict()  # closed id -> owner
        self._next_sid = itertools.count(1)
        self.transport: ZmqServerTransport | None = None
        self.started_at = time.monotonic()
        # each op answers its job itself, at once or when its workers have replied
        self.ops: dict[str, Callable[[_Job], None]] = {
            "ping": self._op_ping, "stats": self._op_stats, "open": self._op_open, "fork": self._op_fork,
            "sessions": self._op_sessions, "close": self._op_close}

    # -- life ------------------------------------------------------------------------------------------------------
    def bind(self) -> str:
        """Bind the endpoint; returns the bound address (``tcp://host:port``)."""
        if self.transport is None:
            cfg = self.config
            self.transport = ZmqServerTransport(cfg.endpoint, max_frame_bytes=2 * cfg.max_request_bytes
                                                + cfg.max_header_bytes, linger_ms=cfg.linger_ms)
            self._poller.register(self.transport.sock, zmq.POLLIN)
            self.address = self.transport.address
            log.info("djinn router listening on %s over %d workers (%s), auth %s", self.address, len(self.workers),
                     ", ".join(w.address for w in self.workers), "on" if cfg.token else "off")
        return self.address

    def _run(self) -> None:
        """The router thread: relay worker replies, take client requests, lose overdue workers; after a stop, drain."""
        tick_ms = max(1, int(self.config.tick_s * 1000))
        client_sock = self.transport.sock
        drain_until: float | None = None
        try:
            while True:
                now = time.monotonic()
                if self._stopping.is_set():
                    drain_until = now + STOP_WAIT_S if drain_until is None else drain_until
                    if now >= drain_until or not any(w.outstanding for w in self.workers):
                        break
                ready = dict(self._poller.poll(tick_ms))
                for w in self.workers:  # replies first: they free clients
                    if w.sock is not None and w.sock in ready:
                        self._relay(w)
                if client_sock in ready:
                    self.transport.serve(self._handle_guarded, 0, False, None)
                now = time.monotonic()
                for w in self._live():
                    if w.overdue(now, self.worker_timeout_s):
                        self._lose(w, f"stopped answering: no reply within {self.worker_timeout_s:g} s")
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        left = [p.job for w in self.workers for p in w.outstanding.values()]
        for w in self.workers:
            w.outstanding.clear()
        for job in left:
            self._fail(job, ServerUnavailable("router shutting down"))
        self.transport.close()
        for w in self.workers:
            w.close()
        self._ctx.term()
        self._stopped.set()
        log.info("djinn router on %s stopped (%d requests routed, %d left unanswered by workers)", self.address,
                 self.counters["requests"], len(left))

    # -- client requests -------------------------------------------------------------------------------------------
    def _handle(self, origin: Any, body: list[Any] | None, slot_id: int | None, error: Exception | None) -> None:
        """Check a request as a server does (bounded header, then the token, then the rest) and start its op."""
        self.counters["requests"] += 1
        job = _Job(origin, None)
        try:
            header = request_header(body, error, max_header_bytes=self.config.max_header_bytes)
            job.rid = reply_id(header.get("id"))
            check_token(self.config.token, header.get("token"))
            if self._stopping.is_set():
                raise ServerUnavailable("router shutting down")
            job.req = Request(decode(body, max_bytes=self.config.max_request_bytes, header=header), origin)
            self.ops.get(job.req.op, self._op_forward)(job)
        except Exception as e:  # one bad request never stops the router
            self._fail(job, e)

    def _answer(self, job: _Job, result: dict[str, Any], tensors: Sequence[torch.Tensor] = (),
                timing: dict[str, Any] | None = None) -> None:
        """The reply to ``job`` (once; a result that cannot be encoded is answered as an error)."""
        if job.done:
            return
        try:
            frames = encode({"id": job.rid, "ok": True, "result": result, **(timing or {})}, tensors)
        except Exception as e:
            self._fail(job, e)
            return
        job.done = True
        try:
            self.transport.send(job.origin, job.rid, frames)
        except Exception:
            log.exception("could not send the reply to request %r", job.rid)

    def _fail(self, job: _Job, e: Exception) -> None:
        """The error reply to ``job`` (once): a worker's refusal under its own type name, else ``e``'s."""
        if job.done:
            return
        job.done = True
        self.counters["errors"] += 1
        type_name, message = ((e.type_name, e.message) if isinstance(e, WorkerRefused)
                              else (type(e).__name__, str(e)))
        if isinstance(e, (DjinnError, WorkerRefused)):
            log.info("request %r refused: %s: %s", job.rid, type_name, message[:500])
        else:
            log.error("request %r failed", job.rid, exc_info=e)
        try:
            self.transport.send(job.origin, job.rid, encode(error_header(job.rid, type_name, message[:2000])))
        except Exception:
            log.exception("could not send the error reply to request %r", job.rid)

    # -- workers ---------------------------------------------------------------------------------------------------
    def _ask(self, w: _Worker, job: _Job, op: str, then: Callable[[Outcome], None], *, client: str,
             session: int | None = None, args: dict[str, Any] | None = None,
             tensors: Sequence[torch.Tensor] = ()) -> None:
        """Send ``op`` to worker ``w`` for ``client`` without waiting; ``then(outcome)`` runs on the router thread
        when the reply comes (or the worker is lost). An exception ``then`` raises is ``job``'s error reply."""
        if w.lost is not None:
            raise WorkerLost(f"worker {w.index} ({w.address}) is lost: {w.lost}")
        header = {"op": op, "client": client, "token": self.worker_token, "session": session, "args": args or {}}
        w.send(header, tensors, _Pending(job, then))

    def _relay(self, w: _Worker) -> None:
        """Every reply waiting on ``w``'s socket, to the request it answers."""
        while w.lost is None:
            try:
                frames = w.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            w.last_reply = time.monotonic()
            try:
                reply = decode(frames, max_bytes=self.max_reply_bytes, max_header_bytes=REPLY_HEADER_BYTES)
            except ProtocolError as e:  # not a worker we can talk to
                self._lose(w, f"sent an unreadable reply: {e}")
                return
            h = reply.header
            rid = h.get("id")
            if rid is None and not h.get("ok") and w.outstanding:  # our header was unreadable: replies keep order
                rid = next(iter(w.outstanding))
            pending = w.outstanding.pop(rid, None) if isinstance(rid, int) else None
            if pending is None:
                log.debug("worker %d: discarding a reply to no outstanding request (id %r)", w.index, rid)
                continue
            if h.get("ok"):
                self._settle(pending, reply)
                continue
            err = h.get("error") or {}
            type_name, message = str(err.get("type", "RemoteError")), str(err.get("message", ""))
            if type_name == "ServerUnavailable":  # the worker is shutting down
                why = f"is shutting down: {message}"
                self._settle(pending, WorkerLost(f"worker {w.index} ({w.address}) {why}"))
                self._lose(w, why)
                return
            self._settle(pending, WorkerRefused(type_name, message))

    def _settle(self, pending: _Pending, outcome: Outcome) -> None:
        try:
            pending.then(outcome)
        except Exception as e:
            self._fail(pending.job, e)

    def _lose(self, w: _Worker, why: str) -> None:
        """Mark ``w`` lost (``why``: e.g. "stopped answering: ..."); its outstanding requests get WorkerLost."""
        if w.lost is not None:
            return
        w.lost = why
        log.warning("worker %d (%s) lost: %s; its sessions are gone", w.index, w.address, why)
        self._poller.unregister(w.sock)
        w.close()
        pending = list(w.outstanding.values())
        w.outstanding.clear()
        for p in pending:
            self._settle(p, WorkerLost(f"worker {w.index} ({w.address}) {why}"))

    def _gather(self, job: _Job, op: str, client: str,
                then: Callable[[list[dict[str, Any] | None]], None]) -> None:
        """``op`` on every live worker at once; ``then(results)`` when the last has answered: each worker's result
        (None for a lost worker or one that refused)."""
        results: list[dict[str, Any] | None] = [None] * len(self.workers)
        waiting = {w.index for w in self._live()}

        def one(i: int) -> Callable[[Outcome], None]:
            def got(outcome: Outcome) -> None:
                waiting.discard(i)
                if isinstance(outcome, Message):
                    result = outcome.header.get("result")
                    results[i] = result if isinstance(result, dict) else {}
                else:
                    log.info("no %s from worker %d: %s", op, i, outcome)
                if not waiting:
                    then(results)
            return got

        if not waiting:
            then(results)
        for i in sorted(waiting):
            try:
                self._ask(self.workers[i], job, op, one(i), client=client)
            except (WorkerLost, ServerUnavailable) as e:
                one(i)(e)

    @staticmethod
    def _ok(outcome: Outcome, route: _Route | None = None, gid: int | None = None) -> Message:
        """The reply in ``outcome``, else its error raised (a refusal naming ``route``'s session renamed ``gid``)."""
        if isinstance(outcome, WorkerRefused) and route is not None:
            raise WorkerRefused(outcome.type_name, re.sub(rf"\bsession {route.wsid}\b", f"session {gid}",
                                                          outcome.message))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

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

    # -- ops (router thread; each answers its job) -----------------------------------------------------------------
    def _op_ping(self, job: _Job) -> None:
        self._answer(job, {})

    def _op_stats(self, job: _Job) -> None:
        """Totals over the live workers (``sessions``, ``resident``, ``swapped``, ``requests``, ``slab``: capacity,
        used and free bytes), each worker's stats under ``workers``, and the router's own counters."""
        self._gather(job, "stats", ROUTER_CLIENT_ID, lambda per: self._answer(job, self._totals(per)))

    def _totals(self, per: list[dict[str, Any] | None]) -> dict[str, Any]:
        totals: dict[str, Any] = {k: sum(int(s.get(k) or 0) for s in per if s) for k in _SUMMED}
        totals["slab"] = {k: sum(int((s.get("slab") or {}).get(k) or 0) for s in per if s) for k in _SLAB_SUMMED}
        return {**totals,
                "workers": [{"address": w.address, "lost": w.lost, "outstanding": len(w.outstanding), "stats": s}
                            for w, s in zip(self.workers, per)],
                "live_workers": sum(1 for s in per if s is not None),
                "router": {"address": self.address, "sessions": len(self.routes),
                           "requests": self.counters["requests"], "errors": self.counters["errors"],
                           "uptime_s": time.monotonic() - self.started_at}}

    def _op_open(self, job: _Job) -> None:
        """On the worker the placement picks from fresh stats; if that worker is lost before it answers, placed
        again over the others."""
        req = job.req

        sent = [w.opens_sent for w in self.workers]  # a worker's stats reply counts the opens sent before its request

        def place(per: list[dict[str, Any] | None]) -> None:
            per = [None if s is None or self.workers[i].lost is not None
                   else {**s, "sessions": int(s.get("sessions", 0)) + self.workers[i].opens_sent - sent[i]}
                   for i, s in enumerate(per)]  # lost meanwhile: None; sessions placed since the stats: counted
            if all(s is None for s in per):
                raise ServerUnavailable(f"no live worker of {len(self.workers)}")
            i = self.placement.choose(per)
            if not (isinstance(i, int) and 0 <= i < len(per) and per[i] is not None):
                raise ConfigError(f"placement {type(self.placement).__name__} chose {i!r}, not a live worker")

            def opened(outcome: Outcome) -> None:
                if isinstance(outcome, WorkerLost):
                    self._op_open(job)
                    return
                reply = self._ok(outcome)
                gid = self._add_route(i, (reply.header.get("result") or {}).get("session"), req.client)
                self._answer(job, {"session": gid}, (), self._timing(reply))

            self._ask(self.workers[i], job, "open", opened, client=req.client, args=req.args, tensors=req.tensors)
            self.workers[i].opens_sent += 1

        self._gather(job, "stats", ROUTER_CLIENT_ID, place)

    def _op_fork(self, job: _Job) -> None:
        """On the parent's worker: the children share its device."""
        req = job.req
        route = self._route(req)
        if route is None:
            raise CheckpointStateError(f"session {req.session} is closed")

        def forked(outcome: Outcome) -> None:
            reply = self._ok(outcome, route, req.session)
            ids = (reply.header.get("result") or {}).get("sessions")
            if not isinstance(ids, list):
                raise ProtocolError(f"worker {route.worker} answered fork with {ids!r}")
            self._answer(job, {"sessions": [self._add_route(route.worker, c, req.client) for c in ids]}, (),
                         self._timing(reply))

        self._ask(self.workers[route.worker], job, "fork", forked, client=req.client, session=route.wsid,
                  args=req.args)

    def _op_sessions(self, job: _Job) -> None:
        """This client's sessions on every live worker that the router opened, under their global ids."""
        def listed(per: list[dict[str, Any] | None]) -> None:
            mine = []
            for i, result in enumerate(per):
                for info in (result or {}).get("sessions") or []:
                    gid = self._by_worker.get((i, info.get("session"))) if isinstance(info, dict) else None
                    if gid is not None:
                        mine.append({**info, "session": gid})
            self._answer(job, {"sessions": mine})

        self._gather(job, "sessions", job.req.client, listed)

    def _op_close(self, job: _Job) -> None:
        """Idempotent, as on a server."""
        req = job.req
        route = self._route(req)
        if route is None:
            self._answer(job, {})
            return

        def closed(outcome: Outcome) -> None:
            reply = self._ok(outcome, route, req.session)
            self._drop_route(req.session)
            self._answer(job, {}, (), self._timing(reply))

        self._forward(job, route, closed)

    def _op_forward(self, job: _Job) -> None:
        """Any other op with a session: to the session's worker, ids rewritten both ways."""
        req = job.req
        if req.session is None:
            raise ProtocolError(f"unknown op {str(req.op)[:64]!r} (the router forwards only ops on a session; its "
                                f"own: {sorted(self.ops)})")
        route = self._route(req)
        if route is None:
            raise CheckpointStateError(f"session {req.session} is closed")

        def relayed(outcome: Outcome) -> None:
            reply = self._ok(outcome, route, req.session)
            result = reply.header.get("result")
            if isinstance(result, dict) and "session" in result:
                result = {**result, "session": req.session}
            self._answer(job, result if isinstance(result, dict) else {}, reply.tensors, self._timing(reply))

        self._forward(job, route, relayed)

    def _forward(self, job: _Job, route: _Route, then: Callable[[Outcome], None]) -> None:
        req = job.req
        self._ask(self.workers[route.worker], job, req.op, then, client=req.client, session=route.wsid,
                  args=req.args, tensors=req.tensors)
