"""No message stops the server or changes another client's session: a fuzzer against a live server.

A real :class:`Server` (ZeroMQ on 127.0.0.1, a shared-memory channel, a tiny Llama) receives at least
:data:`MESSAGES_PER_RUN` generated messages: random frames, mutated valid requests of every op,
pathological JSON headers (huge ints, deep nesting, NaN/Infinity, huge strings, a wrong type in every field), tensor
descriptors and frames that disagree in count and size, and the same through a channel's request slot, including slots
whose own framing is corrupt. It runs once without a token and once with one (most messages then carry none or a
wrong one; some the right one, so the ops behind authentication are fuzzed too), with :data:`MESSAGES_WITH_TOKEN`.

The same fuzz goes through ``djinn route``'s router in front of one worker (:data:`MESSAGES_TO_ROUTER`, token on).

Every message must get exactly one reply, every refusal must be a typed Djinn error, nothing may reach the server's
last guard, and afterwards the server thread is alive, answers a ping, and a session opened before the fuzzing by
another client id resumes to bitwise the logits its untouched twin gave before.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time

import pytest
import torch
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from djinn_core import errors
from djinn_core.rpc import local_channel
from djinn_core.rpc.client import Client
from djinn_core.rpc.router import Router
from djinn_core.rpc.server import Server, ServerConfig
from djinn_core.rpc.wire import ALLOWED_DTYPES, PROTOCOL_VERSION, decode_header, encode
from djinn_core.runtime import BreakpointRuntime

pytestmark = pytest.mark.cpu

MESSAGES_PER_RUN = 10_000  # to the server without a token: every path behind authentication is open to them
MESSAGES_WITH_TOKEN = 5_000  # to the one with a token (most carry none or a wrong one)
MESSAGES_TO_ROUTER = 10_000  # to a router (with a token) in front of a worker: what it forwards is fuzzed too
MAX_REQUEST = 64 << 10
CHANNEL_BYTES = 1 << 20
TOKEN = "fuzz-token"
FUZZ_CLIENT = "fuzz"
REPLY_TIMEOUT_S = 10.0
TYPED = {name for name in dir(errors) if isinstance(getattr(errors, name), type)
         and issubclass(getattr(errors, name), errors.DjinnError)}

# ----------------------------------------------------------------------------------------------- message strategies

_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=24))
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)

FIELDS = ("v", "op", "id", "client", "token", "session", "args", "tensors", "reply_to")
ARG_NAMES = ("layer", "n", "return_logits", "logits", "max_new_tokens", "name")


def _templates(session: int | None) -> list[tuple[dict, list[torch.Tensor]]]:
    """A valid request of every op (header without id and token, tensors), on the fuzz client's session."""
    s = {"session": session}
    ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(0))
    return [
        ({"op": "ping"}, []), ({"op": "stats"}, []), ({"op": "sessions"}, []),
        ({"op": "open", "args": {"max_new_tokens": 3}}, [ids]),
        ({"op": "info", **s}, []), ({"op": "run_to", **s, "args": {"layer": 2}}, []), ({"op": "hidden", **s}, []),
        ({"op": "edit", **s}, [torch.zeros(1, 6, 128)]), ({"op": "pause", **s}, []), ({"op": "restore", **s}, []),
        ({"op": "resume", **s, "args": {"logits": "last"}}, []),
        ({"op": "generate", **s, "args": {"n": 2, "return_logits": True}}, []),
        ({"op": "fork", **s, "args": {"n": 1}}, []), ({"op": "state_bytes", **s}, []), ({"op": "close", **s}, []),
        ({"op": "attach_local"}, []), ({"op": "detach_local", "args": {"name": "djinn-chan-x"}}, []),
    ]


def _header(template: dict, token: str | None, rid: int) -> dict:
    return {"client": FUZZ_CLIENT, "args": {}, "session": None, **template, "token": token, "id": rid}


@st.composite
def valid_request(draw, templates, tokens):
    template, tensors = draw(st.sampled_from(templates))
    return _header(template, draw(tokens), draw(st.integers(1, 2**40))), tensors


@st.composite
def wrong_field(draw, templates, tokens):
    """A valid request with one header field (or one argument) replaced by any JSON value, or removed."""
    header, tensors = draw(valid_request(templates, tokens))
    frames = [bytes(f) for f in encode(header, tensors)]
    raw = json.loads(frames[0])
    if draw(st.booleans()):
        target, name = raw.setdefault("args", {}), draw(st.sampled_from(ARG_NAMES))
        if not isinstance(target, dict):
            target = raw
    else:
        target, name = raw, draw(st.sampled_from(FIELDS))
    if draw(st.integers(0, 5)) == 0:
        target.pop(name, None)
    else:
        target[name] = draw(json_values)
    frames[0] = json.dumps(raw, allow_nan=True).encode()
    return frames


