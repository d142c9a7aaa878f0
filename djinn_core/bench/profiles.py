"""Suite profiles: which claims a machine can run. ``cpu`` anywhere, ``gpu`` on any CUDA GPU, ``h100`` on a GPU with
at least :data:`H100_MIN_BYTES` of memory (an H100-class card). Importing this module imports no torch."""

from __future__ import annotations

H100_MIN_BYTES = 75 * 2**30
PROFILES = ("cpu", "gpu", "h100")
MIN_GPU_BYTES = {"cpu": None, "gpu": 0, "h100": H100_MIN_BYTES}  # None: no GPU needed


def gpu_missing_reason(min_bytes: int = 0) -> str | None:
    """Why this machine cannot run work needing a CUDA GPU with ``min_bytes`` of memory, or None if it can."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"
    total = torch.cuda.get_device_properties(0).total_memory
    if total < min_bytes:
        name = torch.cuda.get_device_name(0)
        return f"needs >= {min_bytes / 2**30:.0f} GiB of GPU memory; {name} has {total / 2**30:.1f} GiB"
    return None


def profile_missing_reason(profile: str) -> str | None:
    """Why this machine cannot run ``profile``'s claims, or None if it can."""
    need = MIN_GPU_BYTES[profile]
    return None if need is None else gpu_missing_reason(need)


def detect_profile() -> str:
    """The largest profile this machine can run: ``h100``, ``gpu`` or ``cpu``."""
    return next(p for p in reversed(PROFILES) if profile_missing_reason(p) is None)


# The reports the h100 profile writes (reports/<machine>/NAME.json), one pytest process each: name -> (test paths,
# VRAM budget or None for the run's own). Memory pressure runs at both budgets: the H100 80GB card and the whole card.
# The server memory-pressure test runs alone (NVML's peak is the whole device's).
H100_REPORTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "ceilings": (("tests_exp3/test_ceilings.py",), None),
    "memory_layer": (("tests_exp3/test_swap_bandwidth.py",), None),
    "exp3_resume": (("tests_exp3/test_token_accuracy.py", "tests_exp3/test_resume_latency.py"), None),
    "exp3_memory_pressure": (("tests_exp3/test_memory_pressure.py",), "80GB"),
    "exp3_memory_pressure_card": (("tests_exp3/test_memory_pressure.py",), "card"),
    "exp3_server_memory_pressure": (("tests_exp3/test_server_memory_pressure.py",), "80GB"),
    "exp3_rpc": (("tests_exp3/test_rpc_overhead.py",), None),
    "exp2_streaming": (("tests_exp2/test_streaming_bandwidth.py", "tests_exp2/test_streaming_bitwise.py",
                        "tests_exp2/test_streaming_peers.py"), None),
    "exp4_streamed_sessions": (("tests_exp2/test_exp4_streamed_sessions.py",), None),
    "exp4_batched_decode": (("tests_exp2/test_exp4_batched_decode.py",), None),
    "exp4_served": (("tests_exp2/test_exp4_served.py",), None),
}


def report_specs() -> list[str]:
    """:data:`H100_REPORTS` as ``scripts/gpu_suite.sh`` specs: ``NAME:PATH[,PATH...][@BUDGET]``."""
    return [f"{name}:{','.join(paths)}" + (f"@{budget}" if budget else "")
            for name, (paths, budget) in H100_REPORTS.items()]
