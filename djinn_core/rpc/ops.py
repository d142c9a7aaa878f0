"""The server's ops: which client owns which session, and one handler per op over a
:class:`~djinn_core.runtime.BreakpointRuntime`.

Every handler takes a validated :class:`Request` and returns ``(result, tensors)``: a JSON-able dict and the tensors
of the reply. Handlers run on the server thread, one at a time; they raise typed errors
(:mod:`djinn_core.errors`) for anything a client got wrong, and the server sends those back.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from djinn_core.errors import (
    CheckpointStateError,
    ConfigError,
    ProtocolError,
    SessionLimitReached,
    UnknownSession,
)
from djinn_core.rpc.config import ServerConfig
from djinn_core.rpc.wire import HostStaging, Message
from djinn_core.trace import timing_event
from djinn_core.runtime import BreakpointRuntime, BreakpointSession, SessionState
from djinn_core.validation import check_int, is_int

log = logging.getLogger(__name__)

LOGITS_MODES = ("all", "last", "none")
MAX_CLIENT_ID = 128  # characters
CLOSED_MEMORY = 4096  # closed session ids remembered (to say "closed" rather than "unknown")

Result = tuple[dict[str, Any], list[torch.Tensor]]


class Request:
    """A decoded request: the header fields every op uses, validated, and where it came from (``origin``: what the
    transport replies to)."""

    __slots__ = ("op", "id", "client", "session", "args", "tensors", "origin")

    def __init__(self, msg: Message, origin: Any = ()):
        self.origin = origin
        h = msg.header
        self.id = h.get("id")
        if self.id is not None and not (is_int(self.id) or isinstance(self.id, str)):
            raise ProtocolError(f"'id' must be an int or a string, got {self.id!r}")
        self.op = h.get("op")
        if not isinstance(self.op, str):
            raise ProtocolError(f"'op' must be a string, got {self.op!r}")
        self.client = h.get("client")
        if not isinstance(self.client, str) or not 0 < len(self.client) <= MAX_CLIENT_ID:
            raise ProtocolError(f"'client' must be a string of 1..{MAX_CLIENT_ID} characters, got {self.client!r}")
        self.session = h.get("session")
        if self.session is not None and not is_int(self.session):
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


@dataclass
class _Entry:
    session: BreakpointSession
    owner: str
    last_used: float


def checkpoint_info(s: BreakpointSession) -> dict[str, Any]:
    """``{session, state, layer, shape, dtype}`` of a session, as replies carry it."""
    shape = s.checkpoint.shape if s.state in (SessionState.CHECKPOINT, SessionState.PAUSED) else None
    return {"session": s.id, "state": s.state.value, "layer": s.layer,
            "shape": list(shape) if shape else None, "dtype": str(s.runtime.dtype).removeprefix("torch.")}


class SessionOps:
    """The sessions of ``runtime`` by owner (a client id), and the ops on them (:attr:`ops`: op name -> handler)."""

    def __init__(self, runtime: BreakpointRuntime, config: ServerConfig):
        self.runtime = runtime
        self.config = config
        self.entries: dict[int, _Entry] = {}
        self._closed: collections.OrderedDict[int, tuple[str, str]] = collections.OrderedDict()
        self.ops: dict[str, Callable[[Request], Result]] = {
            "sessions": self._op_sessions, "open": self._op_open, "info": self._op_info, "run_to": self._op_run_to,
            "hidden": self._op_hidden, "edit": self._op_edit, "pause": self._op_pause, "restore": self._op_restore,
            "resume": self._op_resume, "generate": self._op_generate, "fork": self._op_fork, "close": self._op_close,
            "state_bytes": self._op_state_bytes,
        }
        # bench_ops: the device span of each client's last op whose reply carried device tensors (set by the
        # server), which resume_timed reports beside its own
        self.last_device_ms: dict[str, float] = {}
        if config.bench_ops:
            self.ops["resume_timed"] = self._op_resume_timed
            self._staging = HostStaging(config.local_channel_bytes or 64 << 20, block=config.reply_wait == "block")

    # -- ownership ---------------------------------------------------------------------------------------------------
    def entry(self, req: Request) -> _Entry:
        """The requesting client's session ``req.session`` (touched); errors name what is wrong without revealing
        other clients' sessions."""
        sid = req.session
        if sid is None:
            raise ProtocolError(f"op {req.op!r} needs a 'session'")
        e = self.entries.get(sid)
        if e is None or e.owner != req.client:
            closed = self._closed.get(sid)
            if closed is not None and closed[0] == req.client:
                if closed[1] == "closed":
                    raise CheckpointStateError(f"session {sid} is closed")
                raise UnknownSession(f"session {sid} was freed ({closed[1]})")
            raise UnknownSession(f"no open session {sid} for client {req.client!r}")
        e.last_used = time.monotonic()
        return e

    def admit(self, client: str, n: int) -> None:
        """:class:`SessionLimitReached` unless ``n`` more sessions of ``client`` fit (in total and per client)."""
        cfg = self.config
        if len(self.entries) + n > cfg.max_sessions:
            raise SessionLimitReached(f"the server holds {len(self.entries)} of {cfg.max_sessions} sessions; "
                                      f"{n} more do not fit")
        mine = sum(1 for e in self.entries.values() if e.owner == client)
        if mine + n > cfg.per_client_limit:
            raise SessionLimitReached(f"client {client!r} holds {mine} of {cfg.per_client_limit} sessions; "
                                      f"{n} more do not fit")

    def add(self, session: BreakpointSession, owner: str) -> int:
        self.entries[session.id] = _Entry(session, owner, time.monotonic())
        return session.id

    def free(self, sid: int, reason: str) -> None:
        """Close session ``sid`` and remember why (its owner then hears ``reason``)."""
        e = self.entries.pop(sid, None)
        if e is None:
            return
        try:
            e.session.close()
        except Exception:  # pragma: no cover - close releases memory; log, never stop serving
            log.exception("closing session %d failed", sid)
        self._closed[sid] = (e.owner, reason)
        while len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def free_all(self, reason: str) -> int:
        n = len(self.entries)
        for sid in list(self.entries):
            self.free(sid, reason)
        return n

    def sweep_idle(self, now: float) -> int:
        """Close sessions unused for longer than ``idle_timeout_s``; returns how many."""
        limit = self.config.idle_timeout_s
        idle = [sid for sid, e in self.entries.items() if now - e.last_used > limit]
        for sid in idle:
            log.info("session %d of client %r idle for more than %.1f s: freed", sid, self.entries[sid].owner, limit)
            self.free(sid, f"idle for more than {limit:g} s")
        return len(idle)

    def counts(self) -> dict[str, Any]:
        """Sessions: total, resident, swapped, by state, and how many client ids hold them."""
        by_state = collections.Counter(e.session.state.value for e in self.entries.values())
        resident = by_state[SessionState.CHECKPOINT.value] + by_state[SessionState.RUNNING.value]
        swapped = by_state[SessionState.PAUSED.value] + by_state[SessionState.SWAPPED.value]  # checkpoint or decoding
        return {"sessions": len(self.entries), "resident": resident, "swapped": swapped, "by_state": dict(by_state),
                "clients": len({e.owner for e in self.entries.values()})}

    # -- ops ---------------------------------------------------------------------------------------------------------
    def _op_sessions(self, req: Request) -> Result:
        mine = [checkpoint_info(e.session) for e in self.entries.values() if e.owner == req.client]
        return {"sessions": mine}, []

    def _op_open(self, req: Request) -> Result:
        (ids,) = req.tensor_count(1)
        mnt = check_int("max_new_tokens", req.arg("max_new_tokens", int, 64), 0, self.config.max_new_tokens)
        if ids.dtype == torch.long and ids.numel():
            # an id past the embedding would index out of bounds on the device (on CUDA, an assert that ends the
            # process and every client's sessions): checked here, where the request is untrusted
            vocab = self.runtime.model.config.vocab_size
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab:
                raise ConfigError(f"input_ids hold token ids in {lo}..{hi}; the model's vocabulary is 0..{vocab - 1}")
        self.admit(req.client, 1)
        s = self.runtime.open(ids, max_new_tokens=mnt)  # validates dtype and shape
        return {"session": self.add(s, req.client)}, []

    def _op_info(self, req: Request) -> Result:
        return checkpoint_info(self.entry(req).session), []

    def _op_run_to(self, req: Request) -> Result:
        layer = req.arg("layer", int)
        s = self.entry(req).session
        s.run_to(layer)
        return checkpoint_info(s), []

    def _op_hidden(self, req: Request) -> Result:
        s = self.entry(req).session
        # a private host copy: the reply leaves asynchronously, and the slab view may be reused or moved meanwhile
        return {}, [s.checkpoint.hidden.to("cpu", copy=True)]

    def _op_edit(self, req: Request) -> Result:
        s = self.entry(req).session
        (new,) = req.tensor_count(1)
        s.checkpoint.edit(new.to(self.runtime.device))  # Checkpoint.edit validates shape and dtype: InvalidEdit
        return {}, []

    def _op_pause(self, req: Request) -> Result:
        self.entry(req).session.pause()
        return {}, []

    def _op_restore(self, req: Request) -> Result:
        s = self.entry(req).session
        s.restore()
        return checkpoint_info(s), []

    def _op_resume(self, req: Request) -> Result:
        mode = req.arg("logits", str, "all")
        s = self.entry(req).session
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

    def _op_generate(self, req: Request) -> Result:
        n = req.arg("n", int)
        with_logits = req.arg("return_logits", bool, False)
        s = self.entry(req).session
        if with_logits:
            tokens, logits = s.generate(n, return_logits=True)
            return {}, [tokens, logits]
        return {}, [s.generate(n)]

    def _op_fork(self, req: Request) -> Result:
        n = req.arg("n", int)
        e = self.entry(req)
        check_int("fork's n", n, 1)
        self.admit(req.client, n)
        children = e.session.fork(n)
        return {"sessions": [self.add(c, req.client) for c in children]}, []

    def _op_close(self, req: Request) -> Result:
        closed = self._closed.get(req.session) if req.session is not None else None
        if closed is not None and closed == (req.client, "closed"):
            return {}, []  # idempotent, as in process
        self.entry(req)
        self.free(req.session, "closed")
        return {}, []

    def _op_resume_timed(self, req: Request) -> Result:
        """A benchmarking op (``bench_ops``): a fork of this checkpoint resumed in the server's own process as a
        library caller would, timed on the host clock: ``ms`` in all, ``launch_ms`` until ``resume()`` returned,
        ``wait_ms`` after, until the last position's logits are on the host in a tensor of their own. They come
        through a pinned buffer whose copy is waited for as the server's replies are (``wire.HostStaging``; ``.cpu()``
        where that does not apply, e.g. on a CPU), so that the RPC is all that differs from a resume RPC. The fork is
        made before the clock starts and closed after it stops; the reply carries the timings and those logits.

        On a GPU it also reports the device's span of that work (``device_ms``: CUDA events recorded before the
        resume and after the logits' copy, on the stream it runs on) and of this client's last op whose reply carried
        device tensors (``previous_device_ms``, the server's own events around it): what of each side's host time the
        GPU itself took, whatever clocks it ran at."""
        (child,) = self.entry(req).session.fork(1)
        dev = self.runtime.device
        try:
            ev0 = timing_event(device=dev)
            t0 = time.perf_counter()
            out = child.resume()
            t_fn = time.perf_counter()
            last = out[:, -1]
            ev1 = None
            if self._staging.fits([last]):
                _, (buf,) = self._staging.start([last])
                ev1 = timing_event(device=dev)
                self._staging.wait(warm=False)
                last = torch.frombuffer(bytearray(buf), dtype=last.dtype).view(last.shape)  # the caller's own copy
            else:
                last = last.cpu()
            t1 = time.perf_counter()
        finally:
            child.close()
        got = {"ms": (t1 - t0) * 1e3, "launch_ms": (t_fn - t0) * 1e3, "wait_ms": (t1 - t_fn) * 1e3,
               "device_ms": ev0.elapsed_time(ev1) if ev0 is not None and ev1 is not None else None,
               "previous_device_ms": self.last_device_ms.get(req.client)}
        return got, [last]

    def _op_state_bytes(self, req: Request) -> Result:
        return {"bytes": self.entry(req).session.state_bytes()}, []
