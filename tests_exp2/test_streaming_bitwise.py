"""exp2: streaming changes where the weights come from, never the arithmetic. On a layer count where both fit, the
streamed model's logits (prefill and every decode step) and greedy tokens are bit-identical to the same weights
resident on the GPU -- also when the layer count does not divide by the ring's slot count (vLLM#54975 corrupted
weights exactly there)."""

from __future__ import annotations

import pytest

from djinn_core.bench import preconditions as pre
from djinn_core.models import build_model
from djinn_core.streaming import StreamedModel, StreamingPolicy, place_resident_
from djinn_core.bench.experiments.exp2_streaming import (ARCH, SEED, MiB, free_device_memory, greedy, mismatches,
                                                         prompt)

LAYERS = 5  # 8 GiB of layers resident; 5 % 2 and 5 % 3 != 0 (ring slots that do not divide the layer count)
PROMPT_TOKENS = 128
STEPS = 8


@pytest.mark.h100
@pytest.mark.slow
@pytest.mark.parametrize("slots,chunk_mib", [(2, 16), (3, 128)], ids=["slots=2-chunk=16MiB", "slots=3-chunk=128MiB"])
def test_streamed_logits_and_greedy_tokens_bitwise_equal_resident(llama70b_host_pack, cuda_device, claim, slots,
                                                                   chunk_mib):
    pack = llama70b_host_pack

    def run() -> dict:
        free_device_memory()
        resident = build_model(ARCH, num_layers=LAYERS, device=cuda_device, seed=SEED)
        ids = prompt(PROMPT_TOKENS, resident.config.vocab_size, device=cuda_device)
        want = greedy(resident, ids, STEPS)
        del resident
        free_device_memory()
        model = build_model(ARCH, num_layers=LAYERS, materialize=False)
        place_resident_(model, cuda_device, seed=SEED)
        policy = StreamingPolicy(chunk_bytes=chunk_mib * MiB, ring_bytes=slots * pack.layout.stride)
        with StreamedModel(model, pack, policy, device=cuda_device) as sm:
            got = greedy(sm.model, ids, STEPS)
            stats = sm.stats()
        del model
        free_device_memory()
        return {"diff": mismatches(got, want), "tokens": got[2], "resident_tokens": want[2], "stats": stats}

    res = claim.measure(run)
    params = {"layers": LAYERS, "slots": slots, "chunk_MiB": chunk_mib, "prompt_tokens": PROMPT_TOKENS,
              "decode_steps": STEPS}
    claim.info(**res)
    pre.bytes_moved(claim, nbytes=res["stats"]["bytes_streamed"], what="weight bytes streamed", params=params)
    claim.precondition("layers_not_divisible_by_slots", value=LAYERS % slots, op=">", bound=0, unit="layers",
                       what="layer count modulo ring slots (the case under test)", params=params)
    claim.check("unequal_logits_and_tokens_vs_resident", method="torch bit patterns, prefill + decode logits, tokens",
                value=sum(res["diff"].values()), bound=0, op="<=", unit="elements", params=params)
