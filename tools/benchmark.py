"""Benchmarks (same program as the ``tfmstep-benchmark`` console script; flags in tfmstep/cli/benchmark.py)."""

from tfmstep.cli.benchmark import run

if __name__ == "__main__":
    run()
