"""``djinn route``: one endpoint over several servers. Sessions opened through a :class:`Router` spread over its
workers, behave bitwise as on a single server, and a lost worker takes only its own sessions down.

Workers are server threads on 127.0.0.1 over the same ``llama-tiny`` weights; a third, ``reference``, server is called
directly for the bitwise comparisons. Every wait is bounded (client and worker timeouts of seconds). The concurrency
tests make a worker's op wait on an event (:func:`_hold_op`), so they assert orders of events, never speeds.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Callable

import pytest
import torch
import zmq

from djinn_core.cli import main
from djinn_core.errors import (
    AuthenticationFailed,
    CheckpointStateError,
    ConfigError,
    ProtocolError,
    RemoteError,
    ServerUnavailable,
    UnknownSession,
    WorkerLost,
)
from djinn_core.rpc.client import Client, RemoteSession
from djinn_core.rpc.process import ServerProcess
from djinn_core.rpc.router import MostFreeSlab, Router
from djinn_core.rpc.server import Server, ServerConfig
from djinn_core.rpc.wire import decode, encode
from djinn_core.runtime import BreakpointRuntime

pytestmark = pytest.mark.cpu

NEW = 5
LAYER = 3


def _ids(seed: int, batch: int = 1, seq: int = 9) -> torch.Tensor:
    return torch.randint(3, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _server(model) -> Server:
    """A worker on its own copy of ``model``, as each ``djinn serve`` process has its own: the router runs workers
    at the same time, and one model's capture hooks must not serve two server threads at once."""
    cfg = ServerConfig(port=0, stats_interval_s=0, tick_s=0.02, max_request_bytes=1 << 20)
    return Server(BreakpointRuntime(copy.deepcopy(model), slab_bytes=32 << 20), cfg).start()


def _router(workers: list[Server], **kw) -> Router:
    cfg = ServerConfig(port=0, tick_s=0.02, token=kw.pop("token", None), max_request_bytes=1 << 20)
    return Router([w.address for w in workers], cfg, **{"worker_timeout_s": 10.0, **kw}).start()


def _worker_of(router: Router, s: RemoteSession) -> int:
    return router.routes[s.id].worker


def _open_on(router: Router, client: Client, worker: int, seed: int) -> tuple[RemoteSession, list[RemoteSession]]:
    """A session of ``client`` on ``worker`` (placement alternates over a pool's idle workers), and every session
    opened on the way (to close at the end)."""
    opened = []
    for i in range(6):
        s = client.open(_ids(seed + i), max_new_tokens=NEW)
        opened.append(s)
        if _worker_of(router, s) == worker:
            return s, opened
    raise AssertionError(f"6 opens and none on worker {worker}")


def _hold_op(server: Server, op: str, started: threading.Event,
             release: threading.Event) -> tuple[threading.Event, Callable[[], None]]:
    """Make ``op`` on ``server`` set ``started``, then wait for ``release`` (10 s at most) before it runs: (an event
    set once a held op has finished, the undo)."""
    fn = server.ops[op]
    finished = threading.Event()

    def held(req):
        started.set()
        release.wait(10)
        try:
            return fn(req)
        finally:
            finished.set()

    server.ops[op] = held
    return finished, lambda: server.ops.__setitem__(op, fn)


@pytest.fixture(scope="module")
def pool(llama_tiny_fp32):
    """(router, its two workers, a reference server) for the whole module."""
    workers = [_server(llama_tiny_fp32), _server(llama_tiny_fp32)]
    reference = _server(llama_tiny_fp32)
    router = _router(workers)
    yield router, workers, reference
    router.stop()
    for s in (*workers, reference):
        s.stop()


@pytest.fixture
def routed(pool):
    with Client(pool[0].address, timeout_s=30) as c:
        yield c
        for info in c.sessions():
            RemoteSession(c, info["session"]).close()


@pytest.fixture
def direct(pool):
    with Client(pool[2].address, timeout_s=30) as c:
        yield c


def _script(client: Client, seed: int) -> tuple[torch.Tensor, ...]:
    """open, run_to, edit, pause, resume, generate (with logits), then a fork of a second session: every result."""
    s = client.open(_ids(seed), max_new_tokens=NEW)
    ck = s.run_to(LAYER)
    h = ck.hidden
    ck.edit(h * 1.5)
    s.pause()
    s.restore()
    logits = s.resume()
    tokens, steps = s.generate(NEW, return_logits=True)
    s.close()
    parent = client.open(_ids(seed + 1, batch=2), max_new_tokens=NEW)
    parent.run_to(LAYER)
    kids = parent.fork(2)
    out = [h, logits, tokens, steps]
    for k in kids:
        out.append(k.resume(logits="last"))
        out.append(k.generate(NEW))
    out.append(parent.resume())
    for x in (parent, *kids):
        x.close()
    return tuple(out)


