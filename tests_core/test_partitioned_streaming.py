"""Partitioned weight streaming on the CPU: gloo processes each hold 1/N of every layer of a tiny Llama, copy their
shard into a ring slot and all-gather the rest; the logits are bit for bit those of one-process streaming and of the
resident model, also when the layer count does not divide by the ring's slots and the shards' natural sizes differ.
Speed is never checked here."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from djinn_core.bench.experiments.scaleout import (ScaleoutConfig, bitwise_rank, partitioned_model, run,
                                                  time_decode_steps)
from djinn_core.distributed import (PartitionedStreamedModel, ShardPack, build_partitioned_streamed_model, free_port,
                                    gathered_layout, init_group, pack_layer_shards, seeded_layer_fill,
                                    shard_bytes_for, shard_range)
from djinn_core.distributed.group import destroy_group
from djinn_core.errors import ConfigError
from djinn_core.models import build_model, decoder_layers
from djinn_core.streaming import LAYER_ALIGNMENT, LayerLayout, StreamingPolicy, pack_layer_weights, place_resident_
from djinn_core.bench.experiments.reference import greedy_reference

pytestmark = pytest.mark.cpu

DTYPE = torch.float32
SEED = 0
KiB = 1 << 10
ROOT = Path(__file__).resolve().parents[1]


def _meta(num_layers: int):
    return build_model("llama-tiny", dtype=DTYPE, num_layers=num_layers, materialize=False)


def _fill(layer, index: int) -> None:
    seeded_layer_fill(SEED, layer, index)


def _prompt(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (1, n), generator=g)


# ------------------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("used", [1, 4096, 4097, 3 * 4096 + 512, 590_848])
def test_shards_are_equal_pages_that_cover_the_layer_in_order(world, used):
    shard = shard_bytes_for(used, world)
    assert shard % LAYER_ALIGNMENT == 0 and world * shard >= used
    ranges = [shard_range(used, world, r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == used
    for (a, z), (b, _) in zip(ranges, ranges[1:]):
        assert z == b  # contiguous, in rank order
    assert all(0 <= z - a <= shard for a, z in ranges)
    with pytest.raises(ConfigError):
        shard_range(used, world, world)


def test_three_ranks_shards_concatenate_to_the_packed_layer_with_zero_padding():
    meta = _meta(3)
    whole = pack_layer_weights(meta, device="cpu", fill=_fill, progress=False)
    used = whole.layout.used_bytes
    shards = [pack_layer_shards(meta, rank=r, world_size=3, device="cpu", fill=_fill, progress=False)
              for r in range(3)]
    try:
        sizes = [s.natural_bytes for s in shards]
        assert sizes[-1] < sizes[0] == shards[0].shard_bytes  # the last shard is shorter: padded
        assert shards[0].layout.stride == 3 * shards[0].shard_bytes >= whole.layout.stride
        assert shards[0].layout.signature() == whole.layout.signature()
        for i in range(3):
            parts = [s.layer(i) for s in shards]
            assert all(p.numel() == shards[0].shard_bytes for p in parts)
            assert torch.equal(torch.cat([p[:n] for p, n in zip(parts, sizes)]), whole.layer(i)[:used])
            assert not parts[-1][sizes[-1]:].any()
    finally:
        for s in shards:
            s.release()
        whole.release()


def test_gathered_layout_keeps_offsets_and_pads_the_stride():
    layout = LayerLayout.of(decoder_layers(_meta(1))[0])
    g = gathered_layout(layout, 3)
    assert g.entries == layout.entries and g.used_bytes == layout.used_bytes
    assert g.stride == 3 * shard_bytes_for(layout.used_bytes, 3) >= layout.stride


# ------------------------------------------------------------------------------------------- one process (world 1)
def test_partitioned_model_refuses_without_a_process_group():
    assert not dist.is_initialized()
    shards = pack_layer_shards(_meta(2), rank=0, world_size=1, device="cpu", fill=_fill, progress=False)
    model = _meta(2)
    place_resident_(model, "cpu", seed=SEED)
    policy = StreamingPolicy(chunk_bytes=64 * KiB, ring_bytes=2 * shards.layout.stride)
    with pytest.raises(ConfigError, match="process group"):
        PartitionedStreamedModel(model, shards, policy, device="cpu")
    shards.release()


@pytest.fixture
def world_of_one():
    group = init_group(backend="gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    yield group
    destroy_group()


def test_world_of_one_streams_the_resident_logits_and_checks_its_arguments(world_of_one):
    layers = 3
    shards = pack_layer_shards(_meta(layers), rank=0, world_size=1, device="cpu", fill=_fill, progress=False)
    model = _meta(layers)
    place_resident_(model, "cpu", seed=SEED)
    policy = StreamingPolicy(chunk_bytes=64 * KiB, ring_bytes=2 * shards.layout.stride)
    ids = _prompt(12, 1)
    want = greedy_reference(build_model("llama-tiny", dtype=DTYPE, num_layers=layers, seed=SEED), ids, 3)
    originals = [p for _, p in model.named_parameters()]
    with PartitionedStreamedModel(model, shards, policy, device="cpu", owns_pack=True, record_timeline=True) as pm:
        got = greedy_reference(pm.model, ids, 3)
        stats = pm.stats()
        assert [row["layer"] for row in pm.read_timeline()] == list(range(layers))
    assert all(p is q for p, (_, q) in zip(originals, model.named_parameters()))  # remove() restored them
    assert torch.equal(got[0], want[0]) and got[2] == want[2]
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert stats["host_bytes_streamed"] == stats["layers_streamed"] * shards.shard_bytes
    other = pack_layer_shards(_meta(layers), rank=0, world_size=2, device="cpu", fill=_fill, progress=False)
    with pytest.raises(ConfigError, match="rank 0 of 2"):
        PartitionedStreamedModel(_meta(layers), other, policy, device="cpu")
    other.release()
    with pytest.raises(ConfigError, match="ShardPack"):
        PartitionedStreamedModel(_meta(layers), object(), policy, device="cpu")
    with pytest.raises(ConfigError, match="RankGroup"):
        build_partitioned_streamed_model("llama-tiny", group=None, budget_bytes=1 << 30)


def test_world_of_one_builder_matches_the_resident_model(world_of_one):
    sm = build_partitioned_streamed_model("llama-tiny", group=world_of_one, budget_bytes=1 << 30, dtype=DTYPE,
                                          num_layers=3, max_slots=2, chunk_bytes=64 * KiB, max_tokens=32,
                                          progress=False)
    assert isinstance(sm.pack, ShardPack) and sm.slots == 2
    ids = _prompt(10, 3)
    with sm:
        got = greedy_reference(sm.model, ids, 2)
    want = greedy_reference(build_model("llama-tiny", dtype=DTYPE, num_layers=3, seed=SEED), ids, 2)
    assert torch.equal(got[0], want[0]) and got[2] == want[2]


def test_experiment_helpers_plumbing_on_a_world_of_one(world_of_one):
    """The scale-out experiment's model and timers at tiny scale: 5 layers from 3 shard sets, 2 decode steps."""
    shards = pack_layer_shards(_meta(3), rank=0, world_size=1, device="cpu", fill=_fill, progress=False)
    with partitioned_model(shards, world_of_one, num_layers=5, chunk_bytes=64 * KiB, max_tokens=32, prefill_tokens=16,
                           budget_bytes=1 << 30, max_slots=2, arch="llama-tiny", dtype=DTYPE, seed=SEED) as pm:
        assert pm.layer_sets == (0, 1, 2, 0, 1) and pm.slots == 2
        decode = time_decode_steps(pm.model, _prompt(16, 1), steps=2)
        assert decode.n == 2 and decode.clock == "host"
        assert pm.layers_streamed == 4 * 5  # the prefill, one untimed step and two timed ones: every layer each
    shards.release()


