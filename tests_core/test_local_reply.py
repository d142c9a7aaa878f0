"""local_reply.py: a channel's frames round-trip, what does not fit is refused whole, names and sizes are checked,
and the file is private and removable."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from djinn_core import local_reply
from djinn_core.errors import ConfigError, ProtocolError
from djinn_core.local_reply import ReplyChannel, ReplyReader
from djinn_core.wire import decode, encode

pytestmark = [pytest.mark.cpu,
              pytest.mark.skipif(not local_reply.supported(), reason="shared-memory replies need Linux on x86-64")]


@pytest.fixture
def channel():
    ch = ReplyChannel(1 << 16, b"route")
    yield ch
    ch.close()


def test_frames_round_trip_and_only_the_awaited_id_is_ready(channel):
    reader = ReplyReader(channel.name, channel.capacity)
    try:
        t = torch.arange(100, dtype=torch.float16).view(4, 25)
        frames = encode({"id": 7, "ok": True, "result": {"x": 1}}, [t])
        assert not reader.ready(7)
        assert channel.write(7, frames)
        assert reader.ready(7) and not reader.ready(8)
        msg = decode(reader.read(), max_bytes=1 << 20)
        assert msg.header["result"] == {"x": 1} and torch.equal(msg.tensors[0], t)
        assert channel.write(8, encode({"id": 8, "ok": True}))
        assert reader.ready(8) and decode(reader.read(), max_bytes=1 << 20).header["id"] == 8
    finally:
        reader.close()


def test_a_reply_that_does_not_fit_is_refused_and_nothing_changes(channel):
    reader = ReplyReader(channel.name, channel.capacity)
    try:
        assert channel.write(1, [b"small"])
        big = [bytes(channel.capacity)]
        assert not channel.fits(big) and not channel.write(2, big)
        assert reader.ready(1) and reader.read() == [b"small"]
    finally:
        reader.close()


def test_the_file_is_private_and_unlink_leaves_the_mapping_working(channel):
    mode = os.stat(channel.path).st_mode
    assert stat.S_IMODE(mode) == 0o600
    reader = ReplyReader(channel.name, channel.capacity)
    channel.unlink()
    channel.unlink()
    assert not os.path.exists(channel.path)
    assert channel.write(3, [b"after unlink"]) and reader.ready(3) and reader.read() == [b"after unlink"]
    reader.close()
    with pytest.raises(FileNotFoundError):
        ReplyReader(channel.name, channel.capacity)


@pytest.mark.parametrize("name", ["../etc/passwd", "other-name", "djinn-reply-x/../../y", 5])
def test_readers_refuse_names_that_are_not_channels(name):
    with pytest.raises((ProtocolError, FileNotFoundError)):
        ReplyReader(name, 4096)


def test_bad_sizes_are_refused(channel):
    with pytest.raises(ConfigError):
        ReplyChannel(100, b"r")
    with pytest.raises(ProtocolError):
        ReplyReader(channel.name, channel.capacity * 2)  # larger than the file
    with pytest.raises(ProtocolError):
        ReplyReader(channel.name, True)