# -- placement ---------------------------------------------------------------------------------------------------------
def test_most_free_slab_picks_the_most_free_bytes_per_session_then_the_fewest_sessions():
    p = MostFreeSlab()
    assert p.choose([{"slab": {"free": 10}, "sessions": 0}, {"slab": {"free": 20}, "sessions": 5}]) == 0
    assert p.choose([{"slab": {"free": 10}, "sessions": 1}, {"slab": {"free": 40}, "sessions": 2}]) == 1
    assert p.choose([{"slab": {"free": 20}, "sessions": 3}, {"slab": {"free": 20}, "sessions": 2}]) == 1
    assert p.choose([{"slab": {"free": 20}, "sessions": 2}, {"slab": {"free": 20}, "sessions": 2}]) == 0
    assert p.choose([None, {"slab": {"free": 1}, "sessions": 9}]) == 1
    with pytest.raises(ServerUnavailable):
        p.choose([None, None])


def test_opens_spread_over_both_workers_and_stats_total_them(pool, routed):
    router, workers, _ = pool
    sessions = [routed.open(_ids(i), max_new_tokens=NEW) for i in range(4)]
    sessions[0].run_to(LAYER)  # holds slab on its worker: the next open goes to the other
    nxt = routed.open(_ids(9), max_new_tokens=NEW)
    assert {_worker_of(router, s) for s in sessions} == {0, 1}
    assert _worker_of(router, nxt) != _worker_of(router, sessions[0])
    assert len({s.id for s in (*sessions, nxt)}) == 5
    st = routed.stats()
    assert st["sessions"] == 5 and st["live_workers"] == 2 and len(st["workers"]) == 2
    assert st["slab"]["capacity"] == sum(w["stats"]["slab"]["capacity"] for w in st["workers"])
    assert st["slab"]["free"] == st["slab"]["capacity"] - st["slab"]["used"]
    assert sorted(i["session"] for i in routed.sessions()) == sorted(s.id for s in (*sessions, nxt))
    routed.ping()


