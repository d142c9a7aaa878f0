"""Shared-memory channels for an RPC client on the server's host: requests and replies with no socket in between.

Over TCP a message crosses two ZeroMQ I/O threads, the sender's and the receiver's, which sleep while nothing moves;
waking them costs tenths of a millisecond (``docs/notes/rpc.md``). A client on the same host that spins for
its reply anyway (``busy_poll_s``) can instead exchange both messages through pages both processes map: it writes the
request where the server's spinning loop looks, and the server's compute thread writes the reply where the client's
spinning thread looks. Every message that does not fit, and every request the server might not be spinning for, goes
over ZeroMQ as before (:mod:`djinn_core.rpc.shm_transport` decides which way each message goes; this module is the
mechanism: the file, its slots and their ordering).

A :class:`ServerChannel` is created by the server, one per client connection that asks (op ``attach_local``): a file
in ``/dev/shm`` (mode 0600: only the server's user can map it) that the server unlinks once the client has mapped it,
so nothing is left behind if either side dies. The client maps it too (:class:`ClientChannel`). The server reads
requests from a channel only as coming from the connection the channel was made for, validates them exactly as
ZeroMQ frames (:func:`djinn_core.rpc.wire.decode`, with its size limits and the auth token), and writes replies into it
only for that connection.

Layout: a control block, then the reply slot, then the request slot, each slot ``capacity`` bytes. Control:
``polling_until`` (f64: the host monotonic time up to which the server's loop keeps checking this channel's request
slot without sleeping, published with each reply; 0 once the server gave the channel up) and ``closed`` (u32).
A slot: ``seq`` (u64, the request id of the message held), ``count`` (u32, frames), ``count`` frame lengths (u64),
then the frames back to back. A writer stores the frames, then ``seq`` last; a reader that sees a new ``seq`` copies
the frames out.

Why a message is never overwritten while read: request ids of one client only grow, the client sends its next request
only after reading the reply to the last, and the server handles one request at a time.

Why a request in the slot is never stranded: the client puts a request there only while its clock is at least
``margin_s`` before ``polling_until`` (otherwise it sends it over ZeroMQ, which wakes the server). Until
``polling_until`` the server checks the slot between requests. Once it gives up spinning it checks every slot
one last time, and again at every idle tick.

The ordering relies on x86-64's store order (stores become visible in program order); :func:`supported` says no
elsewhere, and those clients use ZeroMQ.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import struct
import sys
import time
from typing import Any, Sequence

from djinn_core.errors import ConfigError, ProtocolError
from djinn_core.validation import check_int, is_int

_POLLING = struct.Struct("<d")
_CLOSED = struct.Struct("<I")
_CONTROL = 64  # bytes before the reply slot: polling_until at 0, closed at 8
_SEQ = struct.Struct("<Q")
_COUNT = struct.Struct("<I")
_LEN = struct.Struct("<Q")
_HEAD = _SEQ.size + _COUNT.size
MAX_FRAMES = 64
MIN_CAPACITY = 4096
SHM_DIR = "/dev/shm"
NAME_PREFIX = "djinn-chan-"
DEFAULT_MARGIN_S = 0.005


def supported() -> bool:
    """Shared-memory channels work here: Linux on x86-64 (store order) with ``/dev/shm``."""
    return (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
            and os.path.isdir(SHM_DIR))


def file_bytes(capacity: int) -> int:
    """Size of a channel's file for slots of ``capacity`` bytes."""
    return _CONTROL + 2 * capacity


def _nbytes(frame: Any) -> int:
    return memoryview(frame).nbytes


class _Slot:
    """One direction of a channel: ``capacity`` bytes at ``offset`` of a mapping (layout in the module docstring)."""

    def __init__(self, mapping: mmap.mmap, offset: int, capacity: int):
        self._m = mapping
        self._off = offset
        self.capacity = capacity

    def fits(self, frames: Sequence[Any]) -> bool:
        return (len(frames) <= MAX_FRAMES
                and _HEAD + _LEN.size * len(frames) + sum(_nbytes(f) for f in frames) <= self.capacity)

    def write(self, seq: int, frames: Sequence[Any]) -> bool:
        """Store ``frames`` as message ``seq``; False (nothing written) when they do not fit."""
        if not self.fits(frames):
            return False
        m, base = self._m, self._off
        off = base + _HEAD
        for f in frames:
            _LEN.pack_into(m, off, _nbytes(f))
            off += _LEN.size
        for f in frames:
            n = _nbytes(f)
            m[off:off + n] = f
            off += n
        _COUNT.pack_into(m, base + _SEQ.size, len(frames))
        _SEQ.pack_into(m, base, seq)  # last: a reader polling seq sees complete frames
        return True

    def seq(self) -> int:
        return _SEQ.unpack_from(self._m, self._off)[0]

    def read(self) -> list[bytearray]:
        """The frames held, copied into memory the caller owns (checked against the slot's bounds only: the
        message itself is validated by :func:`djinn_core.rpc.wire.decode`)."""
        m, base = self._m, self._off
        count = _COUNT.unpack_from(m, base + _SEQ.size)[0]
        if count > MAX_FRAMES:
            raise ProtocolError(f"channel slot holds {count} frames (at most {MAX_FRAMES})")
        off = base + _HEAD
        lens = []
        for _ in range(count):
            lens.append(_LEN.unpack_from(m, off)[0])
            off += _LEN.size
        if off - base + sum(lens) > self.capacity:
            raise ProtocolError("channel slot frame lengths exceed its capacity")
        frames = []
        with memoryview(m) as view:
            for n in lens:
                buf = bytearray(n)
                buf[:] = view[off:off + n]
                frames.append(buf)
                off += n
        return frames


