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
A slot: ``seq`` (u64, the request id of the message held), ``count`` (u32, frames), ``done`` (u64 at 16: the id
whose frames are all there, :data:`FAILED` for one that will not be), ``t_done`` (f64 at 24: the writer's host clock
when they were), ``count`` frame lengths (u64) from 32, then the frames back to back. A writer stores the frames,
then ``done``, then ``seq`` last; a reader that sees a new ``seq`` copies the frames out.

A reply may also come header first (:meth:`ServerChannel.write_reply_head`): the server stores every frame length and
frame 0 (the header, which describes the tensors), ``done`` = 0, then ``seq``, as soon as its op has queued its device
work; once the tensors' bytes are on the host it stores them in their places (or a device copied them there itself:
:meth:`ServerChannel.pinned`, :meth:`ServerChannel.reply_tail_offsets`), ``t_done``, then ``done`` = ``seq``
(:meth:`ServerChannel.complete_reply`). The client reads and checks the header while the device works, so what is
left after the wait is marking the reply done on one side and copying the tensor bytes out on the other (after a long
wait, host code runs several times slower: ``docs/notes/rpc.md``).

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

import logging
import mmap
import os
import platform
import secrets
import struct
import sys
import time
from typing import Any, Callable, Sequence

from djinn_core.errors import ConfigError, ProtocolError
from djinn_core.validation import check_int, is_int

log = logging.getLogger(__name__)

