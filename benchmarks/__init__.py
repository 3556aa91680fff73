"""Benchmarks: pytest-benchmark microbenchmarks (`pytest benchmarks/`) and the table/JSON runner (`benchmarks.run`)."""
