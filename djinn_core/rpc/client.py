"""The Djinn client: the in-process breakpoint session API, over RPC to a :mod:`djinn_core.rpc.server`.

::

    with Client("tcp://127.0.0.1:5556", token=None, timeout_s=30) as c:
        s = c.open(input_ids, max_new_tokens=64)       # RemoteSession
        ck = s.run_to(20)                               # RemoteCheckpoint
        h = ck.hidden                                   # a CPU copy of the hidden state (batch, seq, hidden)
        ck.edit(h + v)                                  # sends the replacement; validated on the server
        s.pause()
        logits = s.resume()                             # (batch, seq, vocab) on the CPU; "last" -> (batch, vocab)
        tokens = s.generate(16)                         # (batch, 16) token ids
        s.close()

The client is stateless apart from its id: the server holds every session; a client sees only what it asks for.
Differences from the in-process API, all of them about where bytes live:

* tensors come back as CPU tensors; ``RemoteCheckpoint.hidden`` is a *copy* (editing it in place changes nothing on
  the server: send it back with ``edit``);
* ``edit`` sends a tensor; an edit given as a callable runs **on the client**, on a CPU copy of the hidden state, and
  its result is sent (code never travels to the server; for ops whose CPU and device results differ, edit on the
  device in process instead);
* ``resume(logits="last" | "none")`` keeps replies small.

Errors raised on the server come back as :class:`~djinn_core.errors.RemoteError` subclasses that also derive from the
matching Djinn error (a remote ``InvalidLayer`` is an ``InvalidLayer``), so the same ``pytest.raises`` works against
either. No reply within ``timeout_s`` -- or a server shutting down -- raises
:class:`~djinn_core.errors.ServerUnavailable`; a call never hangs.

A ``Client`` (one ZeroMQ DEALER socket) may be shared by threads (calls are serialised by a lock); for concurrency,
give each thread its own ``Client``. Sessions survive :meth:`Client.close` until the server's idle timeout: a new
``Client`` with the same ``client_id`` (and token) reattaches to them with :meth:`Client.session`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import torch
import zmq

from djinn_core import errors
from djinn_core.errors import (
    ConfigError,
    DjinnError,
    InvalidEdit,
    ProtocolError,
    RemoteError,
    ServerUnavailable,
)
from djinn_core.rpc.local_channel import LAYOUT as CHANNEL_LAYOUT
from djinn_core.rpc.local_channel import ClientChannel
from djinn_core.rpc.local_channel import supported as local_channel_supported
from djinn_core.rpc.shm_transport import ShmClientTransport
from djinn_core.rpc.transport import ClientTransport
from djinn_core.rpc.wire import ALLOWED_DTYPES, Message, encode
from djinn_core.rpc.zmq_transport import ZmqClientTransport
from djinn_core.validation import check_int, check_number, check_optional_int

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5556"
DEFAULT_MAX_REPLY_BYTES = 8 << 30

_remote_classes: dict[type, type] = {}


def _on_this_host(address: str) -> bool:
    """A loopback TCP endpoint or an ``ipc://`` one: the server runs on this machine."""
    if address.startswith("ipc://"):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _raise_if_refused(reply: Message) -> None:
    """Raise the remote error an error reply carries."""
    if not reply.header.get("ok"):
        err = reply.header.get("error") or {}
        raise remote_error(str(err.get("type", "RemoteError")), str(err.get("message", "")))


def remote_error(type_name: str, message: str) -> DjinnError:
    """The exception for an error reply: :class:`ServerUnavailable` for a server shutting down, else a
    :class:`RemoteError` -- also an instance of the Djinn error class of that name when there is one."""
    if type_name == "ServerUnavailable":
        return ServerUnavailable(f"server: {message}")
    base = getattr(errors, type_name, None)  # only classes of djinn_core.errors, looked up by name
    if not (isinstance(base, type) and issubclass(base, DjinnError)) or issubclass(base, RemoteError):
        return RemoteError(message, type_name)
    cls = _remote_classes.get(base)
    if cls is None:
        cls = type(f"Remote{base.__name__}", (RemoteError, base),
                   {"__init__": RemoteError.__init__, "__str__": RemoteError.__str__, "__module__": __name__})
        _remote_classes[base] = cls
    return cls(message, type_name)


