"""local_channel.py: messages round-trip both ways, what does not fit is refused whole, a request goes into the slot
only while the server says it polls it, stale and corrupt slots are handled, names and sizes are checked, and the file
is private and removable."""

from __future__ import annotations

import os
import stat
import struct
import time

import pytest
import torch

from djinn_core.rpc import local_channel
from djinn_core.errors import ConfigError, ProtocolError
from djinn_core.rpc.local_channel import MAX_FRAMES, ClientChannel, ServerChannel
from djinn_core.rpc.wire import decode, encode

pytestmark = [pytest.mark.cpu,
              pytest.mark.skipif(not local_channel.supported(), reason="shared-memory channels need Linux on x86-64")]


@pytest.fixture
def pair():
    server = ServerChannel(1 << 16, (b"route",))
    client = ClientChannel(server.name, server.capacity)
    yield server, client
    client.close()
    server.close()


def _polling(server: ServerChannel, seconds: float = 10.0) -> None:
    server.publish_polling(time.monotonic() + seconds)


def test_replies_round_trip_and_only_the_awaited_id_is_ready(pair):
    server, client = pair
    t = torch.arange(100, dtype=torch.float16).view(4, 25)
    frames = encode({"id": 7, "ok": True, "result": {"x": 1}}, [t])
    assert not client.reply_ready(7)
    assert server.write_reply(7, frames)
    assert client.reply_ready(7) and not client.reply_ready(8)
    msg = decode(client.read_reply(), max_bytes=1 << 20)
    assert msg.header["result"] == {"x": 1} and torch.equal(msg.tensors[0], t)
    assert server.write_reply(8, encode({"id": 8, "ok": True}))
    assert client.reply_ready(8) and decode(client.read_reply(), max_bytes=1 << 20).header["id"] == 8
    assert server.writes == 2


def test_requests_go_into_the_slot_only_while_the_server_polls_it(pair):
    server, client = pair
    frames = encode({"id": 1, "op": "ping"})
    assert not client.server_polling()  # nothing published yet
    assert not client.send_request(1, frames) and server.take_request() is None
    server.publish_polling(time.monotonic() + client.margin_s / 2)  # inside the margin: not to be relied on
    assert not client.send_request(1, frames) and server.take_request() is None
    _polling(server)
    assert client.send_request(1, frames)
    seq, got = server.take_request()
    header = decode(got, max_bytes=1 << 20).header
    assert seq == 1 and header["id"] == 1 and header["op"] == "ping"
    assert server.take_request() is None  # taken once
    assert server.reads == 1 and server.last_request == 1


def test_a_slot_older_than_the_last_request_handled_is_ignored(pair):
    server, client = pair
    _polling(server)
    assert client.send_request(5, [b"five"])
    server.handled(6)  # request 6 came over ZeroMQ: the slot's 5 is history
    assert server.take_request() is None
    server.handled(True)  # not an id: ignored
    server.handled("7")
    assert server.last_request == 6
    assert client.send_request(7, [b"seven"])
    assert server.take_request() == (7, [bytearray(b"seven")])


def test_messages_that_do_not_fit_are_refused_whole(pair):
    server, client = pair
    _polling(server)
    assert server.write_reply(1, [b"small"])
    big = [bytes(server.capacity)]
    assert not server.fits(big) and not server.write_reply(2, big)
    assert client.reply_ready(1) and client.read_reply() == [b"small"]
    assert not client.send_request(3, big) and server.take_request() is None
    too_many = [b"x"] * (MAX_FRAMES + 1)
    assert not server.write_reply(4, too_many) and not client.send_request(4, too_many)


def test_a_corrupt_request_slot_raises_once_and_is_consumed(pair):
    server, client = pair
    _polling(server)
    assert client.send_request(3, [b"ok"])
    m = client._map
    base = local_channel._CONTROL + client.capacity
    struct.pack_into("<I", m, base + 8, MAX_FRAMES + 1)  # a frame count beyond the limit
    with pytest.raises(ProtocolError, match="frames"):
        server.take_request()
    assert server.take_request() is None and server.last_request == 3
    assert client.send_request(4, [b"ok"])
    struct.pack_into("<Q", m, base + local_channel._HEAD, client.capacity)  # a frame length beyond the slot
    with pytest.raises(ProtocolError, match="capacity"):
        server.take_request()


def test_close_tells_the_client_at_once(pair):
    server, client = pair
    _polling(server)
    assert client.server_polling() and not client.closed
    server.close()
    server.close()  # idempotent
    assert client.closed and not client.server_polling() and not client.send_request(1, [b"x"])
    assert not server.write_reply(1, [b"x"]) and server.take_request() is None


def test_the_file_is_private_and_unlink_leaves_the_mapping_working(pair):
    server, client = pair
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert os.stat(server.path).st_size == local_channel.file_bytes(server.capacity)
    server.unlink()
    server.unlink()
    assert not os.path.exists(server.path)
    assert server.write_reply(3, [b"after unlink"]) and client.reply_ready(3)
    assert client.read_reply() == [b"after unlink"]
    with pytest.raises(FileNotFoundError):
        ClientChannel(server.name, server.capacity)


