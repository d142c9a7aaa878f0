"""The Djinn server and client: the in-process session behaviour, through RPC, and every way a request can be bad.

Behaviour tests run against both backends (``local``: a BreakpointRuntime; ``remote``: a Client of a server thread on
127.0.0.1 over the same weights) and compare with an uninterrupted plain run, bitwise. Servers bind ephemeral ports;
every wait is bounded in count and time.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time

import pytest
import torch
import zmq

from djinn_core.rpc import local_channel
from djinn_core.runtime import BreakpointRuntime, plain_run
from djinn_core.rpc.client import Client, RemoteSession
from djinn_core.errors import (
    AuthenticationFailed,
    CacheCapacityExceeded,
    CheckpointStateError,
    ConfigError,
    DeviceUnavailable,
    InvalidEdit,
    InvalidLayer,
    ProtocolError,
    RemoteError,
    ServerUnavailable,
    SessionLimitReached,
    UnknownSession,
)
from djinn_core.rpc.loading import load_model
from djinn_core.rpc.process import ServerProcess
from djinn_core.rpc.server import Server, ServerConfig
from djinn_core.rpc.wire import PROTOCOL_VERSION, decode, dtype_name, encode

pytestmark = pytest.mark.cpu

NEW = 6
MAX_REQUEST = 1 << 20


def _ids(seed: int, batch: int = 1, seq: int = 10, vocab: int = 512) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _server(model, **cfg) -> Server:
    cfg = {"port": 0, "stats_interval_s": 0, "tick_s": 0.02, "max_request_bytes": MAX_REQUEST, **cfg}
    return Server(BreakpointRuntime(model, slab_bytes=32 << 20), ServerConfig(**cfg)).start()


def _drop_sessions(c: Client) -> None:
    for info in c.sessions():
        RemoteSession(c, info["session"]).close()


@pytest.fixture(scope="module")
def server(llama_tiny_fp32):
    srv = _server(llama_tiny_fp32, max_sessions=24, max_sessions_per_client=12)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with Client(server.address, timeout_s=20) as c:
        yield c
        _drop_sessions(c)


@pytest.fixture(scope="module")
def spinning_server(llama_tiny_fp32):
    """A server whose loop spins 20 ms after each request, so a client's shared-memory channel carries requests too."""
    srv = _server(llama_tiny_fp32, busy_poll_s=0.02)
    yield srv
    srv.stop()


@pytest.fixture(params=["local", "remote", "remote-shm"])
def backend(request, llama_tiny_fp32, server, spinning_server):
    """Something with ``open(ids, max_new_tokens=...)``: a runtime in process, or a client of the server (everything
    over ZeroMQ, or requests and replies through a shared-memory channel where the platform has them)."""
    if request.param == "local":
        rt = BreakpointRuntime(llama_tiny_fp32, slab_bytes=32 << 20)
        yield rt
        rt.close_all()
    else:
        shm = request.param == "remote-shm"
        if shm and not local_channel.supported():
            pytest.skip("shared-memory channels need Linux on x86-64")
        srv = spinning_server if shm else server
        with Client(srv.address, timeout_s=20, busy_poll_s=0.05 if shm else 0.0) as c:
            c.ping()
            assert c.local_channel is shm
            yield c
            _drop_sessions(c)
            if shm:  # the channel carried messages both ways (the rest is timing: a descheduled client falls back)
                assert c.paths["request_local"] > 0 and c.paths["reply_local"] > 0, c.paths


def _run(backend, ids, layer, *, edit=None, pause=True):
    s = backend.open(ids, max_new_tokens=NEW)
    ck = s.run_to(layer)
    if edit is not None:
        ck.edit(edit)
    if pause:
        s.pause()
    logits = s.resume()
    tokens, steps = s.generate(NEW, return_logits=True)
    s.close()
    return logits.cpu(), tokens.cpu(), steps.cpu()


def _assert_equal(got, ref) -> None:
    for name, a, b in zip(("prompt logits", "tokens", "step logits"), got, ref):
        assert torch.equal(a, b.cpu()), f"{name} differ"


# ---------------------------------------------------------------------------------------------------------------------
# The same behaviour in process and through the client


@pytest.mark.parametrize("layer", [0, 3, 6], ids=lambda L: f"L={L}")
def test_pause_resume_equals_an_uninterrupted_run(backend, llama_tiny_fp32, layer):
    ids = _ids(1, batch=2)
    _assert_equal(_run(backend, ids, layer), plain_run(llama_tiny_fp32, ids, NEW))


