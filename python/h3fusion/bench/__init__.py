"""The kernel benchmarks users run from the installed package: `h3fusion bench` or `python -m h3fusion.bench`.

One module per benchmark (`moe_bench`, `logprob_bench`, `hf_moe_bench`; `gpu_bench` for the GPU check), each exposing
`collect(device, quick) -> list[dict]`, shared timing helpers in `common`, and `runner`, which prints a table per
benchmark and writes JSON after every one. Imported only by those commands (they load torch and transformers).
"""
