"""The experiments behind the claims: importable code that sets up, runs and times each experiment.

One module per experiment. The claims tests (``tests_exp2/``, ``tests_exp3/``) import these, give them the paper's
parameters and assert the results through the ``claim`` fixture; the probes (:mod:`djinn_core.bench.probes`) reuse
them for diagnostics. Nothing here asserts a claim or picks its bound.
"""