def test_decode_adopts_bytearray_frames(pair):
    server, client = pair
    t = torch.arange(12, dtype=torch.int64)
    assert server.write_reply(1, encode({"id": 1}, [t]))
    frames = client.read_reply()
    assert all(isinstance(f, bytearray) for f in frames)
    msg = decode(frames, max_bytes=1 << 20)
    msg.tensors[0][0] = 99  # writable, and backed by the frame handed over (no second copy)
    assert torch.frombuffer(frames[1], dtype=torch.int64)[0] == 99


@pytest.mark.parametrize("name", ["../etc/passwd", "other-name", "djinn-chan-x/../../y", 5])
def test_clients_refuse_names_that_are_not_channels(name):
    with pytest.raises((ProtocolError, FileNotFoundError)):
        ClientChannel(name, 4096)


def test_bad_sizes_are_refused(pair):
    server, _ = pair
    with pytest.raises(ConfigError):
        ServerChannel(100, (b"r",))
    with pytest.raises(ProtocolError):
        ClientChannel(server.name, server.capacity * 2)  # larger than the file
    with pytest.raises(ProtocolError):
        ClientChannel(server.name, True)


class _CountingZmq:
    """A stand-in for the ZeroMQ transport below the channels: counts the loop's looks at the socket."""

    def __init__(self):
        self.looks = 0

    def serve(self, handle, wait_ms, spinning=False, stop=None) -> bool:
        self.looks += 1
        return False


def test_spinning_on_hot_channels_looks_at_the_zeromq_socket_only_every_nth_time():
    """While a channel is hot the loop reads its slot every spin (memory) and polls the ZeroMQ socket (a system
    call) every ``zmq_every``-th spin; with no hot channel, or not spinning, it polls the socket every time."""
    import threading

    from djinn_core.rpc.shm_transport import ZMQ_EVERY, ShmServerTransport

    inner = _CountingZmq()
    t = ShmServerTransport(inner, channel_bytes=0, max_channels=1, busy_poll_s=0.2, stop=threading.Event())
    assert t.zmq_every == ZMQ_EVERY == 8
    for _ in range(40):
        t.serve(lambda *a: None, 0, True)
    assert inner.looks == 40  # spinning without a hot channel: every time
    t._hot = [object.__new__(ServerChannel)]
    t._take = staticmethod(lambda channels, handle: False)  # the hot slot is empty
    inner.looks = 0
    for _ in range(40):
        t.serve(lambda *a: None, 0, True)
    assert inner.looks == 40 // ZMQ_EVERY
    with pytest.raises(ConfigError, match="zmq_every"):
        ShmServerTransport(inner, channel_bytes=0, max_channels=1, busy_poll_s=0.2, stop=threading.Event(),
                           zmq_every=0)


def test_a_reply_may_come_header_first_and_its_tensor_frames_after(pair):
    server, client = pair
    t = torch.arange(200, dtype=torch.float16).view(8, 25)
    head, body = encode({"id": 9, "ok": True, "result": {}}, [t])
    assert server.write_reply_head(9, head, [len(body)])
    assert client.reply_ready(9) and client.reply_done(9) == 0  # the header is there, the tensor is not
    assert client.read_reply(0, 1) == [bytearray(head)]
    assert client.reply_t_done() == 0.0
    server.complete_reply(9, [body], 123.5)
    assert client.reply_done(9) == 1 and client.reply_t_done() == 123.5
    assert client.read_reply(1) == [bytearray(body)]
    msg = decode(client.read_reply(), max_bytes=1 << 20)
    assert torch.equal(msg.tensors[0], t)
    # the next reply, stored at once, is done as soon as it is there; an older id is not the awaited one
    server.write_reply(10, [b"x"])
    assert client.reply_ready(10) and client.reply_done(10) == 1 and not client.reply_ready(9)


def test_a_header_first_reply_whose_tensors_fail_says_so_and_lengths_are_kept(pair):
    server, client = pair
    assert server.write_reply_head(4, b"{}", [16, 8])
    with pytest.raises(ProtocolError, match="lengths"):
        server.complete_reply(4, [b"x" * 16], 1.0)  # one frame short
    with pytest.raises(ProtocolError, match="lengths"):
        server.complete_reply(4, [b"x" * 16, b"y" * 9], 1.0)  # a frame longer than announced
    assert client.reply_done(4) == 0
    server.fail_reply(3)  # not the reply held: nothing changes
    assert client.reply_done(4) == 0
    server.fail_reply(4)
    assert client.reply_ready(4) and client.reply_done(4) == -1


def test_a_header_first_reply_that_would_not_fit_is_refused_whole(pair):
    server, client = pair
    assert not server.write_reply_head(5, b"{}", [server.capacity])
    assert not server.write_reply_head(5, b"{}", [1] * MAX_FRAMES)  # one frame too many with the header
    assert not client.reply_ready(5)
    server.close()
    assert not server.write_reply_head(6, b"{}", [1]) and not server.complete_reply(6, [b"x"], 0.0)
    assert client.closed  # what a client waiting for the tensor frames checks as it spins


