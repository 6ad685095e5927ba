"""Instrumentation shared by the benchmarks and the tests (compilation counting)."""
