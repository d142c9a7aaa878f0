"""The seam between the RPC endpoints and the ways messages move: one request/reply interface per side.

A message is a list of byte frames (:mod:`djinn_core.rpc.wire`); a transport moves it and never looks inside. Two
implementations, each in its own module:

* :mod:`djinn_core.rpc.zmq_transport`: ZeroMQ (server ROUTER, client DEALER), the way every server offers;
* :mod:`djinn_core.rpc.shm_transport`: a shared-memory channel (:mod:`djinn_core.rpc.local_channel`) for a client on
  the server's host, layered over a ZeroMQ transport: it carries what fits while the other side polls for it and hands
  everything else to the transport below.

:class:`~djinn_core.rpc.server.Server` and :class:`~djinn_core.rpc.client.Client` each talk to one transport object.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

# handle(origin, frames, slot_id, error): one request. ``origin`` is where it came from (what a reply is sent to),
# ``slot_id`` the request id the transport itself carried (None when only the header says), ``error`` set (and
# ``frames`` None) when the transport could not read the request's frames.
Handler = Callable[[Any, "list[Any] | None", "int | None", "Exception | None"], None]
# pin(view) -> (the memory, as a device can copy into it directly; the function that undoes it), or None: it cannot
Pin = Callable[[memoryview], "tuple[Any, Callable[[], None]] | None"]


class ServerTransport(ABC):
    """How requests reach the server's loop and its replies leave. Used by the server thread only."""

    ops: dict[str, Callable] = {}  # ops this transport adds to the server's (op name -> fn(request) -> result)

    @abstractmethod
    def serve(self, handle: Handler, wait_ms: int, spinning: bool, stop: threading.Event | None) -> bool:
        """Hand each waiting request to ``handle``, waiting up to ``wait_ms`` for the first (0: look once; with
        ``spinning`` the loop is in its busy-poll window); stop taking more once ``stop`` is set. Whether any came."""

    @abstractmethod
    def reply_path(self, origin: Any, header: dict[str, Any], rid: Any) -> Any:
        """Where the reply to an authenticated request from ``origin`` goes (its header may name a channel)."""

    @abstractmethod
    def stages(self, path: Any) -> bool:
        """Whether device tensors of a reply to ``path`` should go through the pinned staging buffer."""

    @abstractmethod
    def send(self, path: Any, rid: Any, frames: Sequence[Any], staged: bool = False) -> None:
        """Send a reply (``staged``: its frames are views of the reusable staging buffer, to be copied now)."""

    def send_head(self, path: Any, rid: Any, head: Any, tail_lens: Sequence[int]) -> PendingReply | None:
        """Send a reply's header (frame 0) now, while its tensor frames (of ``tail_lens`` bytes) are still being
        filled by the device: the receiver reads it meanwhile. None when ``path`` cannot take a reply this way (the
        whole reply is then sent with :meth:`send`)."""
        return None

    def sweep(self, now: float, idle_s: float) -> None:
        """Free what the transport holds for connections idle longer than ``idle_s`` (host monotonic seconds)."""

    @abstractmethod
    def close(self) -> None:
        """Stop: waiting clients learn at once where the transport can tell them."""


class PendingReply(ABC):
    """A reply whose header was sent (:meth:`ServerTransport.send_head`) and whose tensor frames are still to go."""

    def place(self, pin: Pin) -> tuple[Any, list[int]] | None:
        """Where the device may write the tensor frames in place, so that nothing is copied after its copies end:
        (the memory that holds them, as ``pin`` made it: see ``wire.register_host``; each frame's offset in it), or
        None (the frames are then handed to :meth:`complete`)."""
        return None

    @abstractmethod
    def complete(self, t_done: float, tail: Sequence[Any] | None) -> None:
        """Send the tensor frames ``tail``, now filled, or (None) mark the frames written in place (:meth:`place`)
        as there; ``t_done``: the host clock when they were."""

    @abstractmethod
    def fail(self) -> None:
        """The tensor frames will not come: the receiver is told, and the error reply to the same request, sent
        with :meth:`ServerTransport.send` next, goes a way it can still read."""


class ClientTransport(ABC):
    """How a client's requests reach the server and its replies come back. Used under the client's lock."""

    header: dict[str, Any] = {}  # fields this transport adds to every request header

    @property
    def gone(self) -> bool:
        """The server gave this transport up: the client falls back to the one below."""
        return False

    @abstractmethod
    def send(self, rid: int, frames: list[Any], has_tensors: bool) -> None:
        """Send request ``rid``."""

    @abstractmethod
    def receive(self, rid: int, op: str, timeout_s: float) -> tuple[Any, float]:
        """The decoded reply to ``rid`` and the host time (``perf_counter``) it was seen;
        :class:`~djinn_core.errors.ServerUnavailable` after ``timeout_s``."""

    @abstractmethod
    def close(self, goodbye: dict[str, Any]) -> None:
        """Close (``goodbye``: a request header to send, best effort, for what the server holds for this one)."""
