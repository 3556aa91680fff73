"""Benchmarks: pytest-benchmark microbenchmarks (`pytest benchmarks/`), the GPU check (`gpu_check.sh`) and committed
results. The table/JSON runner is in the package: `h3fusion bench` / `python -m h3fusion.bench`."""