def test_a_burst_of_opens_decided_on_one_snapshot_still_spreads(pool):
    """Eight clients open at once: their placements all read stats taken before any of them landed; the router
    counts what it placed since, so the sessions split over both workers instead of piling onto one."""
    router, _, _ = pool
    start = threading.Barrier(8)
    opened: list[tuple[Client, RemoteSession]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        c = Client(router.address, timeout_s=60)
        start.wait(timeout=30)
        s = c.open(_ids(20 + i), max_new_tokens=NEW)
        with lock:
            opened.append((c, s))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(opened) == 8
    per = [sum(1 for _, s in opened if _worker_of(router, s) == w) for w in (0, 1)]
    assert min(per) >= 3, per
    for c, s in opened:
        s.close()
        c.close()


# -- behaviour ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2])
def test_session_ops_through_the_router_equal_a_single_server_bitwise(pool, routed, direct, seed):
    got, ref = _script(routed, seed), _script(direct, seed)
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"result {i} differs"


def test_a_fork_stays_on_its_parents_worker_and_ids_are_global(pool, routed):
    router = pool[0]
    for seed in range(3):  # parents on both workers
        parent = routed.open(_ids(seed), max_new_tokens=NEW)
        parent.run_to(2)
        kids = parent.fork(2)
        assert {_worker_of(router, k) for k in kids} == {_worker_of(router, parent)}
        for k in kids:
            info = k.info()
            assert info["session"] == k.id and info["layer"] == 2 and info["state"] == "checkpoint"
    assert {router.routes[i["session"]].worker for i in routed.sessions()} == {0, 1}


def test_close_is_idempotent_and_a_closed_session_answers_as_on_a_server(routed):
    s = routed.open(_ids(3), max_new_tokens=NEW)
    s.run_to(1)
    s.close()
    s.close()
    with pytest.raises(CheckpointStateError, match=f"session {s.id} is closed"):
        s.info()
    assert s.id not in [i["session"] for i in routed.sessions()]


# -- concurrency -------------------------------------------------------------------------------------------------------
def test_a_request_to_one_worker_completes_while_the_other_is_still_computing(pool):
    router, workers, _ = pool
    with Client(router.address, timeout_s=30) as a, Client(router.address, timeout_s=30) as b:
        slow, opened_a = _open_on(router, a, 0, 20)
        fast, opened_b = _open_on(router, b, 1, 30)
        started, release = threading.Event(), threading.Event()
        finished, undo = _hold_op(workers[0], "run_to", started, release)
        got: dict[str, object] = {}
        t = threading.Thread(target=lambda: got.setdefault("slow", slow.run_to(LAYER)))
        t.start()
        try:
            assert started.wait(10), "the slow request never reached its worker"
            assert fast.run_to(LAYER).layer == LAYER  # worker 0 is still inside its run_to
            fast_first = not finished.is_set()
        finally:
            release.set()
            t.join(30)
            undo()
        assert fast_first, "the reply from worker 1 waited for worker 0's op"
        assert got["slow"].layer == LAYER
        for s in (*opened_a, *opened_b):
            s.close()


def test_many_clients_at_once_through_the_router_equal_a_single_server_bitwise(pool, direct):
    router, workers, _ = pool
    seeds = [100 + 10 * k for k in range(8)]
    before = [w.counters["requests"] for w in workers]
    got: dict[int, tuple[torch.Tensor, ...]] = {}
    errors: list[BaseException] = []

    def one(seed: int) -> None:
        try:
            with Client(router.address, timeout_s=60) as c:
                for _ in range(2):
                    got[seed] = _script(c, seed)
        except BaseException as e:  # reported below, with the other threads' results
            errors.append(e)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert all(w.counters["requests"] > b for w, b in zip(workers, before)), "one worker did all the work"
    for seed in seeds:
        ref = _script(direct, seed)
        assert len(got[seed]) == len(ref)
        for i, (x, y) in enumerate(zip(got[seed], ref)):
            assert x.dtype == y.dtype and torch.equal(x, y), f"seed {seed}: result {i} differs"


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_an_unknown_or_foreign_session_id_is_unknown_session(pool, routed):
    with pytest.raises(UnknownSession) as ei:
        RemoteSession(routed, 987654).run_to(1)
    assert isinstance(ei.value, RemoteError)
    mine = routed.open(_ids(4), max_new_tokens=NEW)
    with Client(pool[0].address, timeout_s=30) as other:
        with pytest.raises(UnknownSession):
            RemoteSession(other, mine.id).info()
        with pytest.raises(ProtocolError, match="unknown op"):
            other.call("no_such_op")


def test_a_wrong_token_is_refused_and_the_right_one_routes(pool):
    router = _router(pool[1], token="s3cret")
    try:
        with Client(router.address, timeout_s=30) as c:
            with pytest.raises(AuthenticationFailed):
                c.ping()
        with Client(router.address, token="wrong", timeout_s=30) as c:
            with pytest.raises(AuthenticationFailed):
                c.open(_ids(0))
        with Client(router.address, token="s3cret", timeout_s=30) as c:
            s = c.open(_ids(0), max_new_tokens=NEW)
            assert s.run_to(2).layer == 2
            s.close()
    finally:
        router.stop()


def test_an_oversized_or_garbled_header_is_a_protocol_error(pool):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool[0].address)
    try:
        for frames in ([b"{" * 20 + b"}" * 20], [b"x" * (100 << 10)], [b"\xff\xfe"]):
            sock.send_multipart(frames)
            assert sock.poll(10_000), "no reply"
            reply = decode(sock.recv_multipart(), max_bytes=1 << 20)
            assert reply.header["ok"] is False and reply.header["error"]["type"] == "ProtocolError"
        # a request still works after them
        sock.send_multipart(encode({"op": "ping", "client": "raw", "id": 7}))
        assert sock.poll(10_000)
        assert decode(sock.recv_multipart(), max_bytes=1 << 20).header["ok"] is True
    finally:
        sock.close()


def test_router_arguments_are_checked(pool):
    addr = pool[1][0].address
    for workers, match in (([], "non-empty"), ("tcp://127.0.0.1:1", "non-empty"), (["localhost:1"], "endpoint"),
                           ([addr, addr], "distinct")):
        with pytest.raises(ConfigError, match=match):
            Router(workers)
    with pytest.raises(ConfigError, match="worker_timeout_s"):
        Router([addr], worker_timeout_s=0)
    assert main(["route", "--worker", "not-an-endpoint", "--port", "0"]) == 2


