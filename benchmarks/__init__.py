"""Scripts that regenerate every table and plot in docs/RESULTS.md (see benchmarks/README.md)."""
