"""Process groups: one process per GPU (NCCL), or CPU processes (gloo) for tests, through ``torch.distributed``.

:func:`init_group` joins the default process group, from its arguments or from the environment ``torchrun`` sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), and returns a
:class:`RankGroup`: the rank, the world, the rank's device (``cuda:LOCAL_RANK`` under NCCL, the CPU under gloo), the
group the weight all-gathers use, and a gloo group for host-side coordination (barriers, small results), so that
waiting for another rank never occupies a GPU. NVLink multicast (NVLS) is switched off before NCCL starts
(``NCCL_NVLS_ENABLE=0``): see ``docs/notes/distributed.md``.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from djinn_core.errors import ConfigError, DeviceUnavailable
from djinn_core.validation import check_int, check_number

log = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo")
NVLS_ENV = "NCCL_NVLS_ENABLE"
DEFAULT_TIMEOUT_S = 600.0  # a collective that waits this long for a peer fails instead of hanging


@dataclass(frozen=True)
class RankGroup:
    """This process's place in the default process group.

    ``group`` carries the weight all-gathers (the default group); ``cpu_group`` is a gloo group over the same ranks
    for host-side coordination (the default group itself under gloo).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device
    group: Any
    cpu_group: Any

    def barrier(self) -> None:
        """Wait, on the host, until every rank has reached this barrier (gloo: no GPU work is queued)."""
        dist.barrier(group=self.cpu_group)

    def all_ok(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (a host-side vote: one rank's refusal becomes every rank's, so no rank
        is left waiting in a collective the others will not reach)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return bool(flag.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order, on every rank (through the gloo group)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it; another process may take it before it is bound again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env_int(name: str, given: int | None) -> int:
    if given is not None:
        return given
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(f"{name} is not set: pass it, or launch with torchrun / djinn_core.distributed.launch")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an int") from None


def _nvls_off() -> None:
    if os.environ.get(NVLS_ENV, "0") != "0":
        log.warning("%s=%s overridden to 0: NVLink multicast stays off", NVLS_ENV, os.environ[NVLS_ENV])
    os.environ[NVLS_ENV] = "0"


def init_group(
    *,
    backend: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
    local_world_size: int | None = None,
    init_method: str = "env://",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RankGroup:
    """Join the default process group and return this process's :class:`RankGroup`.

    ``backend`` defaults to NCCL where CUDA is available, else gloo. Unset ranks and sizes come from the environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (default ``RANK``), ``LOCAL_WORLD_SIZE`` (default ``WORLD_SIZE``)).
    Under NCCL the rank's device is ``cuda:local_rank``, made current, and the communicator is created now (eagerly)
    with NVLS off. A collective waits at most ``timeout_s`` for its peers.
    """
    if dist.is_initialized():
        raise ConfigError("a default process group is already initialized in this process")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    rank = check_int("rank", _env_int("RANK", rank), 0)
    world_size = check_int("world_size", _env_int("WORLD_SIZE", world_size), 1)
    if rank >= world_size:
        raise ConfigError(f"rank {rank} outside a world of {world_size}")
    local_rank = check_int("local_rank", local_rank if local_rank is not None
                           else int(os.environ.get("LOCAL_RANK", rank)), 0)
    local_world_size = check_int("local_world_size", local_world_size if local_world_size is not None
                                 else int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), 1)
    check_number("timeout_s", timeout_s, 0.0, strict_minimum=True)
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DeviceUnavailable("the NCCL backend needs CUDA GPUs; this machine has none (use gloo)")
        if local_rank >= torch.cuda.device_count():
            raise DeviceUnavailable(f"local rank {local_rank} needs cuda:{local_rank}; this machine has "
                                    f"{torch.cuda.device_count()} CUDA device(s)")
        _nvls_off()
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout,
                                device_id=device)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        cpu_group = dist.group.WORLD
    log.info("rank %d of %d (local %d of %d) joined: %s on %s", rank, world_size, local_rank, local_world_size,
             backend, device)
    return RankGroup(rank, world_size, local_rank, local_world_size, backend, device, dist.group.WORLD, cpu_group)


def destroy_group() -> None:
    """Leave the default process group (every group of this process), if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["BACKENDS", "DEFAULT_TIMEOUT_S", "NVLS_ENV", "RankGroup", "destroy_group", "free_port", "init_group"]
