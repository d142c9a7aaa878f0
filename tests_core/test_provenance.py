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


def test_a_gpus_pci_address_names_domain_bus_and_device():
    """Two GPUs of one VM can share a bus (both on bus 0 on the lent x2): the address tells them apart."""
    from types import SimpleNamespace

    from djinn_core.bench.provenance import pci_address

    first = SimpleNamespace(pci_domain_id=0, pci_bus_id=0, pci_device_id=6)
    second = SimpleNamespace(pci_domain_id=0, pci_bus_id=0, pci_device_id=7)
    assert pci_address(first) == "0000:00:06"
    assert pci_address(second) == "0000:00:07"
    assert pci_address(SimpleNamespace(pci_bus_id=0x1a)) == "0000:1a:00"
    assert pci_address(SimpleNamespace()) is None
