"""ZeroMQ transport: the server's ROUTER socket and a client's DEALER socket (:mod:`djinn_core.rpc.transport`).

Every server offers it; it carries every message the shared-memory channel does not. A message is one ZeroMQ
multipart message: routing frames (added by ZeroMQ), then the frames of :mod:`djinn_core.rpc.wire`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

import zmq

from djinn_core.errors import ConfigError, ProtocolError, ServerUnavailable
from djinn_core.rpc.transport import ClientTransport, Handler, ServerTransport
from djinn_core.rpc.wire import Message, decode

log = logging.getLogger(__name__)

ZERO_COPY_BYTES = 1 << 16  # below this, copying a frame is cheaper than ZeroMQ's zero-copy bookkeeping
REPLY_HEADER_BYTES = 1 << 20  # the largest reply header a client reads
WARM_EVERY_S = 100e-6  # while spinning for a reply, decode the last small one again this often ...
WARM_MAX_BYTES = 1 << 20  # ... if it was at most this big


def _all_small(frames: Sequence[Any]) -> bool:
    return all(memoryview(f).nbytes < ZERO_COPY_BYTES for f in frames)


def split_route(frames: list[Any]) -> tuple[tuple[bytes, ...], list[Any]]:
    """(routing frames to echo, as bytes; message body): the peer id, plus the empty delimiter a REQ socket adds."""
    route, body = frames[:1], frames[1:]
    if body and len(body[0]) == 0:
        route, body = frames[:2], frames[2:]
    return tuple(bytes(getattr(f, "bytes", f)) for f in route), body


class ZmqServerTransport(ServerTransport):
    """A bound ROUTER socket; a request's origin and reply path are its routing frames (a tuple of bytes).

    Args:
        endpoint: ``tcp://host:port`` to bind (port ``*``: any free one).
        max_frame_bytes: libzmq drops a larger frame and closes the sender's connection (``ZMQ_MAXMSGSIZE``).
        linger_ms: how long, at close, pending replies may take to leave.
    """

    def __init__(self, endpoint: str, *, max_frame_bytes: int, linger_ms: int):
        self.linger_ms = linger_ms
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            self._ctx.term()
            raise ConfigError(f"cannot bind {endpoint}: {e}") from None
        self.sock: zmq.Socket | None = sock
        self.address: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve(self, handle: Handler, wait_ms: int, spinning: bool = False,
              stop: threading.Event | None = None) -> bool:
        sock = self.sock
        if not sock.poll(wait_ms, zmq.POLLIN):
            return False
        while stop is None or not stop.is_set():  # everything queued, one request at a time
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            route, body = split_route(frames)
            handle(route, body, None, None)
        return True

    def reply_path(self, origin: Any, header: dict[str, Any], rid: Any) -> Any:
        return origin

    def stages(self, path: Any) -> bool:
        return False

    def send(self, path: Any, rid: Any, frames: Sequence[Any], staged: bool = False) -> None:
        self.sock.send_multipart([*path, *frames], copy=staged or _all_small(frames))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=self.linger_ms)
            self._ctx.term()
            self.sock = None


class ZmqClientTransport(ClientTransport):
    """A DEALER socket connected to the server. With ``busy_poll_s`` it spins for each reply before sleeping, and
    while spinning decodes its last small reply with tensors again every ``WARM_EVERY_S`` (:meth:`warm`).

    Args:
        paths: counts which way each message went (``request_zmq``, ``reply_zmq``), shared with the client.
    """

    def __init__(self, address: str, context: zmq.Context, *, busy_poll_s: float, max_reply_bytes: int,
                 paths: Any):
        self.address = address
        self.busy_poll_s = busy_poll_s
        self.max_reply_bytes = max_reply_bytes
        self.paths = paths
        self.warm_frames: list[Any] | None = None  # the last small reply with tensors, decoded again while spinning
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        try:
            self.sock.connect(address)
        except zmq.ZMQError as e:
            self.sock.close()
            raise ConfigError(f"cannot connect to {address!r}: {e}") from None

    def send(self, rid: int, frames: list[Any], has_tensors: bool) -> None:
        self.sock.send_multipart(frames, copy=not has_tensors or _all_small(frames))
        self.paths["request_zmq"] += 1

    def send_nowait(self, frames: list[Any]) -> None:
        """Send without waiting for room (dropped if there is none)."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def take(self, rid: int) -> Message | None:
        """Receive one waiting reply: the reply to ``rid`` (or an error about an unreadable request), else None (a
        stale reply, dropped)."""
        frames = self.sock.recv_multipart(copy=False)
        reply = decode(frames, max_bytes=self.max_reply_bytes, max_header_bytes=REPLY_HEADER_BYTES)
        got = reply.header.get("id")
        if got == rid or (got is None and not reply.header.get("ok")):  # None: our header was unreadable
            self.paths["reply_zmq"] += 1
            self.keep_warm(frames)
            return reply
        log.debug("discarding a stale reply (id %r, waiting for %d)", got, rid)
        return None

    def receive(self, rid: int, op: str, timeout_s: float) -> tuple[Message, float]:
        deadline = time.monotonic() + timeout_s
        now = time.monotonic()
        spin_until = now + self.busy_poll_s
        next_warm = now + WARM_EVERY_S
        while True:
            if self.busy_poll_s and (now := time.monotonic()) < spin_until and not self.sock.poll(0, zmq.POLLIN):
                next_warm = self.warm_if_due(now, next_warm)
                continue  # spinning: this thread stays awake and sees the reply at once
            left_ms = int((deadline - time.monotonic()) * 1000)
            if not (left_ms > 0 and self.sock.poll(left_ms, zmq.POLLIN)):
                raise self.timed_out(op, timeout_s)
            t_seen = time.perf_counter()
            reply = self.take(rid)
            if reply is not None:
                return reply, t_seen

    def timed_out(self, op: str, timeout_s: float) -> ServerUnavailable:
        return ServerUnavailable(f"no reply from {self.address} to {op!r} within {timeout_s:g} s (server down, "
                                 "overloaded, or it dropped a request over its hard size cap)")

    # -- keeping the reply path warm while spinning -----------------------------------------------------------------
    def keep_warm(self, frames: list[Any]) -> None:
        """Keep a small reply that carries tensors, to decode while spinning for the next (see :meth:`warm`); a
        reply without tensors (most calls between two resumes) leaves the kept one in place."""
        if not self.busy_poll_s or len(frames) < 2:
            return
        if sum(len(memoryview(getattr(f, "buffer", f))) for f in frames) <= WARM_MAX_BYTES:
            self.warm_frames = frames

    def warm_if_due(self, now: float, due: float) -> float:
        """:meth:`warm` if ``now`` has reached ``due``; the next time it is due."""
        if now < due:
            return due
        self.warm()
        return time.monotonic() + WARM_EVERY_S

    def warm(self) -> None:
        """Decode the last small reply again: code that runs right after a long spin runs several times slower
        unless the spin keeps it warm (``docs/notes/rpc.md``). A kept reply that no longer decodes is dropped."""
        frames = self.warm_frames
        if frames is not None:
            try:
                decode([bytearray(memoryview(getattr(f, "buffer", f))) for f in frames],
                       max_bytes=self.max_reply_bytes, max_header_bytes=REPLY_HEADER_BYTES)
            except ProtocolError:
                self.warm_frames = None

    def close(self, goodbye: dict[str, Any] | None = None, linger_ms: int = 0) -> None:
        if self.sock is not None:
            self.sock.close(linger=linger_ms)
            self.sock = None
