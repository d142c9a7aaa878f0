"""Breakpoint sessions, one module per job: :mod:`.capture` (capture and replay of a forward pass, the reference
run), :mod:`.packing` (a checkpoint's packed head and swap item keys), :mod:`.checkpoint` (session states, the
editable checkpoint), :mod:`.session` (one session's life), :mod:`.runtime` (the runtime that owns the sessions and
their memory), :mod:`.kv_cache` and :mod:`.decode_graphs`."""

from djinn_core.runtime.capture import (ModelParts, capture_at, decode_step, model_layers, model_parts, plain_run,
                                        replay_from)
from djinn_core.runtime.checkpoint import Checkpoint, SessionState
from djinn_core.runtime.packing import HEAD
from djinn_core.runtime.runtime import BreakpointRuntime
from djinn_core.runtime.session import BreakpointSession

__all__ = ["HEAD", "BreakpointRuntime", "BreakpointSession", "Checkpoint", "ModelParts", "SessionState", "capture_at",
           "decode_step", "model_layers", "model_parts", "plain_run", "replay_from"]