class Client:
    """A connection to a Djinn server (see the module docstring).

    Args:
        address: the server's ZeroMQ endpoint, ``tcp://host:port``.
        token: the server's auth token, if it has one.
        timeout_s: how long a call waits for its reply before raising :class:`ServerUnavailable`.
        client_id: the id that owns this client's sessions (default: a random one); reuse it to reattach.
        max_request_bytes: if given, requests larger than this are refused locally (:class:`ProtocolError`).
        max_reply_bytes: the largest reply accepted.
        busy_poll_s: spin (holding a core and the GIL) for up to this long waiting for each reply before sleeping; a
            sleeping thread can take tens to hundreds of microseconds to wake (CPU idle states), which is most of
            what a remote call costs over an in-process one, whose CUDA wait spins too. For one latency-critical
            client per process; leave 0 with many client threads.
        local_channel: exchange requests and replies through a shared-memory channel the server makes for this
            connection (:mod:`djinn_core.rpc.shm_transport`: no socket and no ZeroMQ thread between this spinning
            thread and the server's). Default (None): on when ``busy_poll_s`` > 0, the server is on this host
            (loopback or ``ipc://``) and the platform supports it; if the server refuses, everything stays on
            ZeroMQ. A request goes through it only while the server says it polls the channel, a message only if
            it fits; the rest go over ZeroMQ (``paths`` counts which way each went).
        context: a ZeroMQ context (default: the process-wide one).
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None, timeout_s: float = 30.0,
                 client_id: str | None = None, max_request_bytes: int | None = None,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES, busy_poll_s: float = 0.0,
                 local_channel: bool | None = None, context: zmq.Context | None = None):
        if not isinstance(address, str) or "://" not in address:
            raise ConfigError(f"address must be a ZeroMQ endpoint like tcp://127.0.0.1:5556, got {address!r}")
        check_number("timeout_s", timeout_s, 0, strict_minimum=True)
        if token is not None and not isinstance(token, str):
            raise ConfigError("token must be a string or None")
        self.address = address
        self.token = token
        self.timeout_s = float(timeout_s)
        self.client_id = client_id or uuid.uuid4().hex
        if not isinstance(self.client_id, str) or len(self.client_id) > 128:
            raise ConfigError("client_id must be a string of at most 128 characters")
        self.busy_poll_s = float(check_number("busy_poll_s", busy_poll_s, 0))
        self.max_request_bytes = check_optional_int("max_request_bytes", max_request_bytes, 1)
        self.max_reply_bytes = check_int("max_reply_bytes", max_reply_bytes, 1)
        self._ids = itertools.count(1)
        self.last_server_ms: float | None = None  # server time of the last call: its op and the copies of its reply
        # the last call's round trip split on the host monotonic clock (meaningful with the server on this host):
        # request (send -> server receipt), dispatch (receipt -> op start), op (split into op_launch: until the op
        # returned, its device work queued, and op_wait: until its results were on the host), reply (op end -> reply
        # decoded), and of the reply leg, reply_decode (reply seen -> decoded)
        self.last_phases_ms: dict[str, float] | None = None
        # which way each message went: request_local/request_zmq, reply_local/reply_zmq (reply_header_first: the
        # local replies whose header came before their tensors)
        self.paths: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        if local_channel is not None and not isinstance(local_channel, bool):
            raise ConfigError(f"local_channel must be a bool or None, got {local_channel!r}")
        if local_channel is None:
            local_channel = self.busy_poll_s > 0 and _on_this_host(address) and local_channel_supported()
        self._local_wanted = bool(local_channel)
        self._local_tried = False
        self._zmq = ZmqClientTransport(address, context or zmq.Context.instance(), busy_poll_s=self.busy_poll_s,
                                       max_reply_bytes=self.max_reply_bytes, paths=self.paths)
        self._transport: ClientTransport = self._zmq  # the shared-memory channel over it, once attached
        self._closed = False

    # -- plumbing --------------------------------------------------------------------------------------------------
    def call(self, op: str, *, session: int | None = None, args: dict[str, Any] | None = None,
             tensors: Sequence[torch.Tensor] = (), timeout_s: float | None = None) -> Message:
        """Send one request and wait for its reply; raise the remote error if the server refused it."""
        with self._lock:
            if self._closed:
                raise ServerUnavailable("this client is closed")
            if self._local_wanted and not self._local_tried:
                self._attach_local()
            reply, t_send, t_seen, t_reply = self._roundtrip(op, session, args, tensors, timeout_s)
        self.last_server_ms = reply.header.get("server_ms")
        st = reply.header.get("server_t")
        if isinstance(st, list) and len(st) == 4 and all(isinstance(x, (int, float)) for x in st):
            t_recv, t_op, t_queued, t_done = st
            self.last_phases_ms = {"request": (t_recv - t_send) * 1e3, "dispatch": (t_op - t_recv) * 1e3,
                                   "op": (t_done - t_op) * 1e3, "op_launch": (t_queued - t_op) * 1e3,
                                   "op_wait": (t_done - t_queued) * 1e3, "reply": (t_reply - t_done) * 1e3,
                                   "reply_decode": (t_reply - t_seen) * 1e3}
        else:
            self.last_phases_ms = None
        _raise_if_refused(reply)
        return reply

    @property
    def local_channel(self) -> bool:
        """Whether this client has a shared-memory channel to the server (see ``local_channel`` in the class doc)."""
        return self._transport is not self._zmq and not self._transport.gone

    def _attach_local(self) -> None:
        """Ask the server for a shared-memory channel and map it; on any refusal stay on ZeroMQ (logged)."""
        self._local_tried = True
        try:
            reply, _, _, _ = self._roundtrip("attach_local", None, None, (), None)
            _raise_if_refused(reply)
            res = reply.header.get("result") or {}
            if res.get("layout") != CHANNEL_LAYOUT:  # another version's slots: read as ours they would be garbage
                self._roundtrip("detach_local", None, {"name": res.get("name")}, (), None)
                raise ConfigError(f"the server's channels have layout {res.get('layout')!r}, this client reads "
                                  f"layout {CHANNEL_LAYOUT}")
            self._transport = ShmClientTransport(self._zmq, ClientChannel(res.get("name"), res.get("capacity")))
        except ServerUnavailable:
            self._local_tried = False  # no server yet: try again at the next call
            raise
        except (DjinnError, OSError) as e:
            log.info("shared-memory channel unavailable (%s); everything goes over ZeroMQ", e)

    def _roundtrip(self, op: str, session: int | None, args: dict[str, Any] | None, tensors: Sequence[torch.Tensor],
                   timeout_s: float | None) -> tuple[Message, float, float, float]:
        """One request and its reply (under the lock): (reply, host times sent, reply seen, reply decoded)."""
        t = self._transport
        if t.gone:  # the server gave up the channel (it forgot this connection, or restarted)
            t = self._transport = t.drop()
        rid = next(self._ids)
        frames = encode({"op": op, "client": self.client_id, "token": self.token, "session": session,
                         "args": args or {}, **t.header, "id": rid}, tensors)
        if self.max_request_bytes is not None:
            size = sum(memoryview(f).nbytes for f in frames)
            if size > self.max_request_bytes:
                raise ProtocolError(f"request of {size} bytes exceeds max_request_bytes={self.max_request_bytes}")
        t_send = time.perf_counter()
        t.send(rid, frames, bool(tensors))
        reply, t_seen = t.receive(rid, op, self.timeout_s if timeout_s is None else timeout_s)
        return reply, t_send, t_seen, time.perf_counter()

    def close(self) -> None:
        """Close the connection (and give back the shared-memory channel). Sessions stay on the server until its
        idle timeout. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._transport.close({"client": self.client_id, "token": self.token, "session": None,
                                       "id": next(self._ids)})

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- API -------------------------------------------------------------------------------------------------------
    def ping(self) -> None:
        """The no-op RPC (a full round trip through the server's loop)."""
        self.call("ping")

    def stats(self) -> dict[str, Any]:
        """Server stats: sessions (resident / swapped / by state), slab, host pool, swap bytes, VRAM, requests."""
        return self.call("stats").header["result"]

    def open(self, input_ids: torch.Tensor, *, max_new_tokens: int = 64) -> "RemoteSession":
        """A new session over ``input_ids`` (batch, seq) int64 token ids."""
        if not isinstance(input_ids, torch.Tensor):
            raise ConfigError("input_ids must be a (batch, seq) torch.long tensor")
        sid = self.call("open", args={"max_new_tokens": max_new_tokens}, tensors=[input_ids]).header["result"]
        return RemoteSession(self, sid["session"])

    def session(self, session_id: int) -> "RemoteSession":
        """A handle on an existing session of this client id (checked on the server)."""
        s = RemoteSession(self, session_id)
        s.info()
        return s

    def sessions(self) -> list[dict[str, Any]]:
        """This client id's sessions on the server: ``{session, state, layer, shape, dtype}`` each."""
        return self.call("sessions").header["result"]["sessions"]

    def __repr__(self) -> str:
        return f"Client({self.address!r}, client_id={self.client_id!r})"


