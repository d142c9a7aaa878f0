"""Root pytest plugin of the claims suite: fixtures, hardware gating, provenance in benchmark JSON."""

from __future__ import annotations

import logging
import os

import pytest

# fixtures.lanes last: its tryfirst pytest_configure then runs first (pluggy calls later registrations first), so it
# picks an xdist worker's GPU before fixtures.budget's configure initialises CUDA
pytest_plugins = ["fixtures.budget", "fixtures.hardware", "fixtures.claims", "fixtures.models", "fixtures.lanes"]

SCALE_MARKERS = ("cpu", "gpu", "h100")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test says where it runs (cpu, gpu or h100); GPU tests skip, with a reason, where the GPU is missing."""
    from djinn_core.bench.profiles import MIN_GPU_BYTES, gpu_missing_reason

    reasons: dict[int, str | None] = {}
    for item in items:
        names = {m.name for m in item.iter_markers()}
        if not names & set(SCALE_MARKERS):
            raise pytest.UsageError(f"{item.nodeid} carries none of the markers {SCALE_MARKERS}: say where it runs")
        need = next((MIN_GPU_BYTES[m] for m in ("h100", "gpu") if m in names), None)
        if need is None:
            continue
        if need not in reasons:
            reasons[need] = gpu_missing_reason(need)
        if reasons[need]:
            item.add_marker(pytest.mark.skip(reason=reasons[need]))


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Add GPU, driver, CUDA, torch, transformers, host RAM, PCIe link and the run's VRAM budget (how it was chosen
    and enforced) to pytest-benchmark's machine_info."""
    from djinn_core.bench.provenance import machine_facts
    from fixtures.budget import budget_info

    machine_info["djinn"] = machine_facts()
    machine_info["djinn"]["deterministic_algorithms"] = os.environ.get("DJINN_DETERMINISTIC") == "1"
    machine_info["djinn"]["vram_budget"] = budget_info(config)
    machine_info["djinn"]["xdist_worker"] = os.environ.get("PYTEST_XDIST_WORKER")  # a lane (fixtures.lanes)
    machine_info["djinn"].setdefault("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))


def pytest_configure(config: pytest.Config) -> None:
    import torch

    logging.getLogger("djinn_core").setLevel(logging.INFO)
    # every reference run (plain forwards, DynamicCache, the peers) as reproducible as the runtime: cuDNN's fused
    # attention is not run-to-run deterministic (see djinn_core.models.exact_attention)
    torch.backends.cuda.enable_cudnn_sdp(False)
    if os.environ.get("DJINN_DETERMINISTIC") == "1":
        # opt-in deterministic kernels for the bitwise claims' references (`djinn probe determinism` tells whether
        # this GPU needs them); cuBLAS reads its workspace setting when the CUDA context starts, i.e. later
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def pytest_benchmark_update_commit_info(config: pytest.Config, commit_info: dict) -> None:
    """Where the suite runs on a copy of the tree (a lent GPU machine), take the commit from the environment
    (DJINN_GIT_COMMIT, DJINN_GIT_DIRTY) as the caller recorded it before sending the tree. It overrides whatever git
    says there: a copy may carry a stale .git (see docs/notes/bench.md); what git said is kept as ``git_on_device``.
    ``dirty`` is True for DJINN_GIT_DIRTY=1, False for 0, and "unknown" otherwise (the CI gate accepts only False)."""
    from djinn_core.bench.provenance import env_commit

    env = env_commit()
    if env is not None:
        if commit_info.get("id") not in (None, "", "unknown"):
            commit_info["git_on_device"] = {"id": commit_info.get("id"), "dirty": commit_info.get("dirty")}
        commit_info.update(env)
