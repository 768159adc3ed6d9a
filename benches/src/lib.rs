//! Shared measurement helpers for the benchmarks (percentiles, formatting).
