"""The VRAM budget: its spellings, sources, the card check, the allocator cap's arithmetic, and the memory-pressure
sizes it drives (session counts, host pool)."""

import math
import time

import pytest
import torch

from djinn_core.memory import vram_budget as B
from djinn_core.bench.experiments.memory_pressure import must_evict, session_counts, swap_pool_bytes
from djinn_core.errors import ConfigError
from fixtures import budget as plugin

pytestmark = pytest.mark.cpu
GiB = 2**30
H200 = 150_109_880_320  # torch total_memory of an NVIDIA H200 (reports/h200x2)
SESSION, WEIGHTS = 1_703_936_000, 26_031_728_640  # Llama-2-13B: one 2080-token session's KV, the fp16 weights


@pytest.mark.parametrize("spec,expected", [
    ("80GB", B.H100_80GB_BYTES), ("80gb", B.H100_80GB_BYTES), (" 80 GB ", B.H100_80GB_BYTES),
    ("card", None), ("CARD", None), ("74.5GiB", int(74.5 * GiB)), ("1024", 1024), ("512MiB", 512 << 20),
    ("2TiB", 2 << 40), ("4096B", 4096),
])
def test_budget_spellings(spec, expected):
    assert B.parse_budget(spec)[0] == expected


@pytest.mark.parametrize("spec,why", [("79GB", "ambiguous"), ("80e9", "cannot read"), ("lots", "cannot read"),
                                      ("", "must be"), ("-5GiB", "cannot read"), ("0", "out of range"),
                                      ("80 GB card", "cannot read"), ("1.5MB", "ambiguous")])
def test_unreadable_budgets_are_config_errors(spec, why):
    with pytest.raises(ConfigError, match=why):
        B.parse_budget(spec)


def test_80gb_is_the_h100_card_so_on_an_h100_it_equals_card():
    on_h100 = B.resolve_budget("80GB", B.OPTION, B.H100_80GB_BYTES)
    assert on_h100.bytes == B.resolve_budget("card", B.OPTION, B.H100_80GB_BYTES).bytes
    assert not on_h100.below_card and not on_h100.exceeds_card
    on_h200 = B.resolve_budget(None, "default", H200)
    assert on_h200.spec == "80GB" and on_h200.source == "default" and on_h200.below_card
    assert on_h200.to_dict()["fraction_of_card"] == pytest.approx(B.H100_80GB_BYTES / H200)


def test_sources_option_then_environment_then_default():
    env = {B.ENV_VAR: "card"}
    assert B.budget_from("70GiB", env, H200).source == B.OPTION
    assert B.budget_from(None, env, H200).bytes == H200 and B.budget_from(None, env, H200).source == B.ENV_VAR
    assert B.budget_from(None, {}, H200).bytes == B.H100_80GB_BYTES


def test_an_explicit_budget_larger_than_the_card_is_refused_the_default_is_reported():
    with pytest.raises(ConfigError, match="larger than this card"):
        B.budget_from(None, {B.ENV_VAR: "200GiB"}, H200)
    small = B.resolve_budget(None, "default", 24 * GiB)  # a small GPU: the h100 tests skip; the default stays
    assert small.exceeds_card
    cpu = B.budget_from("200GiB", {}, None)  # no GPU: no card to compare with
    assert cpu.bytes == 200 * GiB and cpu.card_bytes is None
    assert B.budget_from("card", {}, None).bytes is None


def test_allocator_cap_leaves_room_for_what_the_process_holds_outside_it():
    cap, fraction = B.allocator_cap(B.H100_80GB_BYTES, H200, 600 << 20)
    assert cap == B.H100_80GB_BYTES - (600 << 20)
    assert fraction == pytest.approx(cap / H200)
    with pytest.raises(ConfigError, match="leaves nothing"):
        B.allocator_cap(1 << 20, H200, 600 << 20)


def test_enforcement_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the no-GPU path is checked on CPU machines")
    assert B.enforce(B.budget_from(None, {}, None), torch.device("cpu")) == {"enforced": False,
                                                                            "why": "no CUDA device"}


class FakeConfig:
    def __init__(self, option):
        self.option = option
        self.stash = pytest.Stash()

    def getoption(self, name):
        assert name == B.OPTION
        return self.option


def test_the_plugin_turns_a_bad_budget_into_a_usage_error_at_configure_time(monkeypatch):
    monkeypatch.delenv(B.ENV_VAR, raising=False)
    with pytest.raises(pytest.UsageError, match="cannot read VRAM budget"):
        plugin.pytest_configure(FakeConfig("eighty"))
    good = FakeConfig("64GiB")
    plugin.pytest_configure(good)
    info = plugin.budget_info(good)
    assert info["bytes"] == 64 * GiB and info["source"] == B.OPTION and info["enforcement"] is None


def test_session_counts_reach_the_bar_at_any_budget():
    assert session_counts(B.H100_80GB_BYTES, SESSION, WEIGHTS, bar=1.5) == [8, 32, 50, 64]  # 64 asks for 1.59x
    at_card = session_counts(H200, SESSION, WEIGHTS, bar=1.5)
    assert at_card == [8, 32, 50, 64, 126]
    assert (126 * SESSION + WEIGHTS) / H200 >= 1.6 > (125 * SESSION + WEIGHTS) / H200
    assert session_counts(None, SESSION, WEIGHTS, bar=1.5) == [8, 32, 50, 64]
    for budget in (60 * GiB, 94 * GiB, 139 * GiB, 192 * GiB):
        n = max(session_counts(budget, SESSION, WEIGHTS, bar=1.5))
        assert (n * SESSION + WEIGHTS) / budget >= 1.5


def test_the_swap_pool_holds_what_the_slab_cannot_plus_two_sessions():
    slab, head = 118 * 10**9, 64 << 20
    pool = swap_pool_bytes(126, SESSION, head, slab)
    assert pool % (1 << 20) == 0
    assert pool >= 126 * (SESSION + head) - slab + 2 * SESSION and pool < 104 * GiB  # fits a 125 GiB host
    assert swap_pool_bytes(8, SESSION, head, slab) == math.ceil(2 * SESSION / (1 << 20)) * (1 << 20)
    assert must_evict(32, SESSION, 52 * 10**9, SESSION) and not must_evict(8, SESSION, 52 * 10**9, SESSION)


def test_the_sampler_reports_nvml_and_torch_peaks_against_the_budget():
    from djinn_core.bench.vram import VramSampler

    levels = iter([10.0, 60.0, 30.0] + [30.0] * 1000)
    s = VramSampler(period_s=0.001, memory_probe=lambda: {"nvml_used": next(levels), "torch_reserved": 20.0})
    with s:
        while len(s.timeline) < 3:
            time.sleep(0.001)
    peaks = s.peaks(budget_bytes=80)
    assert peaks["nvml_used_peak_bytes"] == 60.0 and peaks["nvml_used_peak_over_budget"] == 0.75
    assert peaks["torch_reserved_peak_over_budget"] == 0.25
    assert peaks["torch_allocated_peak_bytes"] is None  # a probe that does not see the allocator (the server's)