# -- a lost worker -----------------------------------------------------------------------------------------------------
def test_a_lost_worker_takes_down_only_its_sessions(llama_tiny_fp32, pool):
    workers = [_server(llama_tiny_fp32), _server(llama_tiny_fp32)]
    router = _router(workers, worker_timeout_s=1.0)
    try:
        with Client(router.address, timeout_s=30) as c:
            sessions = [c.open(_ids(i), max_new_tokens=NEW) for i in range(4)]
            for s in sessions:
                s.run_to(LAYER)
            on = {w: [s for s in sessions if _worker_of(router, s) == w] for w in (0, 1)}
            assert on[0] and on[1]
            workers[0].stop()
            for s in on[0]:
                with pytest.raises(WorkerLost):
                    s.resume()
            with pytest.raises(WorkerLost):
                on[0][0].info()
            with Client(pool[2].address, timeout_s=30) as ref:  # the survivors answer as a single server does
                for s in on[1]:
                    r = ref.open(_ids(sessions.index(s)), max_new_tokens=NEW)
                    r.run_to(LAYER)
                    assert torch.equal(s.resume(), r.resume())
                    r.close()
            fresh = [c.open(_ids(10 + i), max_new_tokens=NEW) for i in range(2)]
            assert {_worker_of(router, s) for s in fresh} == {1}
            assert fresh[0].run_to(2).layer == 2
            st = c.stats()
            assert st["live_workers"] == 1 and st["workers"][0]["lost"] and st["workers"][1]["lost"] is None
            workers[1].stop()
            with pytest.raises(WorkerLost):
                fresh[1].run_to(1)
            with pytest.raises(ServerUnavailable, match="no live worker"):
                c.open(_ids(0))
    finally:
        router.stop()
        for w in workers:
            w.stop()


def test_a_worker_process_killed_outright_is_lost_and_the_other_keeps_serving(llama_tiny_fp32):
    proc = ServerProcess(["--model", "llama-tiny", "--device", "cpu", "--dtype", "float32", "--slab-bytes", "32MiB",
                          "--stats-interval-s", "0"],  # the slab of the thread worker: placement alternates
                         start_timeout_s=120, stop_timeout_s=10)
    thread_worker = _server(llama_tiny_fp32)
    router = Router([proc.address, thread_worker.address], ServerConfig(port=0, tick_s=0.02), worker_timeout_s=1.0)
    router.start()
    try:
        with Client(router.address, timeout_s=30) as c:
            a, b = (c.open(_ids(i), max_new_tokens=NEW) for i in range(2))
            by_worker = {_worker_of(router, a): a, _worker_of(router, b): b}
            assert set(by_worker) == {0, 1}
            by_worker[0].run_to(2)
            proc.proc.kill()  # SIGKILL: no drain, no goodbye
            proc.proc.wait(10)
            with pytest.raises(WorkerLost, match="stopped answering"):
                by_worker[0].resume()
            assert by_worker[1].run_to(2).layer == 2
            with pytest.raises(CheckpointStateError, match=f"session {by_worker[1].id} is checkpoint"):
                by_worker[1].generate(2)  # the worker's message names the global id
            assert by_worker[1].resume(logits="last").shape == (1, 512)
            assert by_worker[1].generate(2).shape == (1, 2)
            assert _worker_of(router, c.open(_ids(5), max_new_tokens=NEW)) == 1
    finally:
        router.stop()
        thread_worker.stop()
        proc.stop()


def test_requests_outstanding_on_a_worker_that_stops_answering_get_worker_lost(llama_tiny_fp32):
    workers = [_server(llama_tiny_fp32), _server(llama_tiny_fp32)]
    router = _router(workers, worker_timeout_s=2.0)
    started, release = threading.Event(), threading.Event()
    try:
        with (Client(router.address, timeout_s=30) as a, Client(router.address, timeout_s=30) as b,
              Client(router.address, timeout_s=30) as c):
            sa, _ = _open_on(router, a, 0, 40)
            sb, _ = _open_on(router, b, 0, 50)
            sc, _ = _open_on(router, c, 1, 60)
            _hold_op(workers[0], "run_to", started, release)  # worker 0 hangs in its next run_to
            errors: dict[str, BaseException] = {}

            def call(name: str, s: RemoteSession) -> None:
                try:
                    s.run_to(LAYER)
                except BaseException as e:
                    errors[name] = e

            threads = [threading.Thread(target=call, args=("a", sa)), threading.Thread(target=call, args=("b", sb))]
            threads[0].start()
            assert started.wait(10)
            threads[1].start()
            deadline = time.monotonic() + 10
            while len(router.workers[0].outstanding) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(router.workers[0].outstanding) == 2, "both requests should wait on worker 0"
            assert sc.run_to(LAYER).layer == LAYER  # worker 1 answers meanwhile
            assert all(t.is_alive() for t in threads) and router.workers[0].lost is None
            for t in threads:
                t.join(30)
            for name in ("a", "b"):
                assert isinstance(errors.get(name), WorkerLost), errors
                assert "stopped answering" in str(errors[name])
            with pytest.raises(WorkerLost, match="which is lost"):
                sa.info()
            assert sc.resume(logits="last").shape == (1, 512)
            assert _worker_of(router, c.open(_ids(70), max_new_tokens=NEW)) == 1
    finally:
        release.set()
        router.stop()
        for w in workers:
            w.stop()