def _dtype(name: str | None) -> torch.dtype | None:
    return ALLOWED_DTYPES.get(name) if name else None


class RemoteCheckpoint:
    """A remote session stopped before layer ``layer``: ``hidden`` fetches a copy, ``edit`` sends a replacement."""

    def __init__(self, session: "RemoteSession", info: dict[str, Any]):
        self._session = session
        self.layer: int = info["layer"]
        self.shape: tuple[int, ...] = tuple(info["shape"] or ())
        self.dtype: torch.dtype | None = _dtype(info.get("dtype"))

    @property
    def session_id(self) -> int:
        return self._session.id

    @property
    def hidden(self) -> torch.Tensor:
        """A CPU copy of the hidden state entering layer ``layer`` (batch, seq, hidden)."""
        return self._session._call("hidden").tensors[0]

    def edit(self, edit: torch.Tensor | Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Replace the hidden state by ``edit`` (same shape and dtype; checked on the server, which leaves the
        checkpoint intact on :class:`InvalidEdit`). A callable runs here, on a CPU copy (see the module docstring)."""
        if callable(edit) and not isinstance(edit, torch.Tensor):
            scratch = self.hidden
            new = edit(scratch)
            edit = scratch if new is None else new
        if not isinstance(edit, torch.Tensor):
            raise InvalidEdit(f"an edit must be a tensor (or a callable returning one), got {type(edit).__name__}")
        self._session._call("edit", tensors=[edit])

    def __repr__(self) -> str:
        return f"RemoteCheckpoint(session={self.session_id}, layer={self.layer}, shape={self.shape})"


class RemoteSession:
    """A breakpoint session held by the server; the same methods as :class:`~djinn_core.runtime.session.BreakpointSession`.
    """

    def __init__(self, client: Client, session_id: int):
        self.client = client
        self.id = session_id

    def _call(self, op: str, **kw: Any) -> Message:
        return self.client.call(op, session=self.id, **kw)

    def info(self) -> dict[str, Any]:
        """``{session, state, layer, shape, dtype}`` as the server sees it."""
        return self._call("info").header["result"]

    @property
    def state(self) -> str:
        return self.info()["state"]

    @property
    def layer(self) -> int | None:
        return self.info()["layer"]

    def run_to(self, layer: int) -> RemoteCheckpoint:
        """Prefill through layers ``0..layer-1`` on the server and stop before ``layer``."""
        return RemoteCheckpoint(self, self._call("run_to", args={"layer": layer}).header["result"])

    @property
    def checkpoint(self) -> RemoteCheckpoint:
        info = self.info()
        if info["state"] not in ("checkpoint", "paused"):
            raise errors.CheckpointStateError(f"session {self.id} is {info['state']}; cannot get its checkpoint "
                                              "(needs checkpoint or paused)")
        return RemoteCheckpoint(self, info)

    def pause(self) -> None:
        """Swap the checkpoint to the server's host pool."""
        self._call("pause")

    def restore(self) -> RemoteCheckpoint:
        """Bring a paused checkpoint back to the device (no-op when resident)."""
        return RemoteCheckpoint(self, self._call("restore").header["result"])

    def resume(self, *, logits: str = "all") -> torch.Tensor | None:
        """Continue from the checkpoint. ``logits``: ``"all"`` (batch, seq, vocab), ``"last"`` (batch, vocab), or
        ``"none"`` (returns None once the server has finished). A session paused while decoding comes back with
        None, as in process; ``generate`` continues it."""
        reply = self._call("resume", args={"logits": logits})
        return reply.tensors[0] if reply.tensors else None

    def resume_timed(self) -> tuple[dict[str, float], torch.Tensor]:
        """Benchmarking (a server started with ``--bench-ops``): a fork of this checkpoint resumed in the server's own
        process, as a library caller would, and timed there: (``{ms, launch_ms, wait_ms}`` on the server's host clock,
        the last position's logits (batch, vocab)). This session is left as it was."""
        reply = self._call("resume_timed")
        return reply.header["result"], reply.tensors[0]

    def generate(self, n: int, *, return_logits: bool = False):
        """``n`` greedy tokens (batch, n); with ``return_logits`` also the logits that chose them (batch, n, vocab)."""
        reply = self._call("generate", args={"n": n, "return_logits": return_logits})
        return (reply.tensors[0], reply.tensors[1]) if return_logits else reply.tensors[0]

    def fork(self, n: int) -> list["RemoteSession"]:
        """``n`` new sessions at this checkpoint, owned by the same client id."""
        ids = self._call("fork", args={"n": n}).header["result"]["sessions"]
        return [RemoteSession(self.client, i) for i in ids]

    def state_bytes(self) -> int:
        return self._call("state_bytes").header["result"]["bytes"]

    def close(self) -> None:
        """Free the session on the server. Idempotent."""
        self._call("close")

    def __repr__(self) -> str:
        return f"RemoteSession(id={self.id}, client={self.client.client_id!r})"
