"""Diagnostic: after ``restore()`` returns, when does the current stream's next event complete?

Times, from an event recorded before ``restore()``: ``ready`` (``session.ready_event``) and ``end`` (an event
recorded on the current stream right after ``restore()`` returned), for the current head path, for the head
brought back through ``swap_in`` on the in stream (``swap_in_head``), and with the GC pause off (``gc_on``).

    PYTHONPATH=. python3 scripts/probe_restore_end.py [--arch llama2-13b] [--layer 20]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

import torch

from djinn_core.runtime import breakpoints as bp
from djinn_core.memory.host_pool import HostPool
from djinn_core.models import build_model
from djinn_core.memory.slab import Slab


def _restore_head_via_swap_in(self) -> None:
    rt, state = self.runtime, self._swapped
    rt._make_room(self.id, state.slab_bytes())
    rs = rt.swap.swap_in(state, names=(bp.HEAD,))
    rs.wait(bp.HEAD)
    self.ready_event = rt._record_event()
    self._head = bp._PackedHead(rs.tensors[bp.HEAD], self._head_layout)
    self._swapped = rs.pending
    self.state = bp.SessionState.CHECKPOINT
    rt._touch(self)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama2-13b")
    p.add_argument("--layer", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    model = build_model(args.arch, device="cuda", dtype=torch.float16, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (1, 2048), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    rt = bp.BreakpointRuntime(model, slab=Slab(8 << 30, "cuda"), host_pool=HostPool(4 << 30))
    stream = torch.cuda.current_stream()
    s = rt.open(ids, max_new_tokens=8)
    s.run_to(args.layer)
    orig_head, orig_gc = bp.BreakpointSession._restore_head, bp._gc_paused
    for name in ("current", "swap_in_head", "gc_on", "current"):
        bp.BreakpointSession._restore_head = _restore_head_via_swap_in if name == "swap_in_head" else orig_head
        bp._gc_paused = contextlib.nullcontext if name == "gc_on" else orig_gc
        ready, end, kv = [], [], []
        for i in range(args.repeats + 2):
            s.pause()
            stream.synchronize()
            rt.swap.out_stream.synchronize()
            a, b, c = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            a.record(stream)
            s.restore()
            b.record(stream)
            c.record(rt.swap.in_stream)
            c.synchronize()
            b.synchronize()
            if i >= 2:
                ready.append(a.elapsed_time(s.ready_event))
                end.append(a.elapsed_time(b))
                kv.append(a.elapsed_time(c))
            s.cache.wait_ready()
        print(f"{name:13s} ready={statistics.median(ready):.3f} end={statistics.median(end):.3f} "
              f"kv_done={statistics.median(kv):.3f}", flush=True)
    bp.BreakpointSession._restore_head, bp._gc_paused = orig_head, orig_gc
    return 0


if __name__ == "__main__":
    sys.exit(main())
