import pytest

from djinn_core.bench.claims import ClaimFailed, ClaimRecorder, evaluate, make_record
from djinn_core.errors import ConfigError
from djinn_core.bench.timing import TimingStats

pytestmark = pytest.mark.cpu


class FakeBenchmark:
    def __init__(self):
        self.extra_info = {}
        self.pedantic_calls = 0

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        self.pedantic_calls += 1
        return fn()


def test_bandwidth_claim_is_recomputed_from_bytes_and_samples():
    rec = make_record("swap_out", kind="bandwidth", method="djinn", bound=0.9, op=">=",
                      timing=TimingStats((20.0, 25.0, 30.0)).to_dict(), bytes_moved=10**9, ceiling_GBps=50.0)
    ev = evaluate(rec)
    assert ev.measured == pytest.approx(40.0)  # 1e9 B / 25 ms
    assert ev.ratio == pytest.approx(0.8)
    assert ev.passed is False and rec["passed"] is False


def test_ratio_claim_uses_medians_of_timings():
    rec = make_record("resume", kind="ratio", method="djinn", bound=1.25, op="<=",
                      timing=TimingStats((1.0, 0.5, 0.6)).to_dict(),
                      reference_timing=TimingStats((0.4, 0.5, 0.45)).to_dict())
    assert evaluate(rec).ratio == pytest.approx(0.6 / 0.45)
    assert rec["passed"] is False


def test_a_tampered_stored_verdict_does_not_survive_re_evaluation():
    rec = make_record("c", kind="check", method="m", bound=0, op="==", measured=3.0)
    rec["passed"] = True
    assert evaluate(rec).passed is False


@pytest.mark.parametrize("kw", [dict(claim="bad slug!"), dict(kind="vibes"), dict(op=">>"), dict(bound="high")])
def test_make_record_rejects_malformed_claims(kw):
    args = dict(claim="ok", kind="check", method="m", bound=1.0, op="<=", measured=0.5)
    args.update(kw)
    with pytest.raises(ConfigError):
        make_record(args.pop("claim"), **args)


def test_recorder_writes_extra_info_before_it_asserts():
    bench = FakeBenchmark()
    rec = ClaimRecorder(bench)
    assert rec.measure(lambda: 42) == 42 and rec.measure(lambda: 43) == 43
    assert bench.pedantic_calls == 1
    rec.check("tokens_equal", method="djinn", value=0, bound=0, op="==", params={"layer": 10})
    with pytest.raises(ClaimFailed, match="FAILS"):
        rec.bandwidth("swap_in", method="djinn", timing=TimingStats((100.0,)), bytes_moved=10**9,
                      ceiling_GBps=50.0, bound=0.9, params={"sessions": 1})
    info = bench.extra_info
    assert [c["claim"] for c in info["claims"]] == ["tokens_equal", "swap_in"]
    assert info["claim"] == "swap_in" and info["ceiling_GBps"] == 50.0 and info["sessions"] == 1
    assert info["passed"] is False and info["bytes_moved"] == 10**9


def test_recorder_rejects_nonsense_bandwidth_inputs():
    rec = ClaimRecorder(FakeBenchmark())
    with pytest.raises(ConfigError):
        rec.bandwidth("x", method="m", timing=TimingStats((1.0,)), bytes_moved=-1, ceiling_GBps=1.0, bound=1)
    with pytest.raises(ConfigError):
        rec.bandwidth("x", method="m", timing=TimingStats((1.0,)), bytes_moved=1, ceiling_GBps=0.0, bound=1)


def test_a_claim_recorded_without_measure_still_runs_the_benchmark_so_it_is_saved():
    bench = FakeBenchmark()
    ClaimRecorder(bench).check("c", method="m", value=1, bound=1, op="==")
    assert bench.pedantic_calls == 1
