"""Helpers shared across the package: padded sizes (`buckets`) and compilation counting for the
benchmarks and tests (`compile_count`)."""
