"""Shared-memory transport: requests and replies through a :mod:`djinn_core.rpc.local_channel` for a client on the
server's host, layered over a ZeroMQ transport (:mod:`djinn_core.rpc.transport`).

A client asks for a channel with op ``attach_local`` (over ZeroMQ); the server makes one per connection. A reply goes
into the channel when the request named it (``reply_to``) from the channel's own connection and it fits; a request
goes into it while the server says its loop polls the slot (with each reply the server publishes until when it
spins, ``busy_poll_s``). Everything else goes through the ZeroMQ transport below. Why a request in a slot is never
stranded, and why a message is never overwritten while read: :mod:`djinn_core.rpc.local_channel`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

import zmq

from djinn_core.errors import ConfigError, ProtocolError, ServerUnavailable, SessionLimitReached
from djinn_core.rpc import local_channel
from djinn_core.rpc.local_channel import ClientChannel, ServerChannel
from djinn_core.rpc.transport import ClientTransport, Handler, PendingReply, Pin, ServerTransport
from djinn_core.rpc.wire import Message, decode, decode_header, encode
from djinn_core.rpc.zmq_transport import REPLY_HEADER_BYTES, WARM_EVERY_S, ZmqClientTransport, ZmqServerTransport
from djinn_core.validation import check_int, is_int

log = logging.getLogger(__name__)


ZMQ_EVERY = 8  # spinning on hot channels, the loop looks at the ZeroMQ socket every 8th time (as the client does)


def _route(origin: Any) -> tuple[bytes, ...]:
    """The ZeroMQ connection a request came from, whichever way it came."""
    return origin.route if type(origin) is ServerChannel else origin


def _fill_op_end(header: dict[str, Any], t_done: float) -> None:
    """A header-first reply's header leaves the op's end (``server_t[3]``, ``server_ms``) to the slot, which stored
    it with the tensor frames: put it where a reply sent whole has it."""
    st = header.get("server_t")
    if isinstance(st, list) and len(st) == 4 and st[3] is None and isinstance(st[1], float):
        st[3] = t_done
        header["server_ms"] = (t_done - st[1]) * 1e3


class ShmServerTransport(ServerTransport):
    """The server's channels over ``inner``: origins and reply paths are a :class:`ServerChannel` or, for what goes
    over ZeroMQ, routing frames.

    Args:
        channel_bytes: size of each direction of a channel (0: none offered; ``attach_local`` is refused).
        max_channels: channels open at once, all connections together.
        busy_poll_s: how long the loop polls a channel's request slot after a request (published with each reply).
        stop: set when the server stops (from then on no polling window is published).
        zmq_every: while channels are hot, look at the ZeroMQ socket once every this many spins (a look is a
            ``poll`` system call; the slots are memory reads). A request over ZeroMQ then waits a few spins more;
            a request in a slot meets a loop that has not just left the kernel.
    """

    def __init__(self, inner: ZmqServerTransport, *, channel_bytes: int, max_channels: int, busy_poll_s: float,
                 stop: threading.Event, zmq_every: int = ZMQ_EVERY):
        check_int("zmq_every", zmq_every, 1)
        self.zmq_every = zmq_every
        self._spins = 0
        self.inner = inner
        self.channel_bytes = channel_bytes
        self.max_channels = max_channels
        self.busy_poll_s = busy_poll_s
        self._stop = stop
        self.channels: dict[str, ServerChannel] = {}  # by name (server-made only)
        self._hot: list[ServerChannel] = []  # channels told that the loop polls their request slot (this spin)
        self.ops = {"attach_local": self._op_attach_local, "detach_local": self._op_detach_local}

    # -- requests in ------------------------------------------------------------------------------------------------
    def serve(self, handle: Handler, wait_ms: int, spinning: bool = False,
              stop: threading.Event | None = None) -> bool:
        if spinning:  # after a request: the next one, in a slot or on the socket, is seen at once
            served = self._take(self._hot, handle)
            if self._hot:  # NOTE: the socket every zmq_every-th spin: its poll is a system call, the slots are not
                self._spins += 1
                if self._spins < self.zmq_every:
                    return served
                self._spins = 0
            return self.inner.serve(handle, 0, True, stop) or served
        # the last look at every slot before sleeping (clients stop using them by now), and each tick
        self._hot = []
        return self._take(list(self.channels.values()), handle) or self.inner.serve(handle, wait_ms, False, stop)

    @staticmethod
    def _take(channels: list[ServerChannel], handle: Handler) -> bool:
        """Hand the requests waiting in the slots of ``channels`` to ``handle`` (a slot that cannot be read is
        consumed, and handed over as its error); whether there were any."""
        served = False
        for ch in channels:
            try:
                got = ch.take_request()
            except ProtocolError as e:
                served = True
                handle(ch, None, ch.last_request, e)
                continue
            if got is not None:
                served = True
                handle(ch, got[1], got[0], None)
        return served

    def reply_path(self, origin: Any, header: dict[str, Any], rid: Any) -> Any:
        """A slot's channel; for a ZeroMQ request, the channel its ``reply_to`` names if this server made it for the
        same connection, else its route."""
        if type(origin) is ServerChannel:
            origin.last_used = time.monotonic()
            return origin
        name = header.get("reply_to")
        if not isinstance(name, str):
            return origin
        ch = self.channels.get(name)
        if ch is None or ch.route != origin:
            return origin
        ch.handled(rid)
        ch.last_used = time.monotonic()
        return ch

    # -- replies out -------------------------------------------------------------------------------------------------
    def stages(self, path: Any) -> bool:
        return type(path) is ServerChannel and path.open

    def send(self, path: Any, rid: Any, frames: Sequence[Any], staged: bool = False) -> None:
        """Into the channel when ``path`` is one and the reply fits (with it goes how long this loop keeps polling
        the channel's request slot), else over ZeroMQ (so is an error reply whose header-first reply failed)."""
        if type(path) is ServerChannel:
            ch, path = path, path.route
            if ch.open and ch.failed_reply != rid:
                self._publish_polling(ch)
                if is_int(rid) and rid > 0 and ch.write_reply(rid, frames):
                    ch.unlink()  # the client mapped it before asking for this reply: the name is no longer needed
                    return
        self.inner.send(path, rid, frames, staged)

    def send_head(self, path: Any, rid: Any, head: Any, tail_lens: Sequence[int]) -> PendingReply | None:
        """The header into the channel when ``path`` is one and the whole reply fits; None otherwise."""
        if type(path) is not ServerChannel or not path.open or not (is_int(rid) and rid > 0):
            return None
        self._publish_polling(path)
        if not path.write_reply_head(rid, head, tail_lens):
            return None
        path.unlink()
        return _PendingChannelReply(self, path, rid)

    def _publish_polling(self, ch: ServerChannel) -> None:
        """Before a reply, so the client reads it with the reply: how long this loop polls ``ch``'s request slot.
        The loop's own deadline, set after this request, is later: the client's view errs on the safe side."""
        if self.busy_poll_s and not self._stop.is_set():
            ch.publish_polling(time.monotonic() + self.busy_poll_s)
            if ch not in self._hot:
                self._hot.append(ch)

    # -- channels ----------------------------------------------------------------------------------------------------
    def _op_attach_local(self, req: Any) -> tuple[dict[str, Any], list]:
        """A shared-memory channel for this connection; at most one per connection (a new one replaces it) and
        ``max_channels`` in all."""
        if not self.channel_bytes or not local_channel.supported():
            raise ConfigError("this server offers no shared-memory channels")
        route = _route(req.origin)
        for name in [n for n, ch in self.channels.items() if ch.route == route]:
            self.channels.pop(name).close()
        if len(self.channels) >= self.max_channels:
            raise SessionLimitReached(f"{len(self.channels)} shared-memory channels open (the limit)")
        ch = ServerChannel(self.channel_bytes, route)
        # NOTE: the loop spins busy_poll_s after this request too; published now, the idle sweep cannot free the
        # channel between this reply and the client's first request through it
        ch.publish_polling(time.monotonic() + self.busy_poll_s)
        self.channels[ch.name] = ch
        return {"name": ch.name, "capacity": ch.capacity, "layout": local_channel.LAYOUT}, []

    def _op_detach_local(self, req: Any) -> tuple[dict[str, Any], list]:
        name = req.arg("name", str)
        ch = self.channels.get(name)
        if ch is not None and ch.route == _route(req.origin):
            self.channels.pop(name).close()
        return {}, []

    def sweep(self, now: float, idle_s: float) -> None:
        """Free channels unused for ``idle_s`` whose last published polling window has passed too (until then
        their client may be writing a request into one)."""
        for name in [n for n, ch in self.channels.items()
                     if now - ch.last_used > idle_s and now > ch.polling_until and not ch.request_waiting()]:
            self.channels.pop(name).close()  # a request written just inside the window is served first

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()  # a client waiting on one sees it closed at once
        self.channels.clear()
        self._hot = []
        self.inner.close()


class _PendingChannelReply(PendingReply):
    """A reply whose header is in a channel's slot (:meth:`ShmServerTransport.send_head`)."""

    def __init__(self, transport: ShmServerTransport, channel: ServerChannel, rid: int):
        self._transport, self._channel, self._rid = transport, channel, rid

    def place(self, pin: Pin) -> tuple[Any, list[int]] | None:
        """The channel's mapping from its start, pinned as far as this reply reaches (its reply slot holds the
        frames' places)."""
        offsets, end = self._channel.reply_tail_offsets(self._rid)
        region = self._channel.pinned(pin, end)
        return None if region is None else (region, offsets)

    def complete(self, t_done: float, tail: Sequence[Any] | None) -> None:
        self._transport._publish_polling(self._channel)  # the window from now, as a reply sent now would publish
        self._channel.complete_reply(self._rid, tail, t_done)

    def fail(self) -> None:
        self._channel.fail_reply(self._rid)


class ShmClientTransport(ClientTransport):
    """A client's channel over ``inner``: a request goes into the slot while the server polls it and it fits, a
    reply is awaited in the slot and on the socket at once (what does not fit comes over ZeroMQ)."""

    def __init__(self, inner: ZmqClientTransport, channel: ClientChannel):
        self.inner = inner
        self.channel = channel
        self.header = {"reply_to": channel.name}
        self.address = inner.address
        self._local_request = False  # the last request went into the slot

    @property
    def gone(self) -> bool:
        return self.channel.closed

    def send(self, rid: int, frames: list[Any], has_tensors: bool) -> None:
        self._local_request = self.channel.send_request(rid, frames)
        if self._local_request:
            self.inner.paths["request_local"] += 1
        else:
            self.inner.send(rid, frames, has_tensors)

    def receive(self, rid: int, op: str, timeout_s: float) -> tuple[Message, float]:
        ch, zmq_t = self.channel, self.inner
        sock, busy_poll_s = zmq_t.sock, zmq_t.busy_poll_s
        deadline = time.monotonic() + timeout_s
        now = time.monotonic()
        spin_until = now + busy_poll_s
        next_warm = now + WARM_EVERY_S
        spins = 0
        head_failed = False  # a header-first reply whose tensors will not come: the error reply comes over ZeroMQ
        while True:
            if not head_failed and ch.reply_ready(rid):
                if ch.reply_done(rid) == 1:  # whole (or header first, completed before this look)
                    t_seen = time.perf_counter()
                    return self._taken(ch.read_reply()), t_seen
                got = self._rest_of(rid, op, deadline, spin_until, timeout_s)
                if got is not None:
                    return got
                head_failed = True
                continue
            spins += 1
            if spins & 7:  # spinning on the channel: the costlier checks (ZeroMQ, closed) every 8th time
                if busy_poll_s and (now := time.monotonic()) < spin_until:
                    next_warm = zmq_t.warm_if_due(now, next_warm)
                    continue
            elif self._local_request and ch.closed:
                raise self._gone(op)
            if busy_poll_s and (now := time.monotonic()) < spin_until and not sock.poll(0, zmq.POLLIN):
                next_warm = zmq_t.warm_if_due(now, next_warm)
                continue
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise zmq_t.timed_out(op, timeout_s)
            # ZeroMQ is waited on in 1 ms slices, so the channel is checked between them
            if sock.poll(1, zmq.POLLIN):
                t_seen = time.perf_counter()
                reply = zmq_t.take(rid)
                if reply is not None:
                    return reply, t_seen

    def _rest_of(self, rid: int, op: str, deadline: float, spin_until: float,
                 timeout_s: float) -> tuple[Message, float] | None:
        """A reply whose header came first: check the header now, while the server's device works, then wait for the
        tensor frames and copy them out. None when the server said they will not come (its error reply follows over
        ZeroMQ)."""
        ch, zmq_t = self.channel, self.inner
        head = ch.read_reply(0, 1)
        if not head:
            raise ProtocolError("a header-first reply without a header")
        header = decode_header(head[0], max_header_bytes=REPLY_HEADER_BYTES)
        # the reply decoded now, over buffers its tensor frames will be copied into: checked and built while the
        # device works, so that what is left after the wait is that copy
        frames = [head[0], *(bytearray(n) for n in ch.reply_lens()[1:])]
        reply = decode(frames, max_bytes=zmq_t.max_reply_bytes, max_header_bytes=REPLY_HEADER_BYTES, header=header)
        next_warm = time.monotonic() + WARM_EVERY_S
        spins = 0
        while True:
            done = ch.reply_done(rid)
            if done == 1:
                t_seen = time.perf_counter()
                ch.read_reply_into(1, frames[1:])
                self._taken_in_place(reply, frames)
                return reply, t_seen
            if done < 0:
                return None
            spins += 1
            if spins & 7:
                continue
            now = time.monotonic()  # every 8th time: the clock, the channel's state, keeping the decode warm
            if ch.closed:
                raise self._gone(op)
            if now > deadline:
                raise zmq_t.timed_out(op, timeout_s)
            if now < spin_until:
                next_warm = zmq_t.warm_if_due(now, next_warm)
            else:
                time.sleep(0.0005)  # past the spinning window: a long op is awaited without holding a core

    def _taken(self, frames: list[bytearray]) -> Message:
        """A reply read whole from the channel (sent whole, or header first and completed before the first look):
        decoded, then as :meth:`_taken_in_place`."""
        reply = decode(frames, max_bytes=self.inner.max_reply_bytes, max_header_bytes=REPLY_HEADER_BYTES)
        self._taken_in_place(reply, frames, header_first=False)
        return reply

    def _taken_in_place(self, reply: Message, frames: list[Any], header_first: bool = True) -> None:
        """A reply read from the channel (``header_first``: decoded before its tensor frames came into its buffers):
        with the op's end where a reply sent whole has it, counted, and kept to warm the decode with."""
        zmq_t = self.inner
        _fill_op_end(reply.header, self.channel.reply_t_done())
        zmq_t.paths["reply_local"] += 1
        if header_first:
            zmq_t.paths["reply_header_first"] += 1
        zmq_t.keep_warm(frames)

    def _gone(self, op: str) -> ServerUnavailable:
        """The server gave the channel up while ``op`` waited: closed here, so the client falls back to ZeroMQ."""
        self.channel.close()
        return ServerUnavailable(f"{self.address} gave up this client's shared-memory channel before replying to "
                                 f"{op!r} (server shutting down)")

    def close(self, goodbye: dict[str, Any] | None = None, linger_ms: int = 0) -> None:
        """Give the channel back (best effort, no wait: the server also frees it when idle), then close."""
        if goodbye is not None:
            self.inner.send_nowait(encode({**goodbye, "op": "detach_local", "args": {"name": self.channel.name}}))
            linger_ms = max(linger_ms, 100)  # ms the detach may take to leave
        self.channel.close()
        self.inner.close(linger_ms=linger_ms)

    def drop(self) -> ZmqClientTransport:
        """Forget the channel (the server gave it up); the transport below."""
        log.info("the server gave up the shared-memory channel %s; everything goes over ZeroMQ", self.channel.name)
        self.channel.close()
        return self.inner
