"""Where a Djinn server listens and what it accepts (:class:`ServerConfig`). Imports nothing heavy: the ``djinn serve``
argument parser reads its defaults without loading torch or ZeroMQ."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from djinn_core.errors import ConfigError
from djinn_core.rpc.local_channel import MIN_CAPACITY
from djinn_core.validation import check_int, check_number, check_optional_int

DEFAULT_MAX_HEADER_BYTES = 64 << 10  # the largest JSON header frame a receiver reads (bytes)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


REPLY_WAITS = ("poll", "block")  # ServerConfig.reply_wait


@dataclass(frozen=True)
class ServerConfig:
    """Where the server listens and what it accepts. Byte counts in bytes, times in seconds.

    Args:
        host: address to bind; anything but loopback requires ``token``.
        port: TCP port; 0 picks a free one (read :attr:`Server.address`).
        token: shared secret every request must carry (compared in constant time); None = no auth (loopback only).
        max_request_bytes: largest request accepted (header + tensor frames). Requests up to twice this size get a
            clear :class:`ProtocolError`; a single frame larger than that is dropped by ZeroMQ, which closes the
            sender's connection (the client then times out).
        max_header_bytes: largest JSON header accepted.
        max_sessions: sessions held at once, all clients together.
        max_sessions_per_client: sessions one client id may hold (default: ``max_sessions``).
        max_new_tokens: the largest ``max_new_tokens`` a session may be opened with.
        idle_timeout_s: a session unused for this long is closed and its memory freed (also after its client left).
        tick_s: how often the server thread wakes up with nothing to do (idle sweep, stop flag).
        stats_interval_s: how often stats are logged (0 = never).
        drain_s: after a stop, how long requests still arriving are answered "server shutting down".
        linger_ms: how long, at close, pending replies may take to leave.
        busy_poll_s: after a request, spin on the transports (one core busy) for this long before sleeping again, so
            the next request of an active client is picked up without a wake-up (0 = always sleep between requests).
        local_channel_bytes: size of each direction of the shared-memory channel a client on this host may ask for
            (:mod:`djinn_core.rpc.local_channel`; messages that do not fit go over ZeroMQ); 0 turns the channels off.
        spin_zmq_every: while spinning on channels in use, look at the ZeroMQ socket once every this many spins (a
            look is a system call; 1: every spin).
        reply_wait: how the server waits for a reply's device-to-host copies (:data:`REPLY_WAITS`): ``poll`` queries
            their event in a loop (keeping the reply's code warm meanwhile), ``block`` waits in the CUDA driver, as a
            ``.cpu()`` copy in process does.
        bench_ops: offer the benchmarking op ``resume_timed`` (a fork of a session resumed in the server's own
            process, as a library caller would, timed there): the in-process reference of the RPC claims, on the
            server's GPU context. Off by default.
    """

    host: str = "127.0.0.1"
    port: int = 5556
    token: str | None = None
    max_request_bytes: int = 256 << 20
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_sessions: int = 256
    max_sessions_per_client: int | None = None
    max_new_tokens: int = 4096
    idle_timeout_s: float = 600.0
    tick_s: float = 0.05
    stats_interval_s: float = 60.0
    drain_s: float = 0.05
    linger_ms: int = 1000
    busy_poll_s: float = 0.0
    local_channel_bytes: int = 64 << 20
    spin_zmq_every: int = 8
    reply_wait: str = "poll"
    bench_ops: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host must be a non-empty string, got {self.host!r}")
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise ConfigError("token must be a non-empty string or None")
        if not is_loopback(self.host) and self.token is None:
            raise ConfigError(f"binding {self.host!r} (not loopback) requires an auth token (--token-file or "
                              "DJINN_TOKEN)")
        check_int("port", self.port, 0, 65535)
        check_int("max_request_bytes", self.max_request_bytes, 1)
        check_int("max_header_bytes", self.max_header_bytes, 64)
        check_int("max_sessions", self.max_sessions, 1)
        check_optional_int("max_sessions_per_client", self.max_sessions_per_client, 1)
        check_int("max_new_tokens", self.max_new_tokens, 0)
        check_int("linger_ms", self.linger_ms, 0)
        check_int("spin_zmq_every", self.spin_zmq_every, 1)
        if not isinstance(self.bench_ops, bool):
            raise ConfigError(f"bench_ops must be a bool, got {self.bench_ops!r}")
        if self.reply_wait not in REPLY_WAITS:
            raise ConfigError(f"reply_wait must be one of {REPLY_WAITS}, got {self.reply_wait!r}")
        if self.local_channel_bytes != 0:
            check_int("local_channel_bytes (0: no channels)", self.local_channel_bytes, MIN_CAPACITY)
        check_number("tick_s", self.tick_s, 0, strict_minimum=True)
        check_number("idle_timeout_s", self.idle_timeout_s, 0, strict_minimum=True)
        for name in ("stats_interval_s", "drain_s", "busy_poll_s"):
            check_number(name, getattr(self, name), 0)

    @property
    def per_client_limit(self) -> int:
        return self.max_sessions if self.max_sessions_per_client is None else self.max_sessions_per_client

    @property
    def endpoint(self) -> str:
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port or '*'}"
