"""Replies through shared memory for a client on the server's host: no socket, no thread to wake.

Over TCP a reply crosses two ZeroMQ I/O threads, the server's and the client's, which sleep while the server
computes; waking them after a millisecond or more costs 0.1-0.3 ms on the lent H100's host (``docs/server.md``).
A client on the same host that spins for its reply anyway (``busy_poll_s``) can instead read it from a page both
processes map: the server's compute thread writes the reply there and the client's spinning thread sees it at once.
Requests still go over ZeroMQ, and every reply that does not fit, or for a client that does not ask, too.

A :class:`ReplyChannel` is created by the server, one per client connection that asks (op ``attach_local``): a file
in ``/dev/shm`` (mode 0600: only the server's user can map it) that the server unlinks as soon as the client has
mapped it, so nothing is left behind if either side dies. The server writes only into channels it created, and
only replies to requests from the connection the channel was made for. The client maps it read-only
(:class:`ReplyReader`).

Layout: ``seq`` (u64, the request id of the reply held), ``count`` (u32, frames), ``count`` frame lengths (u64),
then the frames back to back. The writer stores the frames, then ``seq`` last; a reader that sees ``seq`` equal to
its request id copies the frames out (they are decoded with :func:`djinn_core.wire.decode`, the same validation as
ZeroMQ frames). Request ids of one client only grow, and a client sends its next request only after it has read the
reply to the last, so a reply is never overwritten while read. The ordering relies on x86-64's store order (stores
become visible in program order); :func:`supported` says no elsewhere, and those clients use ZeroMQ.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import struct
import sys
from typing import Any, Sequence

from .errors import ConfigError, ProtocolError

_SEQ = struct.Struct("<Q")
_COUNT = struct.Struct("<I")
_LEN = struct.Struct("<Q")
_HEAD = _SEQ.size + _COUNT.size
MAX_FRAMES = 64
SHM_DIR = "/dev/shm"


def supported() -> bool:
    """Shared-memory replies work here: Linux on x86-64 (store order) with ``/dev/shm``."""
    return (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
            and os.path.isdir(SHM_DIR))


class ReplyChannel:
    """The server's side: a ``capacity``-byte shared-memory area it writes replies into (see the module docstring)."""

    def __init__(self, capacity: int, route: bytes):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 4096:
            raise ConfigError(f"capacity must be an int >= 4096, got {capacity!r}")
        if not supported():
            raise ConfigError("shared-memory replies need Linux on x86-64 with /dev/shm")
        self.capacity = capacity
        self.route = route  # the ZeroMQ routing id of the connection it serves
        self.name = f"djinn-reply-{os.getpid()}-{secrets.token_hex(16)}"
        self.path = os.path.join(SHM_DIR, self.name)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, capacity)
            self._map = mmap.mmap(fd, capacity, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self._linked = True
        self.writes = 0

    def fits(self, frames: Sequence[Any]) -> bool:
        return (len(frames) <= MAX_FRAMES
                and _HEAD + _LEN.size * len(frames) + sum(_nbytes(f) for f in frames) <= self.capacity)

    def write(self, seq: int, frames: Sequence[Any]) -> bool:
        """Store ``frames`` as the reply to request ``seq``; False (nothing written) when they do not fit."""
        if self._map is None or not self.fits(frames):
            return False
        m = self._map
        off = _HEAD
        for f in frames:
            _LEN.pack_into(m, off, _nbytes(f))
            off += _LEN.size
        for f in frames:
            n = _nbytes(f)
            m[off:off + n] = f
            off += n
        _COUNT.pack_into(m, _SEQ.size, len(frames))
        _SEQ.pack_into(m, 0, seq)  # last: a reader polling seq sees complete frames
        self.writes += 1
        return True

    def unlink(self) -> None:
        """Remove the name (the mapping stays valid in both processes). Idempotent."""
        if self._linked:
            self._linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink()
        if self._map is not None:
            self._map.close()
            self._map = None


class ReplyReader:
    """The client's side: maps a server's channel read-only and polls it for the reply to one request id."""

    def __init__(self, name: str, capacity: int):
        if not isinstance(name, str) or not name.startswith("djinn-reply-") or "/" in name:
            raise ProtocolError(f"bad reply channel name {name!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < _HEAD:
            raise ProtocolError(f"bad reply channel capacity {capacity!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < capacity:
                raise ProtocolError(f"reply channel {name} is smaller than {capacity} bytes")
            self._map = mmap.mmap(fd, capacity, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.name = name
        self.capacity = capacity

    def ready(self, seq: int) -> bool:
        return self._map is not None and _SEQ.unpack_from(self._map, 0)[0] == seq

    def read(self) -> list[bytes]:
        """The frames of the reply held (call after :meth:`ready`); copies, so the area may be reused."""
        m = self._map
        count = _COUNT.unpack_from(m, _SEQ.size)[0]
        if count > MAX_FRAMES:
            raise ProtocolError(f"reply channel holds {count} frames (at most {MAX_FRAMES})")
        off = _HEAD
        lens = []
        for _ in range(count):
            lens.append(_LEN.unpack_from(m, off)[0])
            off += _LEN.size
        if off + sum(lens) > self.capacity:
            raise ProtocolError("reply channel frame lengths exceed its capacity")
        frames = []
        for n in lens:
            frames.append(m[off:off + n])
            off += n
        return frames

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def _nbytes(frame: Any) -> int:
    return memoryview(frame).nbytes