def _pin_as_tensor(calls: list):
    """A pin function as the server's on a CPU: a uint8 tensor over the mapping (the GPU's also page-locks it)."""
    def pin(view):
        calls.append("pin")
        return torch.frombuffer(view, dtype=torch.uint8), lambda: calls.append("unpin")
    return pin


def test_a_header_first_reply_may_be_written_in_place_and_read_into_buffers_made_before(pair):
    server, client = pair
    calls: list[str] = []
    t = torch.arange(200, dtype=torch.float16).view(8, 25)
    u = torch.arange(3, dtype=torch.int64)
    head, body, body2 = encode({"id": 9, "ok": True, "result": {}}, [t, u])
    assert server.write_reply_head(9, head, [len(body), len(body2)])
    offs, end = server.reply_tail_offsets(9)
    assert end == offs[1] + len(body2)
    region = server.pinned(_pin_as_tensor(calls), end)
    assert region.numel() == local_channel.file_bytes(server.capacity)  # 64 KiB slots: less than MIN_PINNED
    assert server.pinned(_pin_as_tensor(calls), end) is region and calls == ["pin"]  # once while it reaches
    region[offs[0]:offs[0] + len(body)] = torch.frombuffer(bytearray(body), dtype=torch.uint8)  # as a device copies
    region[offs[1]:offs[1] + len(body2)] = torch.frombuffer(bytearray(body2), dtype=torch.uint8)
    assert client.reply_done(9) == 0  # there, but not yet marked so
    lens = client.reply_lens()
    bufs = [bytearray(n) for n in lens[1:]]
    msg = decode([client.read_reply(0, 1)[0], *bufs], max_bytes=1 << 20)  # built before the frames are marked there
    server.complete_reply(9, None, 7.5)
    assert client.reply_done(9) == 1 and client.reply_t_done() == 7.5
    client.read_reply_into(1, bufs)
    assert torch.equal(msg.tensors[0], t) and torch.equal(msg.tensors[1], u)
    with pytest.raises(ProtocolError, match="buffers"):
        client.read_reply_into(1, [bytearray(lens[1])])  # one buffer short
    with pytest.raises(ProtocolError, match="buffers"):
        client.read_reply_into(1, [bytearray(lens[1] + 1), bytearray(lens[2])])
    with pytest.raises(ProtocolError, match="holds message 9"):
        server.reply_tail_offsets(8)
    with pytest.raises(ProtocolError, match="holds message 9"):
        server.complete_reply(8, None, 1.0)
    mapping = server._map
    del region
    server.close()
    assert calls == ["pin", "unpin"] and mapping.closed  # the pinned views went first, then the mapping


def test_a_channel_whose_pinned_view_is_still_held_closes_all_the_same(pair):
    server, client = pair
    calls: list[str] = []

    def pin(view):  # a pin that hands out a view of the mapping (a torch tensor over it holds none)
        calls.append("pin")
        return view[:64], lambda: calls.append("unpin")
    held = server.pinned(pin, 64)
    mapping = server._map
    server.close()  # the view is still held here: no error, the name is gone, the client sees the channel closed
    assert calls == ["pin", "unpin"] and not server.open and client.closed
    assert not mapping.closed  # it goes with the last view
    held.release()


def test_a_channel_that_cannot_be_pinned_says_so_once(pair):
    server, _ = pair
    tries = []

    def refuse(view):
        tries.append(view.nbytes)
        return None
    assert server.pinned(refuse, 64) is None and server.pinned(refuse, 64) is None and len(tries) == 1
    mapping = server._map
    server.close()
    assert mapping.closed


def test_a_large_channel_is_pinned_only_as_far_as_replies_reach_and_again_when_they_reach_further():
    server = ServerChannel(8 << 20, (b"route",))  # 16 MiB of slots: pinning touches every page pinned
    calls: list = []

    def pin(view):
        calls.append(("pin", view.nbytes))
        return torch.frombuffer(view, dtype=torch.uint8), lambda: calls.append(("unpin", view.nbytes))
    try:
        assert server.pinned(pin, 70_000).numel() == local_channel.MIN_PINNED
        assert server.pinned(pin, local_channel.MIN_PINNED).numel() == local_channel.MIN_PINNED  # still within
        assert server.pinned(pin, 3 << 20).numel() == 4 << 20  # further: unpinned, pinned again larger
        assert server.pinned(pin, local_channel.file_bytes(8 << 20)).numel() == local_channel.file_bytes(8 << 20)
        with pytest.raises(ProtocolError, match="asked pinned"):
            server.pinned(pin, local_channel.file_bytes(8 << 20) + 1)
        assert calls == [("pin", 1 << 20), ("unpin", 1 << 20), ("pin", 4 << 20), ("unpin", 4 << 20),
                         ("pin", local_channel.file_bytes(8 << 20))]
    finally:
        server.close()
    assert calls[-1] == ("unpin", local_channel.file_bytes(8 << 20))
