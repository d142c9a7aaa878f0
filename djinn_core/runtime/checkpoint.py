"""A session's life states and its checkpoint: the hidden state entering layer L, readable and editable in place."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Callable

import torch

from djinn_core.errors import InvalidEdit

if TYPE_CHECKING:
    from djinn_core.runtime.session import BreakpointSession


class SessionState(enum.Enum):
    """Where a session is in its life."""

    OPEN = "open"  # prompt set, nothing computed
    CHECKPOINT = "checkpoint"  # stopped before layer L, state resident: readable, editable, forkable
    PAUSED = "paused"  # checkpoint state on the host
    RUNNING = "running"  # resumed: past layer L, decoding (resident; evictable while no call runs on it)
    SWAPPED = "swapped"  # a decoding session's KV on the host (paused between decode steps, or evicted)
    CLOSED = "closed"  # memory released


# state in the slab, evictable while idle (a tuple: membership by identity, no Enum.__hash__ on the hot path)
RESIDENT_STATES = (SessionState.CHECKPOINT, SessionState.RUNNING)


class Checkpoint:
    """A session stopped before layer ``layer``. ``hidden`` is the live state (batch, seq, hidden), editable in place.

    A view taken from ``hidden`` is valid until the next slab allocation (the slab may compact): read it again
    rather than keeping it.
    """

    def __init__(self, session: "BreakpointSession"):
        self._session = session
        self.layer = session.layer

    @property
    def session_id(self) -> int:
        return self._session.id

    @property
    def shape(self) -> tuple[int, ...]:
        """(batch, seq, hidden) of the hidden state."""
        return self._session.hidden_shape

    @property
    def hidden(self) -> torch.Tensor:
        """The hidden state entering layer ``layer``, (batch, seq, hidden) on the model's device; in-place edits stick.
        :class:`~djinn_core.errors.CheckpointStateError` when paused (restore first) or superseded."""
        return self._session.checkpoint_hidden(self)

    def edit(self, edit: torch.Tensor | Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Replace the hidden state by a tensor of the same shape, dtype and device, or by ``edit(copy)``.

        A callable gets a copy of the hidden state and returns the new one (or None after editing the copy in
        place). The result is validated before anything is written, so on :class:`InvalidEdit` (or any error
        raised by the callable) the checkpoint is intact. The write is one copy on the current stream.
        """
        dst = self.hidden
        if callable(edit) and not isinstance(edit, torch.Tensor):
            scratch = dst.clone()
            new = edit(scratch)
            new = scratch if new is None else new
        else:
            new = edit
        if not isinstance(new, torch.Tensor):
            raise InvalidEdit(f"an edit must be a tensor (or a callable returning one), got {type(new).__name__}")
        problems = []
        if tuple(new.shape) != tuple(dst.shape):
            problems.append(f"shape {tuple(new.shape)} != {tuple(dst.shape)}")
        if new.dtype != dst.dtype:
            problems.append(f"dtype {new.dtype} != {dst.dtype}")
        if new.device != dst.device:
            problems.append(f"device {new.device} != {dst.device}")
        if problems:
            raise InvalidEdit("edit rejected, checkpoint unchanged: " + "; ".join(problems))
        if new.data_ptr() != dst.data_ptr():
            dst.copy_(new)
        self._session.runtime.residency.touch(self._session)

    def __repr__(self) -> str:
        return f"Checkpoint(session={self.session_id}, layer={self.layer}, state={self._session.state.value})"