@st.composite
def mutated(draw, templates, tokens):
    """A valid encoded request whose bytes and frames are mutated: flips, inserts, deletes, truncation, frames
    dropped, duplicated, swapped or added (the edits by a seeded ``Random`` that hypothesis draws: one draw, not one
    per edit, keeps generation cheap)."""
    header, tensors = draw(valid_request(templates, tokens))
    rnd = draw(st.randoms(use_true_random=True))
    frames = [bytearray(bytes(f)) for f in encode(header, tensors)]
    for _ in range(rnd.randint(1, 4)):
        i = rnd.randrange(len(frames))
        f = frames[i]
        kind = rnd.choice(("flip", "insert", "delete", "truncate", "drop", "dup", "swap", "add"))
        pos = rnd.randint(0, len(f))
        if kind == "flip" and f:
            f[min(pos, len(f) - 1)] ^= rnd.randint(1, 255)
        elif kind == "insert":
            f[pos:pos] = rnd.randbytes(rnd.randint(1, 16))
        elif kind == "delete":
            del f[pos:pos + rnd.randint(1, 16)]
        elif kind == "truncate":
            del f[pos:]
        elif kind == "drop" and len(frames) > 1:
            frames.pop(i)
        elif kind == "dup":
            frames.insert(i, bytearray(f))
        elif kind == "swap" and len(frames) > 1:
            j = rnd.randrange(len(frames))
            frames[i], frames[j] = frames[j], frames[i]
        elif kind == "add":
            frames.append(bytearray(rnd.randbytes(rnd.randint(0, 64))))
    return [bytes(f) for f in frames]


def _raw_header(fields: bytes) -> bytes:
    return b'{"v":1,"op":"ping","client":"fuzz",' + fields + b"}"


pathological = st.one_of(
    st.integers(20, 5000).map(lambda n: [_raw_header(b'"id":' + b"9" * n)]),  # ints far past 64 bits
    st.integers(1, 60000).map(lambda d: [_raw_header(b'"a":' + b"[" * d + b"]" * d)]),  # deep arrays
    st.integers(1, 20000).map(lambda d: [_raw_header(b'"a":' + b'{"a":' * d + b"1" + b"}" * d)]),  # deep objects
    st.sampled_from((b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1." + b"1" * 100)).map(
        lambda x: [_raw_header(b'"args":{"n":' + x + b"}")]),
    st.integers(1000, 80000).map(lambda n: [_raw_header(b'"pad":"' + b"x" * n + b'"')]),  # huge strings
    st.integers(1, 2000).map(lambda n: [_raw_header(b'"s":"' + b"\\u00" * n + b'"')]),  # broken escapes
    json_values.map(lambda v: [json.dumps(v, allow_nan=True).encode()]),  # not an object, or no version
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=9).map(
        lambda h: [json.dumps({"v": PROTOCOL_VERSION, **h}, allow_nan=True).encode()]),
)

_descriptor = st.fixed_dictionaries({
    "dtype": st.sampled_from([*ALLOWED_DTYPES, "complex64", "object", "float8_e4m3fn", "", 7, None]),
    "shape": st.lists(st.integers(-3, 9) | st.sampled_from((2**31, 2**62, 2**63 - 1)), max_size=10) | _scalars,
    "nbytes": st.integers(-8, 256) | st.sampled_from((2**62, 2**63 - 1)) | _scalars,
})


@st.composite
def mismatched_frames(draw, tokens):
    """Descriptors and tensor frames that disagree: in count, in size, or in dtype/shape arithmetic."""
    op = draw(st.sampled_from(("open", "edit", "ping")))
    header = _header({"op": op, "session": 1}, draw(tokens), draw(st.integers(1, 2**40)))
    if draw(st.booleans()):  # descriptors that disagree with the frames
        header["tensors"] = draw(st.lists(_descriptor, max_size=4))
        sizes = st.integers(0, 64) | st.sampled_from((8, 16, 48, 96, MAX_REQUEST + 1, 2 * MAX_REQUEST - 4096))
        frames = [b"\x07" * draw(sizes) for _ in range(draw(st.integers(0, 5)))]
    else:  # consistent ones (empty tensors with huge dims among them), so decoding and the ops see them
        header["tensors"], frames = [], []
        for _ in range(draw(st.integers(1, 2))):
            name = draw(st.sampled_from(sorted(ALLOWED_DTYPES)))
            shape = draw(st.lists(st.integers(0, 9) | st.sampled_from((2**31, 2**62)), max_size=4))
            nbytes = math.prod(shape) * ALLOWED_DTYPES[name].itemsize
            if nbytes > 4096:
                shape, nbytes = [0, *shape], 0
            header["tensors"].append({"dtype": name, "shape": shape, "nbytes": nbytes})
            frames.append(draw(st.binary(min_size=nbytes, max_size=nbytes)))
    return [json.dumps({"v": PROTOCOL_VERSION, **header}, allow_nan=True).encode(), *frames]


