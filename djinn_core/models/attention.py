"""Attention dispatch for bitwise-reproducible runs."""

from __future__ import annotations

import torch


class exact_attention:
    """A context in which scaled-dot-product attention never uses cuDNN's fused kernel.

    cuDNN's attention kernel is not run-to-run deterministic in decode (``docs/notes/models.md`` has the
    measurement); the flash, memory-efficient and math kernels and eager attention are. Breakpoint sessions promise
    bitwise equality with an uninterrupted run, so they compute under this context; a reference run must exclude
    cuDNN attention too (the claims suite does so for the whole session). Harmless where cuDNN attention is absent
    (the CPU).

    It turns the cuDNN backend off for its duration (the other backends stay as they are) and back on after, if it
    was on; entering costs two flag reads and writes, far less than ``torch.nn.attention.sdpa_kernel`` (it runs on
    every resume and decode step). Like ``sdpa_kernel``, the flag is process-wide.
    """

    __slots__ = ("_was_on",)

    def __enter__(self) -> "exact_attention":
        self._was_on = torch.backends.cuda.cudnn_sdp_enabled()
        if self._was_on:
            torch.backends.cuda.enable_cudnn_sdp(False)
        return self

    def __exit__(self, *exc: object) -> bool:
        if self._was_on:
            torch.backends.cuda.enable_cudnn_sdp(True)
        return False
