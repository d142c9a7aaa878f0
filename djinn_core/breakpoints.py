"""The public breakpoint API under its first name: ``from djinn_core.breakpoints import BreakpointRuntime``.

The code lives in :mod:`djinn_core.runtime`."""

from djinn_core.runtime import BreakpointRuntime, BreakpointSession, Checkpoint, SessionState

__all__ = ["BreakpointRuntime", "BreakpointSession", "Checkpoint", "SessionState"]
