"""Measurement: timing, copy ceilings, VRAM sampling, claim records, reports and provenance."""