random_frames = st.lists(st.binary(max_size=300), min_size=1, max_size=5)


def messages(templates, tokens):
    return st.one_of(random_frames, mutated(templates, tokens), pathological, wrong_field(templates, tokens),
                     mismatched_frames(tokens))


# ---------------------------------------------------------------------------------------------------------- harness


class Fuzzer:
    """Sends messages to a live server over a bare DEALER and through a channel's request slot; checks replies."""

    def __init__(self, srv: Server | Router, token: str | None, *, slots: bool = True):
        self.srv = srv
        self.sent = {"zmq": 0, "slot": 0, "slot_corrupt": 0}
        self.replies: dict[str, int] = {}
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(srv.address)
        # the fuzz client's own session, so mutated requests reach real sessions; and a channel for slot messages
        with Client(srv.address, token=token, client_id=FUZZ_CLIENT, timeout_s=REPLY_TIMEOUT_S) as c:
            self.session = c.open(torch.randint(3, 500, (1, 6)), max_new_tokens=3).id
        self.token = token
        self.slot_client = None
        self.channels_opened = 0
        if slots and local_channel.supported():
            self._new_channel()

    def _new_channel(self) -> None:
        """A client with a shared-memory channel, whose request slot the fuzzer writes into directly."""
        if self.slot_client is not None:
            self.slot_client.close()
        self.slot_client = Client(self.srv.address, token=self.token, client_id="fuzz-slot", busy_poll_s=0.001,
                                  local_channel=True, timeout_s=REPLY_TIMEOUT_S)
        self.slot_client.ping()
        assert self.slot_client.local_channel
        self.channel = self.slot_client._transport.channel
        self.seq = 1 << 20  # above the slot client's own request ids: the slot's ids only grow
        self.channels_opened += 1

    def close(self) -> None:
        self.sock.close()
        if self.slot_client is not None:
            self.slot_client.close()

    def _count(self, frames: list) -> None:
        if frames and not frames[0]:
            frames = frames[1:]  # a message that began with an empty frame was routed back as from a REQ socket
        header = decode_header(frames[0], max_header_bytes=1 << 20)
        assert isinstance(header.get("ok"), bool), header
        kind = "ok" if header["ok"] else header["error"]["type"]
        assert header["ok"] or kind in TYPED, f"untyped error reply: {header}"
        self.replies[kind] = self.replies.get(kind, 0) + 1

    def over_zmq(self, batch: list[list[bytes]]) -> None:
        """Send a batch without waiting, then expect exactly one reply per message."""
        for frames in batch:
            self.sock.send_multipart(frames)
            self.sent["zmq"] += 1
        for i in range(len(batch)):
            assert self.sock.poll(int(REPLY_TIMEOUT_S * 1000)), f"no reply to message {i} of {batch!r}"[:2000]
            self._count(self.sock.recv_multipart())
        assert not self.sock.poll(0), "more replies than messages"

    def _await_slot_reply(self, seq: int) -> None:
        ch, deadline = self.channel, time.monotonic() + REPLY_TIMEOUT_S
        zsock = self.slot_client._zmq.sock
        while time.monotonic() < deadline:
            if ch.reply_ready(seq):
                return self._count(ch.read_reply())
            if zsock.poll(1):  # a reply too big for the channel comes over ZeroMQ (so does one to attach_local,
                self._count(zsock.recv_multipart())  # which replaced this connection's channel by a new one)
                if ch.closed:
                    self._new_channel()
                return
        raise AssertionError(f"no reply to slot request {seq}")

    def through_slot(self, frames: list[bytes] | tuple[dict, list[torch.Tensor]]) -> None:
        self.seq += 1
        if isinstance(frames, tuple):  # a valid request, given the slot's id
            frames = [bytes(f) for f in encode({**frames[0], "id": self.seq}, frames[1])]
        assert self.channel._requests.write(self.seq, frames), "a slot message that does not fit"
        self.sent["slot"] += 1
        self._await_slot_reply(self.seq)

    def corrupt_slot(self, count: int, lengths: list[int]) -> None:
        """A slot whose own framing is wrong (too many frames, lengths past its end), then a new id."""
        slot = self.channel._requests
        self.seq += 1
        struct.pack_into("<I", slot._m, slot._off + 8, count)
        for k, n in enumerate(lengths[:local_channel.MAX_FRAMES]):
            struct.pack_into("<Q", slot._m, slot._off + 12 + 8 * k, n)
        struct.pack_into("<Q", slot._m, slot._off, self.seq)
        self.sent["slot_corrupt"] += 1
        self._await_slot_reply(self.seq)

    @property
    def total(self) -> int:
        return sum(self.sent.values())