# --------------------------------------------------------------------------------------------- N gloo processes
@pytest.mark.slow
def test_two_ranks_give_one_process_and_resident_logits_bitwise_each_on_its_own_prompt(tmp_path):
    """5 layers through 2 slots (5 % 2 != 0), 64 KiB chunks (several per shard), rank 1's shard shorter than
    rank 0's; each rank compares its own prompt's partitioned run with one-process streaming and the resident model."""
    cfg = ScaleoutConfig(arch="llama-tiny", layers=5, world_size=2, baseline_sets=5, chunk_bytes=64 * KiB,
                         bitwise_tokens=16, bitwise_steps=3, dtype="float32", backend="gloo")
    ranks = run(cfg, tmp_path, rank_fn=bitwise_rank, args=(2,))["ranks"]
    zero = {"prefill_logits": 0, "decode_logits": 0, "tokens": 0}
    for r, res in enumerate(ranks):
        assert res["rank"] == r and res["layers"] == 5 and res["slots"] == 2
        assert res["vs_one_device"] == zero and res["vs_resident"] == zero
        assert res["tokens"] == res["one_device_tokens"] == res["resident_tokens"]
        assert res["shard_bytes"] > 64 * KiB  # more than one chunk per shard
        assert res["machine_info"]["djinn"]["torch_version"] and res["commit_info"]["source"] in (
            "DJINN_GIT_COMMIT", "git", "none")  # each rank's file carries its provenance
    assert ranks[0]["prompt_seed"] != ranks[1]["prompt_seed"] and ranks[0]["tokens"] != ranks[1]["tokens"]
    assert ranks[1]["shard_layer_bytes"] < ranks[0]["shard_layer_bytes"] == ranks[0]["shard_bytes"]
    assert ranks[0]["shard_layer_bytes"] + ranks[1]["shard_layer_bytes"] == ranks[0]["layer_used_bytes"]


