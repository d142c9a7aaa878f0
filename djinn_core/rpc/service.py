"""The life cycle shared by the RPC endpoints (:class:`~djinn_core.rpc.server.Server`,
:class:`~djinn_core.rpc.router.Router`): bind, run one loop on a thread of its own or the caller's, stop from anywhere.

A :class:`LoopService` is one loop over one bound endpoint. Subclasses say how to bind (:meth:`LoopService.bind`,
idempotent, errors raised in the caller) and what the loop does (:meth:`LoopService._run`, which returns once
``_stopping`` is set and sets ``_stopped`` when it has let everything go); this class starts, stops and joins it.
"""

from __future__ import annotations

import collections
import logging
import threading
from abc import ABC, abstractmethod
from typing import Any, TypeVar

from djinn_core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["LoopService"]

_S = TypeVar("_S", bound="LoopService")


class LoopService(ABC):
    """One loop over one bound endpoint: ``start()`` binds (errors raise in the caller) and runs the loop on a new
    daemon thread; ``serve_forever()`` runs it on the calling thread (the CLI); ``stop()`` may be called from any
    thread or a signal handler; ``with service:`` starts and stops it.

    Args:
        kind: what the service is called in thread names, errors and logs (``"server"``, ``"router"``).
    """

    def __init__(self, kind: str):
        self._kind = kind
        self._stopping = threading.Event()  # set by stop(): the loop returns at its next look
        self._stopped = threading.Event()  # set by the loop once it has let everything go
        self._thread: threading.Thread | None = None
        self.address: str | None = None  # set by bind()
        self.counters: collections.Counter = collections.Counter()  # requests, errors, ...

    @abstractmethod
    def bind(self) -> str:
        """Bind the endpoint (once; again returns the same address); returns the bound address."""

    @abstractmethod
    def _run(self) -> None:
        """The loop: serve until ``_stopping`` is set, then let everything go and set ``_stopped``."""

    def start(self: _S) -> _S:
        """Bind, then run the loop on a background thread; returns self."""
        if self._thread is not None:
            raise ConfigError(f"{self._kind} already started")
        self.bind()
        self._thread = threading.Thread(target=self._run, name=f"djinn-{self._kind}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Bind and run the loop on the calling thread until :meth:`stop` (or SIGINT/SIGTERM when installed by the
        CLI)."""
        self.bind()
        self._run()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the loop to stop and, if it runs on its own thread, wait for it (at most ``timeout_s``)."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("djinn %s thread still busy %.1f s after stop()", self._kind, timeout_s)

    def _handle_guarded(self, origin: Any, body: list[Any] | None, slot_id: int | None,
                        error: Exception | None) -> None:
        """One message, whatever it holds: nothing a peer sends may end the loop (the transports' handler)."""
        try:
            self._handle(origin, body, slot_id, error)
        except Exception:  # _handle answers every error itself; this is the last line
            self.counters["errors"] += 1
            log.exception("a message could not be handled")

    @abstractmethod
    def _handle(self, origin: Any, body: list[Any] | None, slot_id: int | None, error: Exception | None) -> None:
        """One request from ``origin`` (``slot_id``: the id its transport carried; ``error``: why its frames could
        not be read); answers every error itself."""

    @property
    def running(self) -> bool:
        """Bound, and the loop has not finished stopping."""
        return self.address is not None and not self._stopped.is_set()

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
