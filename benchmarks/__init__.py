"""Scripts that regenerate every table and plot in the README (see benchmarks/README.md)."""
