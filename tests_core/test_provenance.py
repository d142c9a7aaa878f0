"""Provenance of results written outside pytest-benchmark (djinn_core.bench.provenance.result_provenance)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.cpu


def test_results_outside_pytest_benchmark_carry_the_commit_the_caller_recorded(monkeypatch):
    """A probe's JSON or a rank's file: the machine's facts and the commit, from DJINN_GIT_COMMIT where the tree was
    sent to a lent machine (dirty only from 1/0, else unknown), else from git."""
    from djinn_core.bench.provenance import commit_facts, result_provenance

    monkeypatch.setenv("DJINN_GIT_COMMIT", "abc123")
    monkeypatch.setenv("DJINN_GIT_DIRTY", "0")
    p = result_provenance()
    assert p["commit_info"] == {"id": "abc123", "dirty": False, "source": "DJINN_GIT_COMMIT"}
    assert p["machine_info"]["djinn"]["torch_version"]
    monkeypatch.setenv("DJINN_GIT_DIRTY", "maybe")
    assert commit_facts()["dirty"] == "unknown"
    monkeypatch.delenv("DJINN_GIT_COMMIT")
    assert commit_facts()["source"] in ("git", "none")
