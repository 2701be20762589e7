"""Benchmarks users can trust: every method measured in one process on the same inputs."""

from .specbench import METHODS, SpecBenchConfig, run_spec_bench

__all__ = ["METHODS", "SpecBenchConfig", "run_spec_bench"]
