"""Benchmarks, sweeps and reproductions: `python -m experiments.NAME` from
the repository root (their results are in `experiments/results/`)."""