class ServerChannel:
    """The server's side of one client connection's channel (see the module docstring)."""

    def __init__(self, capacity: int, route: Any):
        check_int("capacity", capacity, MIN_CAPACITY)
        if not supported():
            raise ConfigError("shared-memory channels need Linux on x86-64 with /dev/shm")
        self.capacity = capacity
        self.route = route  # the ZeroMQ routing frames of the connection it serves
        self.name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        self.path = os.path.join(SHM_DIR, self.name)
        size = file_bytes(capacity)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self._linked = True
        self._replies = _Slot(self._map, _CONTROL, capacity)
        self._requests = _Slot(self._map, _CONTROL + capacity, capacity)
        self.last_request = 0  # the highest request id of this connection handled, whichever way it came
        self.last_used = time.monotonic()  # when a request of its connection last came (the idle sweep reads it)
        self.polling_until = 0.0  # the last polling time published: until then the client may use the slot
        self.writes = 0  # replies written
        self.reads = 0  # requests taken

    @property
    def open(self) -> bool:
        return self._map is not None

    def fits(self, frames: Sequence[Any]) -> bool:
        return self._map is not None and self._replies.fits(frames)

    def publish_polling(self, until: float) -> None:
        """Tell the client the server checks the request slot without sleeping until ``until`` (host monotonic)."""
        self.polling_until = until
        if self._map is not None:
            _POLLING.pack_into(self._map, 0, until)

    def write_reply(self, seq: int, frames: Sequence[Any]) -> bool:
        """Store ``frames`` as the reply to request ``seq``; False (nothing written) when they do not fit."""
        if self._map is None or not self._replies.write(seq, frames):
            return False
        self.writes += 1
        return True

    def take_request(self) -> tuple[int, list[bytearray]] | None:
        """The request waiting in the slot, if one newer than the last handled came: (id, frames). A slot whose
        frames cannot be read is consumed and raises :class:`ProtocolError` (its id is then ``last_request``)."""
        if self._map is None:
            return None
        seq = self._requests.seq()
        if seq <= self.last_request:
            return None
        self.last_request = seq
        self.reads += 1
        return seq, self._requests.read()

    def request_waiting(self) -> bool:
        """A request newer than the last handled is in the slot (not read yet)."""
        return self._map is not None and self._requests.seq() > self.last_request

    def handled(self, request_id: Any) -> None:
        """Note a request of this connection that came over ZeroMQ, so the slot's older content stays ignored."""
        if is_int(request_id) and request_id > self.last_request:
            self.last_request = request_id

    def unlink(self) -> None:
        """Remove the name (the mapping stays valid in both processes). Idempotent."""
        if self._linked:
            self._linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Mark the channel given up (a client waiting on it sees that at once), unmap it and remove its name."""
        self.unlink()
        if self._map is not None:
            _POLLING.pack_into(self._map, 0, 0.0)
            _CLOSED.pack_into(self._map, _POLLING.size, 1)
            self._map.close()
            self._map = None


class ClientChannel:
    """The client's side: maps a server's channel, writes requests into it while the server polls it, and polls it
    for replies."""

    def __init__(self, name: str, capacity: int, *, margin_s: float = DEFAULT_MARGIN_S):
        if not isinstance(name, str) or not name.startswith(NAME_PREFIX) or "/" in name:
            raise ProtocolError(f"bad channel name {name!r}")
        check_int("channel capacity", capacity, MIN_CAPACITY, error=ProtocolError)
        size = file_bytes(capacity)
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            if os.fstat(fd).st_size < size:
                raise ProtocolError(f"channel {name} is smaller than {size} bytes")
            self._map: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.name = name
        self.capacity = capacity
        self.margin_s = margin_s
        self._replies = _Slot(self._map, _CONTROL, capacity)
        self._requests = _Slot(self._map, _CONTROL + capacity, capacity)

    @property
    def closed(self) -> bool:
        """The server gave the channel up (stopped, or freed it): nothing more will come through it."""
        return self._map is None or _CLOSED.unpack_from(self._map, _POLLING.size)[0] != 0

    def server_polling(self) -> bool:
        """The server will look at the request slot within its spinning window (with ``margin_s`` to spare)."""
        if self._map is None:
            return False
        return time.monotonic() + self.margin_s < _POLLING.unpack_from(self._map, 0)[0] and not self.closed

    def send_request(self, seq: int, frames: Sequence[Any]) -> bool:
        """Put request ``seq`` in the slot if the server polls it and the frames fit; False: send it over ZeroMQ."""
        return self.server_polling() and self._requests.write(seq, frames)

    def reply_ready(self, seq: int) -> bool:
        return self._map is not None and self._replies.seq() == seq

    def read_reply(self) -> list[bytearray]:
        """The frames of the reply held (call after :meth:`reply_ready`), copied out."""
        return self._replies.read()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
