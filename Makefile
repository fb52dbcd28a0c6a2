# Benchmarks regenerate docs/results/ (see benchmarks/README.md).
.PHONY: bench bench-quick test
bench:
	python -m benchmarks.run_all
bench-quick:
	python -m benchmarks.run_all --quick
test:
	python -m pytest -q
