"""Breakpoint sessions: capture and replay of a forward pass, checkpoints, sessions and the runtime that owns them."""

from djinn_core.runtime.breakpoints import (
    HEAD,
    BreakpointRuntime,
    BreakpointSession,
    Checkpoint,
    SessionState,
    capture_at,
    decode_step,
    model_layers,
    plain_run,
    replay_from,
)

__all__ = ["HEAD", "BreakpointRuntime", "BreakpointSession", "Checkpoint", "SessionState", "capture_at", "decode_step",
           "model_layers", "plain_run", "replay_from"]
