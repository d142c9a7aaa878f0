"""Every precondition kind fails the test when its experiment did not happen, and stays in the JSON beside the claims,
re-checkable by a report and the CI gate."""

import pytest

from djinn_core.bench import preconditions as pre
from djinn_core.bench.claims import ClaimFailed, ClaimRecorder, PreconditionFailed, evaluate
from djinn_core.bench.report import claims_table, claim_rows
from djinn_core.bench.timing import TimingStats

pytestmark = pytest.mark.cpu
GiB = 2**30


class FakeBenchmark:
    def __init__(self):
        self.extra_info = {}

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        return fn()


# kind -> (call that does not hold, call that holds)
CASES = {
    "oversubscription": (lambda c: pre.oversubscribed(c, demand_bytes=80 * GiB, budget_bytes=79 * GiB),
                         lambda c: pre.oversubscribed(c, demand_bytes=126 * GiB, budget_bytes=79 * GiB)),
    "oversubscription_without_budget": (lambda c: pre.oversubscribed(c, demand_bytes=126 * GiB, budget_bytes=None),
                                        None),
    "evictions": (lambda c: pre.evicted(c, evictions=0), lambda c: pre.evicted(c, evictions=163)),
    "swaps_measured": (lambda c: pre.swaps_measured(c, direction="in", swaps=0),
                       lambda c: pre.swaps_measured(c, direction="in", swaps=64)),
    "swaps_bracketed": (lambda c: pre.swaps_bracketed(c, direction="in", bracketed=125, swaps=126),
                        lambda c: pre.swaps_bracketed(c, direction="in", bracketed=126, swaps=126)),
    "swaps_bracketed_none": (lambda c: pre.swaps_bracketed(c, direction="out", bracketed=0, swaps=0), None),
    "peer_ran_timing": (lambda c: pre.peer_ran(c, peer="deepspeed ZeRO-3", timing=TimingStats((0.0, 0.0))),
                        lambda c: pre.peer_ran(c, peer="deepspeed ZeRO-3", timing=TimingStats((210.0, 205.0)))),
    "peer_ran_value": (lambda c: pre.peer_ran(c, peer="eager", value=0),
                       lambda c: pre.peer_ran(c, peer="eager", value=25)),
    "peer_ran_missing": (lambda c: pre.peer_ran(c, peer="eager"), None),
    "bytes_moved": (lambda c: pre.bytes_moved(c, nbytes=0, what="bytes streamed"),
                    lambda c: pre.bytes_moved(c, nbytes=10**9, what="bytes streamed")),
    "at_least": (lambda c: pre.at_least(c, "host_ram_pins_the_swap_pool", value=90 * GiB, bound=101 * GiB,
                                        unit="bytes", what="host RAM for the pool"),
                 lambda c: pre.at_least(c, "host_ram_pins_the_swap_pool", value=120 * GiB, bound=101 * GiB,
                                        unit="bytes", what="host RAM for the pool")),
    "every_pair_measured": (lambda c: pre.every_pair_measured(c, "device_spans_measured", measured=719, pairs=720,
                                                              what="pairs with both device spans"),
                            lambda c: pre.every_pair_measured(c, "device_spans_measured", measured=720, pairs=720,
                                                              what="pairs with both device spans")),
    "every_pair_measured_no_pairs": (lambda c: pre.every_pair_measured(c, "device_spans_measured", measured=0,
                                                                       pairs=0, what="pairs with both device spans"),
                                     None),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_precondition_below_its_bar_fails_the_test_and_is_recorded(kind):
    bench = FakeBenchmark()
    rec = ClaimRecorder(bench)
    with pytest.raises(PreconditionFailed, match="did not happen") as err:
        CASES[kind][0](rec)
    assert isinstance(err.value, ClaimFailed) and isinstance(err.value, AssertionError)  # a failure, not a skip
    (stored,) = bench.extra_info["claims"]
    assert stored["kind"] == "precondition" and stored["passed"] is False
    assert evaluate(stored).passed is False  # re-checked from its raw value, as the CI gate does


@pytest.mark.parametrize("kind", sorted(k for k, (_, ok) in CASES.items() if ok))
def test_a_precondition_at_its_bar_passes_and_is_recorded(kind):
    bench = FakeBenchmark()
    rec = CASES[kind][1](ClaimRecorder(bench))
    assert rec["passed"] is True and bench.extra_info["claims"] == [rec]


def test_a_report_lists_preconditions_beside_the_claims():
    bench = FakeBenchmark()
    c = ClaimRecorder(bench)
    pre.evicted(c, evictions=3, params={"sessions": 64})
    c.check("sessions_completed_fraction", method="djinn", value=1.0, bound=1.0, op="==", unit="fraction",
            params={"sessions": 64})
    data = {"benchmarks": [{"name": "t", "fullname": "t.py::t", "extra_info": bench.extra_info}]}
    rows = claim_rows(data)
    assert [r.record["kind"] for r in rows] == ["precondition", "check"] and all(r.passed for r in rows)
    table = claims_table(rows)
    assert "| evictions | precondition: sessions evicted from VRAM to the host pool during the run, in evictions" \
           in table and "| n/a | > 0 evictions | pass |" in table
