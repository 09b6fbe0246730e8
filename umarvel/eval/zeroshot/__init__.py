"""Zero-shot benchmarks (method spec 6.3): typed readers, metrics and a tiny fixture generator."""
