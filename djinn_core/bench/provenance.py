"""Provenance: the facts about this machine and software that every committed result carries."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import subprocess
from importlib import metadata
from typing import Any

import torch

from djinn_core.errors import ConfigError
from djinn_core.validation import is_int

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "accelerate", "pytest-benchmark", "nvidia-ml-py", "deepspeed", "nnsight")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def host_memory_bytes() -> dict[str, int]:
    """Total and available host RAM in bytes (psutil)."""
    import psutil

    vm = psutil.virtual_memory()
    return {"total": int(vm.total), "available": int(vm.available)}


def pci_address(props: Any) -> str | None:
    """``domain:bus:device`` of a GPU (hex, as ``nvidia-smi`` writes it) from torch's device properties; None where
    torch does not report it. The bus alone does not tell GPUs apart: in the lent VMs every GPU sits on bus 0."""
    if not hasattr(props, "pci_bus_id"):
        return None
    return f"{getattr(props, 'pci_domain_id', 0):04x}:{props.pci_bus_id:02x}:{getattr(props, 'pci_device_id', 0):02x}"


def gpu_facts(index: int = 0) -> dict[str, Any]:
    """GPU name, memory, driver, CUDA runtime, compute capability and PCIe link of CUDA device ``index``, and which
    GPU of the host it is (UUID, PCI address, ``CUDA_VISIBLE_DEVICES``: a lane of a several-GPU machine says which one
    it measured); ``{}`` without CUDA."""
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(index)
    facts: dict[str, Any] = {
        "gpu_name": props.name,
        "gpu_memory_bytes": int(props.total_memory),
        "gpu_count": torch.cuda.device_count(),
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "cuda_runtime": torch.version.cuda,
    }
    uuid = getattr(props, "uuid", None)
    facts.update(gpu_index=index, gpu_uuid=f"GPU-{uuid}" if uuid is not None else None,
                 pci_address=pci_address(props),
                 cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    try:
        from djinn_core.bench.vram import nvml_handle

        pynvml, h = nvml_handle(index)
        facts["nvml_uuid"] = pynvml.nvmlDeviceGetUUID(h)  # the GPU NVML read below: equal to gpu_uuid
        drv = pynvml.nvmlSystemGetDriverVersion()
        facts["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        facts["pcie_link_gen"] = pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h)
        facts["pcie_link_gen_max"] = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)
        facts["pcie_link_width"] = pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)
    except Exception as e:  # NVML missing or refused: record why rather than invent values
        facts["nvml_error"] = f"{type(e).__name__}: {e}"
    return facts


def machine_facts(gpu_index: int = 0) -> dict[str, Any]:
    """Everything a reader needs to know where a number came from (the GPU: CUDA device ``gpu_index``)."""
    facts: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "host_memory": host_memory_bytes(),
        "packages": {p: _version(p) for p in PACKAGES},
        "torch_version": torch.__version__,
    }
    facts.update(gpu_facts(gpu_index))
    return facts


def env_commit() -> dict[str, Any] | None:
    """The commit a copy of the tree was sent at, as the caller recorded it (``DJINN_GIT_COMMIT``, and
    ``DJINN_GIT_DIRTY`` 1/0: ``dirty`` True/False, else "unknown"); None where it is not set."""
    if not os.environ.get("DJINN_GIT_COMMIT"):
        return None
    return {"id": os.environ["DJINN_GIT_COMMIT"],
            "dirty": {"1": True, "0": False}.get(os.environ.get("DJINN_GIT_DIRTY", ""), "unknown"),
            "source": "DJINN_GIT_COMMIT"}


def commit_facts() -> dict[str, Any]:
    """The commit a result is measured at: :func:`env_commit` where set (a lent machine's copy has no reliable
    .git), else git in the working folder, else unknown."""
    env = env_commit()
    if env is not None:
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                                check=True)
    except (OSError, subprocess.SubprocessError):
        return {"id": None, "dirty": "unknown", "source": "none"}
    return {"id": head.stdout.strip(), "dirty": bool(status.stdout.strip()), "source": "git"}


def result_provenance(gpu_index: int = 0) -> dict[str, Any]:
    """The provenance of a result written outside pytest-benchmark (a probe's JSON, a rank's file), in the blocks a
    benchmark JSON carries: ``machine_info`` (``{"djinn": machine_facts(gpu_index)}``) and ``commit_info``."""
    return {"machine_info": {"djinn": machine_facts(gpu_index)}, "commit_info": commit_facts()}


# PCIe raw transfer rate per lane (GT/s) and line-code efficiency, by generation.
_PCIE_GEN = {1: (2.5, 8 / 10), 2: (5.0, 8 / 10), 3: (8.0, 128 / 130), 4: (16.0, 128 / 130), 5: (32.0, 128 / 130),
             6: (64.0, 242 / 256)}


def pcie_link_GBps(gen: int, width: int) -> float:
    """Theoretical one-direction data rate of a PCIe link after line coding, in GB/s (no protocol overhead)."""
    if gen not in _PCIE_GEN or not is_int(width) or width <= 0:
        raise ConfigError(f"unknown PCIe link gen={gen!r} width={width!r}")
    rate, eff = _PCIE_GEN[gen]
    return rate * eff * width / 8.0