@torch.no_grad()
def _served_by_plain_model(layers: int, tokens: int, steps: int, prompt_seed: int) -> tuple[list[int], str]:
    """What the launcher's serve_prompt reports for one rank, from the resident model."""
    from transformers import DynamicCache

    model = build_model("llama-tiny", dtype=DTYPE, num_layers=layers, seed=SEED)
    digest = hashlib.sha256()
    cache = DynamicCache()
    out = model(input_ids=_prompt(tokens, prompt_seed), past_key_values=cache, use_cache=True, logits_to_keep=1)
    digest.update(out.logits.float().numpy().tobytes())
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    served = []
    for _ in range(steps):
        served.append(int(nxt))
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        digest.update(out.logits.float().numpy().tobytes())
    return served + [int(nxt)], digest.hexdigest()


@pytest.mark.slow
def test_launcher_serves_three_ranks_each_the_resident_models_tokens_and_logits(tmp_path):
    """The command line with 3 gloo ranks: 4 layers through 3 slots, three shards of which the last is shortest."""
    out = tmp_path / "ranks.jsonl"
    cmd = [sys.executable, "-m", "djinn_core.distributed.launch", "--nproc-per-node", "3", "--backend", "gloo",
           "--arch", "llama-tiny", "--layers", "4", "--max-slots", "3", "--tokens", "12", "--decode-steps", "2",
           "--dtype", "float32", "--budget-gib", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rank"] for r in ranks] == [0, 1, 2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran (--threads 1): the same CPU kernels
    try:
        for r in ranks:
            tokens, sha = _served_by_plain_model(4, 12, 2, r["prompt_seed"])
            assert r["tokens"] == tokens and r["logits_sha256"] == sha
            assert r["stats"]["slots"] == 3 and r["stats"]["world_size"] == 3
    finally:
        torch.set_num_threads(threads)
    assert ranks[2]["stats"]["shard_layer_bytes"] < ranks[0]["stats"]["shard_layer_bytes"]


def test_experiment_counts_the_work_of_both_sides_and_refuses_a_ratio_over_unlike_work(world_of_one):
    """The scale-out ratios' preconditions at tiny scale: the one-device baseline and the partitioned run of the same
    depth land the same layer bytes per forward and pass; a partitioned run of fewer layers, or another prompt
    length, fails the precondition (PreconditionFailed) instead of yielding a ratio."""
    from djinn_core.bench.claims import ClaimRecorder, PreconditionFailed
    from djinn_core.bench.experiments.exp2_streaming import prefill_fn, streamed_model
    from djinn_core.bench.experiments.scaleout import bandwidth_bytes_counted, count_work, same_work

    class _Bench:  # what ClaimRecorder needs of pytest-benchmark's fixture
        def __init__(self):
            self.extra_info = {}

        def pedantic(self, fn, **_):
            return fn()

    kw = dict(chunk_bytes=64 * KiB, max_tokens=32, prefill_tokens=16, budget_bytes=1 << 30, max_slots=2,
              arch="llama-tiny", dtype=DTYPE)
    ids = _prompt(16, 1)
    pack = pack_layer_weights(_meta(3), device="cpu", fill=_fill, num_sets=3, progress=False)
    shards = pack_layer_shards(_meta(3), rank=0, world_size=1, device="cpu", fill=_fill, progress=False)
    works = {}
    try:
        with streamed_model(pack, torch.device("cpu"), num_layers=5, **kw) as sm:
            with count_work(sm, ids) as works["one"]:
                for _ in range(2):
                    prefill_fn(sm.model, ids, use_cache=True)()
            per_pass = sm.bytes_per_pass
        for name, layers, prompt in (("part", 5, ids), ("part_short", 3, ids), ("part_other_prompt", 5, ids[:, :8])):
            with partitioned_model(shards, world_of_one, num_layers=layers, seed=SEED, **kw) as pm:
                with count_work(pm, prompt) as works[name]:
                    for _ in range(3):
                        prefill_fn(pm.model, prompt, use_cache=True)()
    finally:
        shards.release()
        pack.release()
    one, part = works["one"], works["part"]
    assert one["forwards"] == 2 and part["forwards"] == 3 and one["layers_per_forward"] == 5
    assert one["layer_bytes_per_forward"] == part["layer_bytes_per_forward"] == 5 * pack.layout.used_bytes
    rec = ClaimRecorder(_Bench())
    same_work(rec, one, part, layers=5, figure="ttft")
    bandwidth_bytes_counted(rec, part, bytes_per_forward=per_pass, layers=5)
    assert [r["passed"] for r in rec.records] == [True] * 4
    with pytest.raises(PreconditionFailed, match="layer_bytes_per_forward_one_gpu_over_partitioned"):
        same_work(rec, one, works["part_short"], layers=5, figure="ttft")
    with pytest.raises(PreconditionFailed, match="ttft_work_unequal"):
        same_work(rec, one, works["part_other_prompt"], layers=5, figure="ttft")
    with pytest.raises(PreconditionFailed, match="layers_per_forward"):
        bandwidth_bytes_counted(rec, works["part_short"], bytes_per_forward=3 * pack.layout.param_bytes, layers=5)
    assert rec.records[-1]["kind"] == "precondition" and not rec.records[-1]["passed"]  # recorded before it raised


@pytest.mark.slow
def test_four_ranks_each_pull_a_quarter_and_stay_bitwise_one_process_and_resident(tmp_path):
    """Issue 23's world on the CPU: 4 gloo ranks, each pinning a quarter of every layer and all-gathering the other
    three; 6 layers through 3 slots, 64 KiB chunks. Every rank's own prompt gives the logits and tokens of
    one-process streaming and of the resident model, and the four shards tile each layer in rank order."""
    cfg = ScaleoutConfig(arch="llama-tiny", layers=6, world_size=4, baseline_sets=6, chunk_bytes=64 * KiB,
                         bitwise_tokens=12, bitwise_steps=2, dtype="float32", backend="gloo")
    ranks = run(cfg, tmp_path, rank_fn=bitwise_rank, args=(3,))["ranks"]
    zero = {"prefill_logits": 0, "decode_logits": 0, "tokens": 0}
    assert [res["rank"] for res in ranks] == [0, 1, 2, 3]
    for res in ranks:
        assert res["layers"] == 6 and res["slots"] == 3
        assert res["vs_one_device"] == zero and res["vs_resident"] == zero
        assert res["tokens"] == res["one_device_tokens"] == res["resident_tokens"]
    assert len({res["prompt_seed"] for res in ranks}) == 4
    assert sum(res["shard_layer_bytes"] for res in ranks) == ranks[0]["layer_used_bytes"]
    assert ranks[3]["shard_layer_bytes"] <= ranks[0]["shard_layer_bytes"] == ranks[0]["shard_bytes"]


def test_host_link_ceiling_says_whether_the_host_or_the_links_cap_the_stream():
    """Issue 23 measures first what the host feeds N links at once. On the committed two-H200 run it fed both
    (2 x 53.2 GB/s against 2 x 54.9 alone: not capped); a host feeding four links at 70% is capped, and the claim
    then divides by its share per link."""
    from djinn_core.bench.experiments.scaleout import host_link_ceiling

    ranks = [json.loads((ROOT / "reports" / "h200x2" / "scaleout_ranks" / f"rank{r}.json").read_text())
             for r in (0, 1)]
    h = host_link_ceiling(ranks)
    assert h["links"] == 2 and not h["capped"] and 1.9 < h["host_feeds_x_one_link"] < 2.0
    fake = [{"partitioned": {"ceiling_all_links_at_once": {"GBps": 0.7 * 55.0},
                             "bandwidth": {"ceiling_GBps": 55.0}}} for _ in range(4)]
    h4 = host_link_ceiling(fake)
    assert h4["capped"] and h4["per_link_GBps"] == pytest.approx(38.5) and h4["host_feeds_x_one_link"] == \
        pytest.approx(2.8)