def test_edit_equals_a_plain_forward_hook(backend, llama_tiny_fp32):
    ids, layer = _ids(2), 3
    v = 3.0 * torch.randn(128, generator=torch.Generator().manual_seed(0))
    s = backend.open(ids, max_new_tokens=NEW)
    h = s.run_to(layer).hidden.cpu()
    s.close()
    ref = plain_run(llama_tiny_fp32, ids, NEW, layer=layer, edit=lambda x: x + v)
    _assert_equal(_run(backend, ids, layer, edit=h + v), ref)
    assert not torch.equal(ref[1], plain_run(llama_tiny_fp32, ids, NEW)[1]), "the edit changed nothing"


def test_forks_continue_independently(backend, llama_tiny_fp32):
    ids, layer = _ids(3), 2
    base = backend.open(ids, max_new_tokens=NEW)
    ck = base.run_to(layer)
    h = ck.hidden.cpu()
    a, b = base.fork(2)
    b.checkpoint.edit((h * -1.0).to(ck.hidden.device))
    a.pause()
    ref = plain_run(llama_tiny_fp32, ids, NEW)
    ref_edit = plain_run(llama_tiny_fp32, ids, NEW, layer=layer, edit=lambda x: -x)
    for s, want in ((b, ref_edit), (a, ref), (base, ref)):
        logits = s.resume()
        assert torch.equal(logits.cpu(), want[0])
        assert torch.equal(s.generate(NEW).cpu(), want[1])
        s.close()


def test_pause_while_decoding_continues_bitwise(backend, llama_tiny_fp32):
    ids = _ids(13)
    s = backend.open(ids, max_new_tokens=NEW)
    s.run_to(2)
    s.resume()
    first = s.generate(2)
    s.pause()  # between decode steps: the KV goes to the host
    assert s.resume() is None
    rest = s.generate(NEW - 2)
    s.close()
    assert torch.equal(torch.cat([first, rest], 1).cpu(), plain_run(llama_tiny_fp32, ids, NEW)[1])


def test_wrong_use_raises_the_same_typed_errors(backend):
    s = backend.open(_ids(4), max_new_tokens=2)
    with pytest.raises(InvalidLayer):
        s.run_to(99)
    ck = s.run_to(3)
    before = ck.hidden.cpu().clone()
    with pytest.raises(InvalidEdit):
        ck.edit(torch.zeros(1, 3, 128, dtype=torch.float32))
    with pytest.raises(InvalidEdit):
        ck.edit(torch.zeros(*before.shape, dtype=torch.float64))
    assert torch.equal(ck.hidden.cpu(), before), "a refused edit changed the checkpoint"
    s.pause()
    with pytest.raises(CheckpointStateError):
        _ = s.checkpoint.hidden  # paused: restore first
    s.resume()
    with pytest.raises(CheckpointStateError):
        s.resume()
    with pytest.raises(CacheCapacityExceeded):
        s.generate(3)
    s.close()
    s.close()  # idempotent
    with pytest.raises(CheckpointStateError):
        s.resume()


# ---------------------------------------------------------------------------------------------------------------------
# Remote only: payload options, stats, ownership, reattaching


def test_logits_modes_and_stats(client, llama_tiny_fp32):
    ids = _ids(5)
    ref = plain_run(llama_tiny_fp32, ids, 1)[0]
    sessions = [client.open(ids, max_new_tokens=1) for _ in range(3)]
    for s in sessions:
        s.run_to(4)
    sessions[0].pause()
    st = client.stats()
    assert st["swapped"] >= 1 and st["resident"] >= 2 and st["sessions"] >= 3
    assert st["swap"]["bytes_out"] > 0 and st["slab"]["used"] > 0 and st["vram"] is None
    assert sessions[0].state == "paused" and sessions[0].state_bytes() > 0
    assert torch.equal(sessions[0].resume(logits="last"), ref[:, -1])
    assert sessions[1].resume(logits="none") is None
    assert torch.equal(sessions[2].resume(logits="all"), ref)
    assert [i["session"] for i in client.sessions()] == [s.id for s in sessions]


def test_the_benchmarking_op_is_offered_only_when_asked_for_and_leaves_its_session_as_it_was(client,
                                                                                            llama_tiny_fp32):
    ids = _ids(5)
    ref = plain_run(llama_tiny_fp32, ids, 1)[0]
    s = client.open(ids, max_new_tokens=1)
    s.run_to(2)
    with pytest.raises(ProtocolError, match="unknown op 'resume_timed'"):  # a server without --bench-ops
        s.resume_timed()
    srv = _server(llama_tiny_fp32, bench_ops=True)
    try:
        with Client(srv.address, timeout_s=20) as c:
            b = c.open(ids, max_new_tokens=1)
            b.run_to(2)
            before = c.stats()["sessions"]
            times, last = b.resume_timed()
            assert torch.equal(last, ref[:, -1])
            assert times["ms"] > 0 and times["ms"] >= times["launch_ms"] and times["wait_ms"] >= 0
            assert c.stats()["sessions"] == before and b.state == "checkpoint"  # its fork is gone, it is intact
            assert torch.equal(b.resume(logits="last"), ref[:, -1])
            _drop_sessions(c)
    finally:
        srv.stop()