def _fuzz(fz: Fuzzer, templates, tokens, target: int) -> None:
    slot_ok = fz.slot_client is not None
    slot_msg = (st.lists(st.binary(max_size=200), min_size=1, max_size=4) | mutated(templates, tokens)
                | valid_request(templates, tokens) | wrong_field(templates, tokens))

    # no shrinking: the server's state carries from one example to the next, so a failure is reported as drawn
    @settings(max_examples=8, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(messages(templates, tokens), min_size=60, max_size=160),
           slot=st.lists(slot_msg, max_size=20 if slot_ok else 0),
           corrupt=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 2**64 - 1), max_size=4)),
                            max_size=3 if slot_ok else 0))
    def round_(batch, slot, corrupt):
        fz.over_zmq(batch)
        for frames in slot:
            fz.through_slot(frames)
        for count, lengths in corrupt:
            fz.corrupt_slot(count, lengths)

    while fz.total < target:
        round_()


def _fuzz_endpoint(endpoint: Server | Router, token: str | None, target: int, caplog, *, slots: bool = True,
                   alive: tuple[Server | Router, ...] = ()) -> None:
    """Fuzz ``endpoint`` with ``target`` messages, then check: every message answered once, typed; nothing logged at
    ERROR (no last guard reached); ``endpoint`` and ``alive`` still running; a control session opened (run to layer
    3, forked, paused) before the fuzz by another client id resumes bitwise as its twin did before."""
    control = Client(endpoint.address, token=token, client_id="control", timeout_s=REPLY_TIMEOUT_S)
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(1))
    s = control.open(ids, max_new_tokens=2)
    s.run_to(3)
    (twin,) = s.fork(1)
    before = twin.resume(logits="all")
    s.pause()  # its checkpoint waits in the host pool while the fuzz runs

    fz = Fuzzer(endpoint, token, slots=slots)
    tokens = st.sampled_from((token, None, "wrong", "")) if token else st.none() | st.text(max_size=8)
    t0 = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="djinn_core"):
            _fuzz(fz, _templates(fz.session), tokens, target)
    finally:
        fz.close()
    logging.getLogger(__name__).info("fuzz of the %s (%s): %d messages in %.1f s: %s; replies %s",
                                     type(endpoint).__name__, token and "token", fz.total, time.monotonic() - t0,
                                     fz.sent, fz.replies)

    assert fz.total >= target
    assert fz.sent["zmq"] > 0 and (fz.slot_client is None or fz.sent["slot"] > 0)
    for svc in (endpoint, *alive):
        assert svc._thread.is_alive() and svc.running
    escaped = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not escaped, [r.getMessage() for r in escaped][:5]  # nothing reached a guard or failed untyped
    if token:
        assert fz.replies.get("AuthenticationFailed", 0) > 0
    control.ping()
    assert torch.equal(s.resume(logits="all"), before), "the fuzz changed another client's session"
    assert s.generate(2).shape == (1, 2)
    control.close()


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
def test_no_message_stops_the_server_or_touches_another_clients_session(llama_tiny_fp32, token, caplog):
    cfg = ServerConfig(port=0, token=token, stats_interval_s=0, tick_s=0.002, busy_poll_s=0.002,
                       max_request_bytes=MAX_REQUEST, local_channel_bytes=CHANNEL_BYTES, max_new_tokens=4,
                       max_sessions=64, max_sessions_per_client=4)
    srv = Server(BreakpointRuntime(llama_tiny_fp32, slab_bytes=16 << 20), cfg).start()
    try:
        _fuzz_endpoint(srv, token, MESSAGES_WITH_TOKEN if token else MESSAGES_PER_RUN, caplog)
    finally:
        srv.stop()


def test_no_message_stops_the_router_or_its_worker_or_touches_another_clients_session(llama_tiny_fp32, caplog):
    """The same fuzz against ``djinn route``'s router (token on, ZeroMQ only: it offers no shared-memory channel) in
    front of one worker: every message gets exactly one typed reply, nothing reaches the router's or the worker's
    last guard, both stay up, and a control session opened through the router before the fuzz resumes bitwise."""
    wcfg = ServerConfig(port=0, token=TOKEN, stats_interval_s=0, tick_s=0.002, busy_poll_s=0.002,
                        max_request_bytes=MAX_REQUEST, max_new_tokens=4, max_sessions=64, max_sessions_per_client=4)
    worker = Server(BreakpointRuntime(llama_tiny_fp32, slab_bytes=16 << 20), wcfg).start()
    router = Router([worker.address], ServerConfig(port=0, token=TOKEN, max_request_bytes=MAX_REQUEST),
                    worker_timeout_s=60).start()
    try:
        _fuzz_endpoint(router, TOKEN, MESSAGES_TO_ROUTER, caplog, slots=False, alive=(worker,))
    finally:
        router.stop()
        worker.stop()
