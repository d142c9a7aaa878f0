"""Measurement: timing, copy ceilings, VRAM sampling, claim records, reports, provenance and suite profiles; the
experiments behind the claims (:mod:`djinn_core.bench.experiments`) and the diagnostic probes
(:mod:`djinn_core.bench.probes`, ``djinn probe NAME``). Importing this package imports no torch."""