def test_sessions_survive_a_disconnect_and_belong_to_their_client(server, llama_tiny_fp32):
    ids = _ids(6)
    with Client(server.address, timeout_s=20) as c1:
        s = c1.open(ids, max_new_tokens=NEW)
        s.run_to(2)
        s.pause()
        owner, sid = c1.client_id, s.id
    with Client(server.address, timeout_s=20) as other:
        for call in (lambda t: t.resume(), lambda t: t.checkpoint, lambda t: t.close(), lambda t: t.fork(1)):
            with pytest.raises(UnknownSession):
                call(RemoteSession(other, sid))
        with pytest.raises(UnknownSession):
            other.session(987654)
    with Client(server.address, timeout_s=20, client_id=owner) as c2:
        s = c2.session(sid)
        assert s.state == "paused"
        _assert_equal((s.resume(), *s.generate(NEW, return_logits=True)), plain_run(llama_tiny_fp32, ids, NEW))
        s.close()


def test_session_limits_are_enforced(server, client):
    limit = server.config.per_client_limit
    held = [client.open(_ids(7), max_new_tokens=1) for _ in range(limit)]
    with pytest.raises(SessionLimitReached):
        client.open(_ids(7), max_new_tokens=1)
    held[0].close()
    held[1].run_to(1)
    with pytest.raises(SessionLimitReached):
        held[1].fork(2)
    assert len(held[1].fork(1)) == 1
    with pytest.raises(ConfigError):
        client.open(_ids(7), max_new_tokens=10**9)  # over the server's max_new_tokens (also a limit)