_POLLING = struct.Struct("<d")
_CLOSED = struct.Struct("<I")
_CONTROL = 64  # bytes before the reply slot: polling_until at 0, closed at 8
_SEQ = struct.Struct("<Q")
_COUNT = struct.Struct("<I")
_DONE = struct.Struct("<Q")
_T_DONE = struct.Struct("<d")
_LEN = struct.Struct("<Q")
_COUNT_AT, _DONE_AT, _T_DONE_AT = 8, 16, 24
_HEAD = 32  # seq, count (and 4 bytes unused), done, t_done; the frame lengths follow
LAYOUT = 2  # the slots' layout (2: with done and t_done, for header-first replies); both sides must agree
FAILED = (1 << 64) - 1  # ``done`` of a reply whose header came first and whose tensors will not: see the ZeroMQ socket
MAX_FRAMES = 64
MIN_CAPACITY = 4096
SHM_DIR = "/dev/shm"
NAME_PREFIX = "djinn-chan-"
DEFAULT_MARGIN_S = 0.005
MIN_PINNED = 1 << 20  # the least of a channel's mapping pinned for replies written in place (ServerChannel.pinned)


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
        return self._room([_nbytes(f) for f in frames])

    def _room(self, lens: Sequence[int]) -> bool:
        """Frames of lengths ``lens`` fit the slot, with their header."""
        return len(lens) <= MAX_FRAMES and _HEAD + _LEN.size * len(lens) + sum(lens) <= self.capacity

    def _store(self, seq: int, frames: Sequence[Any], lens: Sequence[int], done: int, t_done: float = 0.0) -> None:
        """Frame lengths ``lens``, the first ``len(frames)`` frames, ``done`` and ``t_done``, then ``seq``."""
        m, base = self._m, self._off
        off = base + _HEAD
        for n in lens:
            _LEN.pack_into(m, off, n)
            off += _LEN.size
        for f, n in zip(frames, lens):
            m[off:off + n] = f
            off += n
        _COUNT.pack_into(m, base + _COUNT_AT, len(lens))
        _T_DONE.pack_into(m, base + _T_DONE_AT, t_done)
        _DONE.pack_into(m, base + _DONE_AT, done)
        _SEQ.pack_into(m, base, seq)  # last: a reader polling seq sees what was stored

    def write(self, seq: int, frames: Sequence[Any]) -> bool:
        """Store ``frames`` as message ``seq``, all there; False (nothing written) when they do not fit."""
        lens = [_nbytes(f) for f in frames]
        if not self._room(lens):
            return False
        self._store(seq, frames, lens, seq)
        return True

    def write_head(self, seq: int, head: Any, tail_lens: Sequence[int]) -> bool:
        """Store message ``seq``'s frame 0 and the lengths of the frames to come (:meth:`complete`), ``done`` = 0;
        False (nothing written) when they would not fit."""
        lens = [_nbytes(head), *tail_lens]
        if not self._room(lens):
            return False
        self._store(seq, [head], lens, 0)
        return True

    def complete(self, seq: int, tail: Sequence[Any] | None, t_done: float) -> None:
        """Store the frames after frame 0 of message ``seq`` (whose head :meth:`write_head` stored), ``t_done``,
        then ``done`` = ``seq``. The frames must have the lengths announced; ``tail`` None: they are in their places
        already (written there at :meth:`tail_offsets` by a device's copy that has completed)."""
        m, base = self._m, self._off
        if tail is None:
            self._check_holds(seq)
        else:
            lens = self.lens()
            if (self.seq() != seq or len(lens) != 1 + len(tail)
                    or any(_nbytes(f) != n for f, n in zip(tail, lens[1:]))):
                raise ProtocolError(f"message {seq}'s frames differ from the lengths its head announced")
            off = self._frame_at(lens, 1)
            for f, n in zip(tail, lens[1:]):
                m[off:off + n] = f
                off += n
        _T_DONE.pack_into(m, base + _T_DONE_AT, t_done)
        _DONE.pack_into(m, base + _DONE_AT, seq)  # last: a reader polling done sees every frame

    def tail_offsets(self, seq: int) -> tuple[list[int], int]:
        """Where the frames after frame 0 of message ``seq`` (whose head :meth:`write_head` stored) go: their offsets
        in the mapping, in order, and where the last ends."""
        self._check_holds(seq)
        lens = self.lens()
        offs, off = [], self._frame_at(lens, 1)
        for n in lens[1:]:
            offs.append(off)
            off += n
        return offs, off

    def fail(self, seq: int) -> None:
        """Message ``seq``'s frames after frame 0 will not come."""
        if self.seq() == seq:
            _DONE.pack_into(self._m, self._off + _DONE_AT, FAILED)

    def seq(self) -> int:
        return _SEQ.unpack_from(self._m, self._off)[0]

    def done(self) -> int:
        return _DONE.unpack_from(self._m, self._off + _DONE_AT)[0]

    def t_done(self) -> float:
        return _T_DONE.unpack_from(self._m, self._off + _T_DONE_AT)[0]

    def _check_holds(self, seq: int) -> None:
        if self.seq() != seq:
            raise ProtocolError(f"the slot holds message {self.seq()}, not {seq}")

    def _frame_at(self, lens: Sequence[int], i: int) -> int:
        """Where frame ``i`` of a message of frame lengths ``lens`` starts, in the mapping."""
        return self._off + _HEAD + _LEN.size * len(lens) + sum(lens[:i])

    def lens(self) -> list[int]:
        """The frame lengths of the message held, checked against the slot's bounds."""
        m, base = self._m, self._off
        count = _COUNT.unpack_from(m, base + _COUNT_AT)[0]
        if count > MAX_FRAMES:
            raise ProtocolError(f"channel slot holds {count} frames (at most {MAX_FRAMES})")
        lens = [_LEN.unpack_from(m, base + _HEAD + _LEN.size * i)[0] for i in range(count)]
        if not self._room(lens):
            raise ProtocolError("channel slot frame lengths exceed its capacity")
        return lens

    def read_into(self, first: int, bufs: Sequence[Any]) -> None:
        """Frames ``first``.. of the message held, copied into ``bufs`` (writable buffers of exactly their lengths,
        e.g. the storage of tensors built before the frames came)."""
        lens = self.lens()
        if len(bufs) != len(lens) - first or any(_nbytes(b) != n for b, n in zip(bufs, lens[first:])):
            raise ProtocolError("the buffers given differ from the frames the slot holds")
        off = self._frame_at(lens, first)
        with memoryview(self._m) as view:
            for b, n in zip(bufs, lens[first:]):
                with memoryview(b) as dst:
                    dst.cast("B")[:] = view[off:off + n]
                off += n

    def read(self, first: int = 0, stop: int | None = None) -> list[bytearray]:
        """Frames ``first`` to ``stop`` (default: all) held, copied into memory the caller owns (checked against the
        slot's bounds only: the message itself is validated by :func:`djinn_core.rpc.wire.decode`)."""
        lens = self.lens()
        stop = len(lens) if stop is None else min(stop, len(lens))
        off = self._frame_at(lens, first)
        frames = []
        with memoryview(self._m) as view:
            for n in lens[first:stop]:
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
        self.failed_reply = 0  # the request whose header-first reply failed: its error reply goes over ZeroMQ
        self._pinned: Any = None  # what pin() made of the mapping's start (see pinned)
        self._pinned_bytes = 0
        self._unpin: Callable[[], None] | None = None
        self._pin_failed = False

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

    def write_reply_head(self, seq: int, head: Any, tail_lens: Sequence[int]) -> bool:
        """Store the header of the reply to request ``seq`` and the lengths of its tensor frames, which
        :meth:`complete_reply` (or :meth:`fail_reply`) follows; False (nothing written) when the reply would not fit."""
        if self._map is None or not self._replies.write_head(seq, head, tail_lens):
            return False
        self.writes += 1
        return True

    def complete_reply(self, seq: int, tail: Sequence[Any] | None, t_done: float) -> bool:
        """Store the tensor frames of reply ``seq`` (announced by :meth:`write_reply_head`; ``tail`` None: already
        in their places, :meth:`reply_tail_offsets`) and ``t_done``; False when the channel was closed in between."""
        if self._map is None:
            return False
        self._replies.complete(seq, tail, t_done)
        return True

    def reply_tail_offsets(self, seq: int) -> tuple[list[int], int]:
        """Where the tensor frames of reply ``seq`` (announced by :meth:`write_reply_head`) go: their offsets in the
        mapping (which :meth:`pinned` covers from its start), and where the last ends."""
        if self._map is None:
            raise ProtocolError("channel closed")
        return self._replies.tail_offsets(seq)

    def pinned(self, pin: Callable[[memoryview], "tuple[Any, Callable[[], None]] | None"], nbytes: int) -> Any:
        """The mapping's first ``nbytes`` (at least) as ``pin`` made them, e.g. a host tensor over them that a device
        copies into directly: ``pin`` gets a view of the mapping's start and returns (that, an unpin function) or
        None when it cannot. Pinned as far as replies have reached (a power of two from :data:`MIN_PINNED`, at most
        the mapping: pinning touches every page, and a slot's pages are otherwise used only as far as messages
        reach), pinned again larger when a reply reaches further; unpinned on close, before the mapping goes. None
        where it could not be pinned (then never tried again on this channel)."""
        if self._map is None or self._pin_failed:
            return None
        if self._pinned is not None and self._pinned_bytes >= nbytes:
            return self._pinned
        size = min(max(MIN_PINNED, 1 << max(0, nbytes - 1).bit_length()), len(self._map))
        if size < nbytes:
            raise ProtocolError(f"{nbytes} bytes asked pinned of a channel of {len(self._map)}")
        self._unpin_now()
        view = memoryview(self._map)[:size]
        try:
            got = pin(view)
        except BaseException:
            view.release()
            raise
        if got is None:
            view.release()
            self._pin_failed = True
            return None
        self._pinned, unpin = got
        self._pinned_bytes = size

        def unpin_and_release() -> None:
            unpin()
            view.release()
        self._unpin = unpin_and_release
        return self._pinned

    def _unpin_now(self) -> None:
        unpin, self._unpin, self._pinned, self._pinned_bytes = self._unpin, None, None, 0
        if unpin is not None:
            unpin()  # lets every view of the mapping go: a mapping with views cannot close

    def fail_reply(self, seq: int) -> None:
        """The tensor frames of reply ``seq`` will not come (its client then waits on the ZeroMQ socket)."""
        self.failed_reply = seq
        if self._map is not None:
            self._replies.fail(seq)

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
        """Mark the channel given up (a client waiting on it sees that at once), unpin and unmap it, and remove its
        name."""
        self.unlink()
        if self._map is not None:
            _POLLING.pack_into(self._map, 0, 0.0)
            _CLOSED.pack_into(self._map, _POLLING.size, 1)
            m, self._map = self._map, None
            try:
                self._unpin_now()
                m.close()
            except BufferError:  # a view still held elsewhere: the mapping goes with it (the name is gone already)
                log.debug("channel %s unmapped later: a view of it is still held", self.name)


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
        """The reply to ``seq`` is in the slot, at least its header (:meth:`reply_done` says whether all of it)."""
        return self._map is not None and self._replies.seq() == seq

    def reply_done(self, seq: int) -> int:
        """For a reply to ``seq`` that :meth:`reply_ready` showed: 1 when all its frames are there, 0 while its tensor
        frames are still to come, -1 when they will not (the server's error reply comes over ZeroMQ) or this side
        closed the channel (a channel the server closed shows in :attr:`closed`)."""
        if self._map is None:
            return -1
        done = self._replies.done()
        return 1 if done == seq else -1 if done == FAILED else 0

    def reply_t_done(self) -> float:
        """The server's host clock when the held reply's frames were all stored (0.0 when stored at once)."""
        return self._replies.t_done() if self._map is not None else 0.0

    def read_reply(self, first: int = 0, stop: int | None = None) -> list[bytearray]:
        """Frames ``first`` to ``stop`` (default: all) of the reply held (call after :meth:`reply_ready`; the frames
        after the header once :meth:`reply_done`), copied out."""
        return self._replies.read(first, stop)

    def reply_lens(self) -> list[int]:
        """The lengths of the frames of the reply held (all announced with its header)."""
        return self._replies.lens()

    def read_reply_into(self, first: int, bufs: Sequence[Any]) -> None:
        """Frames ``first``.. of the reply held, copied into ``bufs`` (buffers of exactly their lengths)."""
        self._replies.read_into(first, bufs)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