def test_oversized_payload_is_refused_and_the_server_keeps_serving(client):
    big = torch.zeros(1, MAX_REQUEST // 8 + 1000, dtype=torch.long)  # just over the limit, under the hard cap
    with pytest.raises(ProtocolError, match="exceeds"):
        client.open(big)
    s = client.open(_ids(8), max_new_tokens=1)
    ck = s.run_to(1)
    with pytest.raises(ProtocolError, match="exceeds"):
        ck.edit(torch.zeros(1, MAX_REQUEST // 4, dtype=torch.float32))
    client.ping()
    with Client(client.address, timeout_s=20, max_request_bytes=1000) as small:
        with pytest.raises(ProtocolError, match="max_request_bytes"):  # refused before sending
            small.open(torch.zeros(1, 1000, dtype=torch.long))


def _raw(address: str, frames: list[bytes], timeout_s: float = 10.0) -> dict:
    """Send raw frames from a bare DEALER and return the reply header (asserting a reply comes)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(frames)
        assert sock.poll(int(timeout_s * 1000)), f"no reply to {frames!r}"
        reply = [f for f in sock.recv_multipart() if f]
        return decode(reply, max_bytes=1 << 20).header
    finally:
        sock.close()


def _header(**kw) -> bytes:
    h = {"v": PROTOCOL_VERSION, "id": 7, "op": "ping", "client": "raw", "args": {}, "tensors": [], **kw}
    return json.dumps(h).encode()


MALFORMED = {
    "garbage bytes": [b"\xff\xfe garbage"],
    "not an object": [b"[1, 2, 3]"],
    "bad version": [_header(v=99)],
    "no client id": [_header(client=None)],
    "op not a string": [_header(op=5)],
    "unknown op": [_header(op="rm -rf")],
    "args not an object": [_header(args=[1])],
    "layer not an int": [_header(op="run_to", session=1, args={"layer": "3"})],
    "dtype not allowed": [_header(op="open", tensors=[{"dtype": "complex64", "shape": [1], "nbytes": 8}]), b"\0" * 8],
    "object dtype": [_header(op="open", tensors=[{"dtype": "object", "shape": [1], "nbytes": 8}]), b"\0" * 8],
    "nbytes != shape": [_header(op="open", tensors=[{"dtype": "int64", "shape": [1, 4], "nbytes": 16}]), b"\0" * 16],
    "frame != nbytes": [_header(op="open", tensors=[{"dtype": "int64", "shape": [1, 2], "nbytes": 16}]), b"\0" * 8],
    "missing frame": [_header(op="open", tensors=[{"dtype": "int64", "shape": [1, 2], "nbytes": 16}])],
    "extra frame": [_header(), b"\0" * 8],
    "negative shape": [_header(op="open", tensors=[{"dtype": "int64", "shape": [-1], "nbytes": -8}]), b""],
    "empty tensor, strides past 64 bits": [_header(op="open", tensors=[{"dtype": "int64", "shape": [0, 2**62, 2**62],
                                                                       "nbytes": 0}]), b""],
    "header too large": [_header(pad="x" * (70 << 10))],
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_malformed_messages_get_a_protocol_error(server, client, what):
    reply = _raw(server.address, MALFORMED[what])
    assert reply["ok"] is False and reply["error"]["type"] == "ProtocolError", reply
    assert reply["error"]["message"]
    client.ping()  # and the server keeps serving others


def test_wrong_or_missing_token_is_refused(llama_tiny_fp32):
    srv = _server(llama_tiny_fp32, token="s3cret")
    try:
        for token in (None, "wrong", "s3cret-but-longer"):
            with Client(srv.address, token=token, timeout_s=20) as c:
                with pytest.raises(AuthenticationFailed) as ei:
                    c.ping()
                assert isinstance(ei.value, (RemoteError, PermissionError))
        with Client(srv.address, token="s3cret", timeout_s=20) as c:
            c.ping()
            s = c.open(_ids(9), max_new_tokens=1)
            s.run_to(1)
            s.close()
    finally:
        srv.stop()


def test_binding_beyond_loopback_needs_a_token():
    with pytest.raises(ConfigError, match="token"):
        ServerConfig(host="0.0.0.0")
    with pytest.raises(ConfigError, match="token"):
        ServerConfig(host="10.1.2.3")
    assert ServerConfig(host="0.0.0.0", token="t").token == "t"
    assert ServerConfig(host="::1").endpoint == "tcp://[::1]:5556"
    for bad in ({"max_sessions": 0}, {"port": 70000}, {"idle_timeout_s": 0}, {"max_request_bytes": True}):
        with pytest.raises(ConfigError):
            ServerConfig(**bad)
    with pytest.raises(ConfigError, match="neither"):
        load_model("no-such-model")


def test_idle_sessions_are_freed(llama_tiny_fp32):
    srv = _server(llama_tiny_fp32, idle_timeout_s=0.3)
    try:
        with Client(srv.address, timeout_s=20) as c:
            s = c.open(_ids(10), max_new_tokens=1)
            s.run_to(3)
            s.pause()
            keep = c.open(_ids(10), max_new_tokens=1)
            deadline = time.monotonic() + 10
            while c.stats()["sessions"] > 1 and time.monotonic() < deadline:
                keep.info()  # used: stays
                time.sleep(0.05)
            st = c.stats()
            assert st["sessions"] == 1 and st["host_pool"]["used"] == 0, st
            with pytest.raises(UnknownSession, match="idle"):
                s.resume()
            keep.close()
    finally:
        srv.stop()


def test_shutdown_completes_the_running_request_and_refuses_the_queued_one(llama_tiny_fp32):
    srv = _server(llama_tiny_fp32, drain_s=0.5)
    entered, release = threading.Event(), threading.Event()
    ping = srv.ops["ping"]

    def slow_ping(req):
        entered.set()
        assert release.wait(10)
        return ping(req)

    srv.ops["ping"] = slow_ping
    outcome: dict[str, object] = {}

    def call(name: str, fn) -> None:
        try:
            outcome[name] = fn()
        except Exception as e:  # noqa: BLE001 - recorded and checked below
            outcome[name] = e

    with Client(srv.address, timeout_s=20) as a, Client(srv.address, timeout_s=20) as b:
        s = b.open(_ids(11), max_new_tokens=1)
        ta = threading.Thread(target=call, args=("a", a.ping))
        ta.start()
        assert entered.wait(10)
        tb = threading.Thread(target=call, args=("b", lambda: s.run_to(2)))
        tb.start()
        time.sleep(0.3)  # b's request reaches the server's queue while a's runs
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        time.sleep(0.1)
        release.set()
        for t in (ta, tb, stopper):
            t.join(30)
            assert not t.is_alive()
    assert outcome["a"] is None, outcome  # completed
    assert isinstance(outcome["b"], ServerUnavailable) and "shutting down" in str(outcome["b"]), outcome
    assert not srv.running
    t0 = time.monotonic()
    with Client(srv.address, timeout_s=0.5) as late:
        with pytest.raises(ServerUnavailable, match="no reply"):
            late.ping()
    assert time.monotonic() - t0 < 5


def test_no_server_means_a_timeout_error_not_a_hang():
    t0 = time.monotonic()
    with Client("tcp://127.0.0.1:9", timeout_s=0.3) as c:
        with pytest.raises(ServerUnavailable):
            c.ping()
    with pytest.raises(ServerUnavailable, match="closed"):
        c.ping()
    assert time.monotonic() - t0 < 5


def test_wire_round_trips_every_allowed_dtype():
    ts = [torch.arange(6, dtype=d).view(2, 3) for d in (torch.float16, torch.bfloat16, torch.float32,
                                                         torch.int64, torch.uint8)]
    ts.append(torch.empty(0, 4))
    ts.append(torch.arange(12.0).view(3, 4).t())  # non-contiguous
    msg = decode(encode({"op": "x"}, ts), max_bytes=1 << 20)
    assert msg.header["op"] == "x"
    for a, b in zip(ts, msg.tensors):
        assert a.dtype == b.dtype and torch.equal(a, b)
        b.add_(1)  # decoded tensors are writable memory of their own


def test_djinn_serve_cli_serves_until_sigterm():
    args = ["--model", "llama-tiny", "--device", "cpu", "--slab-bytes", "16MiB", "--stats-interval-s", "0"]
    srv = ServerProcess(args, start_timeout_s=120, stop_timeout_s=30)
    try:
        with Client(srv.address, timeout_s=20) as c:
            s = c.open(_ids(12), max_new_tokens=2)
            s.run_to(3)
            assert s.resume(logits="last").shape == (1, 512)
            assert c.stats()["sessions"] == 1
    finally:
        rc = srv.stop()
    out = "".join(srv.output)
    assert rc == 0, out
    assert "stopped (1 sessions freed" in out, out


# ---------------------------------------------------------------------------------------------------------------------
# End to end on a real model: SmolLM2-135M-Instruct, a chat prompt, a steering edit, remote == in process


@pytest.fixture(scope="module")
def smollm2_server(smollm2_cpu):
    """SmolLM2 (shared, session-scoped), a chat prompt, and a server over the model."""
    model, tok = smollm2_cpu
    text = tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue? One sentence."}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt").input_ids
    srv = Server(BreakpointRuntime(model, slab_bytes=64 << 20), ServerConfig(port=0, stats_interval_s=0, tick_s=0.02))
    srv.start()
    yield model, tok, ids, srv
    srv.stop()


class TestSmolLM2EndToEnd:
    def test_steered_continuation_is_bitwise_the_in_process_one(self, smollm2_server):
        model, tok, ids, srv = smollm2_server
        layer, n = model.config.num_hidden_layers // 2, 12
        v = 4.0 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        ref = plain_run(model, ids, n, layer=layer, edit=lambda h: h + v)
        plain = plain_run(model, ids, n)
        with Client(srv.address, timeout_s=60) as c:
            s = c.open(ids, max_new_tokens=n)
            ck = s.run_to(layer)
            (twin,) = s.fork(1)
            ck.edit(lambda h: h + v)  # runs here, on a CPU copy; the model is on the CPU too, so bitwise equal
            s.pause()
            twin.pause()
            got = (s.resume(), *s.generate(n, return_logits=True))
            _assert_equal(got, ref)
            assert torch.equal(twin.resume(logits="last"), plain[0][:, -1])
            assert torch.equal(twin.generate(n), plain[1])
            assert tok.decode(got[1][0]) != tok.decode(plain[1][0])
            s.close()
            twin.close()


# ---------------------------------------------------------------------------------------------- shared-memory channels

needs_shm = pytest.mark.skipif(not local_channel.supported(), reason="shared-memory channels need Linux on x86-64")


def _wait_gone(server: Server, name: str) -> None:
    deadline = time.monotonic() + 10
    while name in server.transport.channels and time.monotonic() < deadline:  # the close's detach, handled by the server
        time.sleep(0.01)
    assert name not in server.transport.channels


@needs_shm
def test_a_local_channel_carries_requests_and_replies_and_leaves_no_file_behind(spinning_server, llama_tiny_fp32):
    ids = _ids(21)
    ref = plain_run(llama_tiny_fp32, ids, 1)[0]
    with Client(spinning_server.address, timeout_s=20, busy_poll_s=0.05) as c:
        c.ping()
        assert c.local_channel
        name = c._transport.channel.name
        ch = spinning_server.transport.channels[name]
        writes, reads = ch.writes, ch.reads
        s = c.open(ids, max_new_tokens=1)
        s.run_to(3)
        assert torch.equal(s.resume(logits="last"), ref[:, -1])
        assert ch.writes >= writes + 3  # open, run_to and resume came back through the channel
        assert ch.reads > reads  # and, the server spinning, requests went through it too
        assert not os.path.exists(ch.path)  # unlinked once the client had it mapped
        with pytest.raises(InvalidLayer):  # errors come back through it too, typed as ever
            c.open(ids, max_new_tokens=1).run_to(99)
        _drop_sessions(c)
        assert c.last_phases_ms is not None and set(c.last_phases_ms) == {
            "request", "dispatch", "op", "op_launch", "op_wait", "reply", "reply_decode"}
    _wait_gone(spinning_server, name)


@needs_shm
def test_a_server_that_does_not_spin_gets_every_request_over_zeromq(server):
    with Client(server.address, timeout_s=20, busy_poll_s=0.05) as c:  # the fixture's server: busy_poll_s=0
        for _ in range(5):
            c.ping()
        assert c.local_channel
        assert c.paths["request_local"] == 0 and c.paths["request_zmq"] == 6  # attach + 5 pings
        assert c.paths["reply_local"] == 5  # the replies still come through the channel


@needs_shm
def test_messages_too_big_for_the_channel_go_over_zeromq(llama_tiny_fp32):
    srv = _server(llama_tiny_fp32, local_channel_bytes=8192, busy_poll_s=0.02)
    try:
        ids = _ids(22, seq=40)
        ref = plain_run(llama_tiny_fp32, ids, 1)[0]
        with Client(srv.address, timeout_s=20, busy_poll_s=0.05) as c:
            c.ping()
            assert c.local_channel
            s = c.open(ids, max_new_tokens=1)
            ck = s.run_to(2)
            h = ck.hidden  # 40 x 64 fp32: more than 8 KiB, back over ZeroMQ
            zmq_requests = c.paths["request_zmq"]
            ck.edit(h)  # the same state, sent back: a request too big for the slot
            assert c.paths["request_zmq"] == zmq_requests + 1
            full = s.resume(logits="all")  # 40 x 512 fp32 logits: far more than 8 KiB
            assert torch.equal(full, ref)
            assert c.paths["reply_zmq"] >= 2
    finally:
        srv.stop()


@needs_shm
def test_a_channel_serves_only_the_connection_it_was_made_for(spinning_server):
    with Client(spinning_server.address, timeout_s=20, busy_poll_s=0.05) as owner:
        owner.ping()
        ch = spinning_server.transport.channels[owner._transport.channel.name]
        writes = ch.writes
        # another connection naming the owner's channel gets its reply over ZeroMQ; the channel is not touched
        frames = encode({"op": "ping", "client": "intruder", "token": None, "session": None, "args": {}, "id": 10**9,
                         "reply_to": owner._transport.channel.name})
        reply = _raw(spinning_server.address, frames)
        assert reply["ok"] and ch.writes == writes and ch.last_request < 10**9
        owner.ping()
        assert ch.writes == writes + 1


@needs_shm
def test_bad_requests_in_a_slot_get_clear_errors_through_it(spinning_server):
    with Client(spinning_server.address, timeout_s=20, busy_poll_s=0.05) as c:
        c.ping()
        ch = c._transport.channel
        for rid, frames, err in [
            (1000, [b"not json"], "ProtocolError"),
            (2000, encode({"op": "ping", "client": "c", "args": {}, "id": 999}), "ProtocolError"),  # id != slot's
            (3000, encode({"op": "nope", "client": "c", "args": {}, "id": 3000}), "ProtocolError"),
        ]:
            c._ids = itertools.count(rid - 100)  # request ids of one connection only grow: stay below the next
            for _ in range(50):  # the server polls the slot for 20 ms after a request: a loaded host may miss that
                c.ping()
                if ch.send_request(rid, frames):
                    break
            else:
                pytest.fail("the server never polled the slot right after a ping (50 tries)")
            deadline = time.monotonic() + 10
            while not ch.reply_ready(rid) and time.monotonic() < deadline:
                pass
            header = decode(ch.read_reply(), max_bytes=1 << 20).header
            assert header["ok"] is False and header["error"]["type"] == err, header
        c._ids = itertools.count(4000)
        c.ping()  # and the client goes on working


@needs_shm
def test_after_a_shutdown_the_client_drops_the_channel_and_gets_a_clear_error(llama_tiny_fp32):
    srv = _server(llama_tiny_fp32, busy_poll_s=0.02)
    c = Client(srv.address, timeout_s=1, busy_poll_s=0.05)
    try:
        c.ping()
        assert c.local_channel
        srv.stop()
        with pytest.raises(ServerUnavailable):
            c.ping()
        assert not c.local_channel
    finally:
        c.close()


@needs_shm
def test_a_server_without_channels_leaves_everything_on_zeromq(llama_tiny_fp32):
    srv = _server(llama_tiny_fp32, local_channel_bytes=0)
    try:
        with Client(srv.address, timeout_s=20, busy_poll_s=0.05) as c:
            c.ping()
            assert not c.local_channel
            assert c.open(_ids(23), max_new_tokens=1).run_to(1).layer == 1
    finally:
        srv.stop()


@needs_shm
def test_a_spinning_client_keeps_only_small_replies_to_warm_with(spinning_server):
    ids = _ids(24, seq=40)
    with Client(spinning_server.address, timeout_s=20, busy_poll_s=0.05) as c:
        s = c.open(ids, max_new_tokens=1)
        s.run_to(2)
        last = s.resume(logits="last")
        assert c._zmq.warm_frames is not None  # a small reply with a tensor: kept to decode again while spinning
        kept = c._zmq.warm_frames
        c.ping()  # a reply without tensors leaves it in place
        assert c._zmq.warm_frames is kept
        c._zmq.warm()
        assert c._zmq.warm_frames is not None
        assert torch.equal(decode(c._zmq.warm_frames, max_bytes=1 << 30).tensors[0], last)  # untouched by warming
        c._zmq.warm_frames = [b"not json"]  # a kept reply that no longer decodes is dropped, never raised
        c._zmq.warm()
        assert c._zmq.warm_frames is None
        _drop_sessions(c)
    with Client(spinning_server.address, timeout_s=20) as c:  # not spinning: nothing kept
        c.ping()
        assert c._zmq.warm_frames is None


@needs_shm
def test_the_idle_sweep_keeps_a_channel_while_its_client_may_still_write_to_it(llama_tiny_fp32):
    srv = _server(llama_tiny_fp32, busy_poll_s=0.5, idle_timeout_s=0.01, tick_s=0.005)
    try:
        with Client(srv.address, timeout_s=20, busy_poll_s=0.05) as c:
            c.ping()
            name = c._transport.channel.name
            time.sleep(0.05)  # idle past the timeout (the server sweeps every 5 ms), inside its 0.5 s polling window
            assert name in srv.transport.channels
            c.ping()
            assert c.local_channel and c.paths["request_local"] >= 1
            deadline = time.monotonic() + 5
            while name in srv.transport.channels and time.monotonic() < deadline:  # past both: freed by the server's sweep
                time.sleep(0.02)
            assert name not in srv.transport.channels
    finally:
        srv.stop()


class _SlowStaging:
    """The server's staging for CPU tensors, its copies landing only when :meth:`wait` has waited ``delay_s`` (as a
    device's would), or failing there: how a reply goes header first is tried without a GPU."""

    def __init__(self, delay_s: float, *, fail: bool = False):
        self.delay_s, self.fail, self.waits = delay_s, fail, 0
        self._pending: list[tuple[torch.Tensor, bytearray]] = []

    def fits(self, tensors) -> bool:
        return bool(tensors) and all(isinstance(t, torch.Tensor) and t.numel() for t in tensors)

    def start(self, tensors, into=None):
        """Into buffers of its own, or ``into`` (a region and each tensor's offset in it) as a device would copy."""
        if into is None:
            dests = [bytearray(t.numel() * t.element_size()) for t in tensors]
        else:
            region, offs = into
            dests = [region[o:o + t.numel() * t.element_size()].numpy() for t, o in zip(tensors, offs)]
        self._pending = [(t.detach().contiguous(), d) for t, d in zip(tensors, dests)]
        descs = [{"dtype": dtype_name(t.dtype), "shape": list(t.shape), "nbytes": memoryview(d).nbytes}
                 for t, d in self._pending]
        return descs, [memoryview(d) for _, d in self._pending]

    def wait(self, warm: bool = True) -> None:
        self.waits += 1
        self.warmed = warm
        time.sleep(self.delay_s)
        if self.fail:
            raise DeviceUnavailable("the device copy failed (a test's staging)")
        for t, b in self._pending:
            memoryview(b)[:] = memoryview(t.reshape(-1).view(torch.uint8).numpy())


@needs_shm
@pytest.mark.parametrize("client_spin_s", [0.5, 0.02], ids=["spinning", "past-the-spin"])
def test_a_reply_goes_header_first_while_the_device_works_and_its_tensors_follow(llama_tiny_fp32, client_spin_s):
    ids = _ids(25)
    ref = plain_run(llama_tiny_fp32, ids, 1)[0]
    srv = _server(llama_tiny_fp32, busy_poll_s=0.5)
    staging = srv._staging
    try:
        with Client(srv.address, timeout_s=20, busy_poll_s=client_spin_s) as c:
            c.ping()
            assert c.local_channel
            s = c.open(ids, max_new_tokens=1)
            s.run_to(3)
            srv._staging = slow = _SlowStaging(0.1)  # between requests: the server thread is waiting for the next
            t0 = time.perf_counter()
            got = s.resume(logits="last")
            assert time.perf_counter() - t0 >= 0.1 and slow.waits == 1
            assert not slow.warmed  # the header went first: nothing to keep warm while polling
            assert torch.equal(got, ref[:, -1])
            assert c.paths["reply_header_first"] == 1
            assert c.last_server_ms >= 100.0  # the op's end came with the tensor frames
            assert c.last_phases_ms["op_wait"] >= 100.0 - 1.0
            # tensors that never come: a typed error (over ZeroMQ), and the channel serves the next request
            srv._staging = _SlowStaging(0.01, fail=True)
            s2 = c.open(ids, max_new_tokens=1)
            s2.run_to(3)
            zmq_replies = c.paths["reply_zmq"]
            with pytest.raises(DeviceUnavailable, match="test's staging"):
                s2.resume(logits="last")
            assert c.paths["reply_zmq"] == zmq_replies + 1 and c.paths["reply_header_first"] == 1
            srv._staging = staging
            local = c.paths["reply_local"]
            s3 = c.open(ids, max_new_tokens=1)
            s3.run_to(3)
            assert torch.equal(s3.resume(logits="last"), ref[:, -1])
            assert c.paths["reply_local"] > local
            _drop_sessions(c)
    finally:
        srv.stop()


@needs_shm
def test_a_header_first_reply_lands_in_the_channel_itself_where_the_channel_can_be_pinned(llama_tiny_fp32):
    """As on a GPU whose driver can page-lock the channel: the device's copies go into the reply slot, and after the
    wait the server only marks them there. The channel is pinned once, and unpinned before it is unmapped."""
    ids = _ids(25)
    ref = plain_run(llama_tiny_fp32, ids, 1)[0]
    srv = _server(llama_tiny_fp32, busy_poll_s=0.5)
    pinned, unpinned = [], []

    def pin(view):
        pinned.append(view.nbytes)
        return torch.frombuffer(view, dtype=torch.uint8), lambda: unpinned.append(view.nbytes)

    try:
        with Client(srv.address, timeout_s=20, busy_poll_s=0.5) as c:
            c.ping()
            assert c.local_channel
            srv._pin = pin
            for n in range(2):
                s = c.open(ids, max_new_tokens=1)
                s.run_to(3)
                srv._staging = _SlowStaging(0.05)
                assert torch.equal(s.resume(logits="last"), ref[:, -1])
                assert c.paths["reply_header_first"] == n + 1 and c.last_server_ms >= 50.0
            assert srv.stats()["header_first"] == {"in_place": 2, "staged": 0}
            assert len(pinned) == 1 and not unpinned  # once per channel
            _drop_sessions(c)
        srv.stop()
        assert unpinned == pinned  # the channel let its pinned views go when it closed
    finally:
        srv.stop()


def test_the_op_end_of_a_header_first_reply_is_filled_in_however_the_client_found_it():
    from djinn_core.rpc.shm_transport import _fill_op_end

    header = {"server_ms": None, "server_t": [1.0, 2.0, 2.5, None]}
    _fill_op_end(header, 2.25)
    assert header == {"server_ms": 250.0, "server_t": [1.0, 2.0, 2.5, 2.25]}
    whole = {"server_ms": 5.0, "server_t": [1.0, 2.0, 2.5, 3.0]}  # a reply sent whole keeps its own
    _fill_op_end(whole, 9.0)
    assert whole == {"server_ms": 5.0, "server_t": [1.0, 2.0, 2.5, 3.0]}
    odd = {"server_t": "x"}  # nothing to fill in a header that does not say where
    _fill_op_end(odd, 9.0)
    assert odd == {"server_t": "x"}


@needs_shm
def test_a_client_refuses_a_channel_of_another_layout_and_stays_on_zeromq(spinning_server, monkeypatch):
    import djinn_core.rpc.client as client_module

    monkeypatch.setattr(client_module, "CHANNEL_LAYOUT", 1)  # a client of the slots before header-first replies
    before = set(spinning_server.transport.channels)
    with Client(spinning_server.address, timeout_s=20, busy_poll_s=0.05) as c:
        c.ping()
        assert not c.local_channel and c.paths["reply_local"] == 0 and c.paths["reply_zmq"] >= 2
        assert set(spinning_server.transport.channels) == before  # the channel it was given went back at once
