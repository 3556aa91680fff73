"""Fusion benchmark: wall time, throughput and memory of fusing a synthetic Llama trio into a Mixtral checkpoint.

`python -m h3fusion.bench.fusion_bench [--quick] [--in-memory] [--mergekit [PATH]]` (or `h3fusion bench --only fusion`):
  1. writes N Llama checkpoints with random weights of a chosen shape (default: Llama-3.2-1B, bf16, 2.47 GB each;
     `--quick`: a tiny shape) into a work folder; the first is also the base;
  2. fuses them in a child process (so its memory is its own): `h3fusion fuse` (the streamed `fuse_to_disk`), with
     `--in-memory` also `fuse_models` + `save_fused_model`, with `--mergekit` also mergekit-moe on the same inputs
     (skipped, with the reason, when mergekit-moe cannot be found);
  3. reports per run: wall time, GB read / written per second (input and output safetensors bytes over the wall
     time; the inputs were just written, so they are read from the page cache), peak RSS (the kernel's high-water
     mark VmHWM), and peak anonymous memory and peak file-mapped memory apart: /proc/<pid>/status
     RssAnon and RssFile sampled every few milliseconds (RssAnon has no high-water mark). Anonymous memory is what
     fusion allocates; file pages are the inputs' mapped, reclaimable page cache. Both are set against the output
     shard size (`--max-shard-size`) and one decoder layer of all experts (N x 3 x H x F weights);
  4. checks that the output holds what it should (an expert tensor of the output = the aligned model's), prints a
     table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

__all__ = ["SHAPES", "collect", "main", "measure_child", "write_synthetic_llama"]

SHAPES = {
    # meta-llama/Llama-3.2-1B: 1.24 B parameters, tied embeddings
    "llama-3.2-1b": dict(vocab=128256, hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, tied=True),
    "quick": dict(vocab=512, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, tied=False),
}
COLUMNS = [
    "impl",
    "wall_s",
    "read_gbps",
    "write_gbps",
    "peak_rss_gb",
    "peak_anon_gb",
    "peak_file_gb",
    "anon_vs_shard_plus_layer",
    "anon_vs_layer_experts",
    "output_gb",
    "check",
    "error",
]
GB = 1e9


@dataclasses.dataclass
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool

    def layer_experts_bytes(self, experts: int, itemsize: int) -> int:
        """One decoder layer of all experts: N x (gate, up, down) of H x F."""
        return experts * 3 * self.hidden * self.intermediate * itemsize


def write_synthetic_llama(folder: str, shape: Shape, dtype, seed: int, max_shard_size="5GB") -> int:
    """A LlamaForCausalLM checkpoint with random weights (normal, std 0.02; norms 1), written tensor by tensor.

    Returns:
        The bytes of its safetensors files.
    """
    import torch
    from transformers import LlamaConfig

    from h3fusion.models.safetensors_stream import TensorSpec, write_sharded

    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = str(dtype).split(".")[1]
    os.makedirs(folder, exist_ok=True)
    cfg.save_pretrained(folder)
    H, F, D = shape.hidden, shape.intermediate, shape.hidden // shape.heads
    specs = {"model.embed_tokens.weight": TensorSpec((shape.vocab, H), dtype)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        specs.update({
            p + "self_attn.q_proj.weight": TensorSpec((H, H), dtype),
            p + "self_attn.k_proj.weight": TensorSpec((shape.kv_heads * D, H), dtype),
            p + "self_attn.v_proj.weight": TensorSpec((shape.kv_heads * D, H), dtype),
            p + "self_attn.o_proj.weight": TensorSpec((H, H), dtype),
            p + "mlp.gate_proj.weight": TensorSpec((F, H), dtype),
            p + "mlp.up_proj.weight": TensorSpec((F, H), dtype),
            p + "mlp.down_proj.weight": TensorSpec((H, F), dtype),
            p + "input_layernorm.weight": TensorSpec((H,), dtype),
            p + "post_attention_layernorm.weight": TensorSpec((H,), dtype),
        })  # fmt: skip
    specs["model.norm.weight"] = TensorSpec((H,), dtype)
    if not shape.tied:
        specs["lm_head.weight"] = TensorSpec((shape.vocab, H), dtype)
    gen = torch.Generator().manual_seed(seed)

    def produce(key):
        spec = specs[key]
        if key.endswith("norm.weight"):
            return torch.ones(spec.shape, dtype=dtype)
        return torch.randn(spec.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)

    write_sharded(folder, specs, produce, max_shard_size=max_shard_size)
    _synthetic_tokenizer(shape.vocab).save_pretrained(folder)  # fusion tools copy the base's tokenizer
    return _safetensors_bytes(folder)


def _synthetic_tokenizer(vocab: int):
    """A word-level tokenizer with `vocab` tokens ("<unk>", "<s>", "</s>", "t3", ...), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _safetensors_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    return out


def measure_child(cmd: list[str], *, env=None, log_path: str | None = None, interval_s: float = 0.005) -> dict:
    """Run `cmd` and measure it: wall time and, sampled from /proc/<pid>/status every `interval_s`, the peak RSS
    (VmHWM, the kernel's high-water mark), peak RssAnon and peak RssFile (no high-water mark: the sampled maximum).

    Returns:
        {"returncode", "wall_s", "peak_rss_bytes", "peak_anon_bytes", "peak_file_bytes", "samples"}.
    """
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        samples = 0
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                now = _status_kb(proc.pid)
            except (OSError, ValueError):  # exiting: /proc entry going away
                now = {}
            for k in peaks:
                peaks[k] = max(peaks[k], now.get(k, 0))
            samples += 1
            time.sleep(interval_s)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    finally:
        if log_path:
            log.close()
    return {
        "returncode": proc.returncode,
        "wall_s": wall,
        # VmHWM is this process image's own high-water mark (reset at exec); wait4's ru_maxrss is not used: it keeps
        # the parent's RSS at fork time across the exec, so a small child would report the parent's size
        "peak_rss_bytes": peaks["VmHWM"] * 1024,
        "peak_anon_bytes": peaks["RssAnon"] * 1024,
        "peak_file_bytes": peaks["RssFile"] * 1024,
        "samples": samples,
    }


def _child_env() -> dict:
    # the child imports the same h3fusion as this process (a source checkout or the installed package)
    import h3fusion

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(h3fusion.__file__)))
    paths = [package_root, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS="1")


_IMPORTS = "import torch, transformers, safetensors, h3fusion.models.fuse_stream, h3fusion.cli.fuse"
_IN_MEMORY = """
import sys, torch
from h3fusion.models.fuse import fuse_models, save_fused_model
base, out, shard, *experts = sys.argv[1:]
torch.manual_seed(0)
model = fuse_models(base, dict(e.split("=", 1) for e in experts), top_k=2, progress=False)
save_fused_model(model, out, base=base, max_shard_size=shard)
"""


def _mergekit_config(path: str, base: str, experts: dict[str, str], dtype: str) -> None:
    lines = [f"base_model: {base}", "gate_mode: random", f"dtype: {dtype}", "experts:"]
    for name, folder in experts.items():
        lines += [f"  - source_model: {folder}", "    positive_prompts:", f"      - {name}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _find_mergekit(spec: str | None) -> str | None:
    if spec and spec != "auto":
        return spec if os.path.isfile(spec) and os.access(spec, os.X_OK) else None
    return shutil.which("mergekit-moe")


def _check_expert(out: str, experts: dict[str, str]) -> str:
    """'ok' when the output's expert 1 of the last layer (its down projection) is the second aligned model's.

    Reads either saved Mixtral layout: one tensor per expert (`block_sparse_moe.experts.1.w2.weight`, transformers'
    save_pretrained and ours) or the stacked one (`mlp.experts.down_proj[1]`, written by mergekit-moe 0.1.5).
    """
    import torch

    from h3fusion.models.checkpoint_io import CheckpointWeights

    src, fused = CheckpointWeights(experts[list(experts)[1]]), CheckpointWeights(out)
    layer = src.config.num_hidden_layers - 1
    per_expert = f"model.layers.{layer}.block_sparse_moe.experts.1.w2.weight"
    stacked = f"model.layers.{layer}.mlp.experts.down_proj"
    if fused.has(per_expert):
        got = fused.get(per_expert)
    elif fused.has(stacked):
        got = fused.get(stacked)[1]
    else:
        return f"neither {per_expert} nor {stacked}"
    same = torch.equal(got, src.get(f"model.layers.{layer}.mlp.down_proj.weight"))
    return "ok" if same else "expert 1 differs from its source"


def run_bench(args: argparse.Namespace) -> dict:
    """Write the inputs, run each fusion, return the report (also printed and written to args.out)."""
    import torch

    from h3fusion.bench.common import format_table

    shape = Shape(**SHAPES["quick" if args.quick else args.shape])
    for field in ("vocab", "hidden", "intermediate", "layers"):
        if getattr(args, field, None):
            setattr(shape, field, getattr(args, field))
    dtype = getattr(torch, args.dtype)
    itemsize = dtype.itemsize
    work = args.workdir or tempfile.mkdtemp(prefix="h3fusion-fusion-bench-")
    os.makedirs(work, exist_ok=True)
    names = [chr(ord("a") + i) for i in range(args.experts)]
    report = {
        "bench": "fusion",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "shape": dataclasses.asdict(shape),
        "dtype": args.dtype,
        "experts": args.experts,
        "max_shard_size": args.max_shard_size,
        "router_init": args.router_init,
        "workdir": work,
        "results": [],
    }
    try:
        t0 = time.perf_counter()
        inputs = {}
        input_bytes = 0
        for i, name in enumerate(names):
            inputs[name] = os.path.join(work, f"in-{name}")
            if not os.path.isfile(os.path.join(inputs[name], "config.json")):
                write_synthetic_llama(inputs[name], shape, dtype, seed=i)
            input_bytes += _safetensors_bytes(inputs[name])
        base = inputs[names[0]]
        report["input_gb"] = input_bytes / GB
        report["write_inputs_s"] = time.perf_counter() - t0
        shard_bytes = _parse_size(args.max_shard_size)
        layer_bytes = shape.layer_experts_bytes(args.experts, itemsize)
        report["layer_experts_gb"] = layer_bytes / GB
        report["shard_gb"] = shard_bytes / GB
        print(
            f"inputs: {args.experts} x {input_bytes / args.experts / GB:.2f} GB ({args.dtype}) in {work}; one layer of "
            f"experts {layer_bytes / GB:.3f} GB; max shard {shard_bytes / GB:.3f} GB",
            flush=True,
        )
        env = _child_env()
        experts_args = [f"{n}={inputs[n]}" for n in names]
        router = ["--router-init", "random"]
        if args.router_init == "prototypes":
            prompts = os.path.join(work, "prompts.json")
            words = {n: [" ".join(f"t{3 + 7 * i + j}" for j in range(16))] for i, n in enumerate(names)}
            with open(prompts, "w") as f:  # one 16-token prompt per expert, in the synthetic tokenizer's words
                f.write(json.dumps(words))
            if args.in_memory or args.mergekit is not None:
                print("--router-init prototypes: only our streamed fusion runs (the comparisons use random routers)")
            router = ["--router-init", "prototypes", "--prototype-prompts", prompts]
        runs = {
            # what the interpreter, torch and transformers hold before any fusion work (libraries are file pages)
            "baseline: import only": [sys.executable, "-c", _IMPORTS],
            "h3fusion fuse (streamed)": [sys.executable, "-m", "h3fusion", "fuse", "--base", base, "--top-k", "2",
                                         "--seed", "0", "--no-progress", "--max-shard-size", str(args.max_shard_size),
                                         *router,
                                         *sum((["--expert", e] for e in experts_args), []), "--out", "{out}"],
        }  # fmt: skip
        if args.in_memory and args.router_init == "random":
            runs["fuse_models + save_fused_model"] = [
                sys.executable, "-c", _IN_MEMORY, base, "{out}", str(args.max_shard_size), *experts_args
            ]  # fmt: skip
        if args.mergekit is not None and args.router_init == "random":
            mk = _find_mergekit(args.mergekit)
            if mk is None:
                print(f"mergekit-moe: skipped (not found: {args.mergekit})", flush=True)
                report["results"].append({"impl": "mergekit-moe", "error": f"skipped: not found ({args.mergekit})"})
            else:
                cfg_path = os.path.join(work, "mergekit-moe.yml")
                _mergekit_config(cfg_path, base, inputs, args.dtype)
                # mergekit's shard size counts parameters: the same bytes per shard as ours
                params_per_shard = str(max(1, shard_bytes // itemsize))
                runs["mergekit-moe"] = [mk, cfg_path, "{out}", "--out-shard-size", params_per_shard]
        for impl, cmd in runs.items():
            out = os.path.join(work, "out-" + "".join(c if c.isalnum() else "-" for c in impl))
            shutil.rmtree(out, ignore_errors=True)
            log = out + ".log"
            m = measure_child([c.replace("{out}", out) for c in cmd], env=env, log_path=log)
            row = {"impl": impl, "wall_s": m["wall_s"], "returncode": m["returncode"], "log": log}
            if impl.startswith("baseline"):
                pass
            elif m["returncode"] != 0 or not os.path.isdir(out):
                with open(log, errors="replace") as f:
                    row["error"] = f"exit {m['returncode']}: " + " | ".join(f.read().strip().splitlines()[-3:])
            else:
                out_bytes = _safetensors_bytes(out)
                row.update(
                    read_gbps=input_bytes / GB / m["wall_s"],
                    write_gbps=out_bytes / GB / m["wall_s"],
                    output_gb=out_bytes / GB,
                    check=_check_expert(out, {n: inputs[n] for n in names}),
                )
            row.update(
                peak_rss_gb=m["peak_rss_bytes"] / GB,
                peak_anon_gb=m["peak_anon_bytes"] / GB,
                peak_file_gb=m["peak_file_bytes"] / GB,
                anon_vs_shard_plus_layer=m["peak_anon_bytes"] / (shard_bytes + layer_bytes),
                anon_vs_layer_experts=m["peak_anon_bytes"] / layer_bytes,
                samples=m["samples"],
            )
            report["results"].append(row)
            print(f"  {impl}: {m['wall_s']:.1f} s, exit {m['returncode']}", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        columns = [c for c in COLUMNS if any(c in r for r in report["results"])]
        print("\n[fusion]\n" + format_table(report["results"], columns))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return report


def _parse_size(size) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    return size if isinstance(size, int) else parse_size_to_int(size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m h3fusion.bench.fusion_bench`."""
    from h3fusion.cli.common import max_shard_size, positive_int

    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b", help="default %(default)s")
    parser.add_argument("--quick", action="store_true", help="the tiny 'quick' shape (seconds; for tests)")
    parser.add_argument("--vocab", type=positive_int, help="override the shape's vocabulary size")
    parser.add_argument("--hidden", type=positive_int, help="override the shape's hidden size")
    parser.add_argument("--intermediate", type=positive_int, help="override the shape's MLP size")
    parser.add_argument("--layers", type=positive_int, help="override the shape's number of layers")
    parser.add_argument("--experts", type=positive_int, default=3, help="aligned models (default 3; the first = base)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--max-shard-size", type=max_shard_size, default="5GB", help="output shard size (default 5GB)")
    parser.add_argument(
        "--router-init", choices=("random", "prototypes"), default="random",
        help="prototypes: one prompt per expert run through the base (ours only; mergekit-moe keeps random routers)",
    )  # fmt: skip
    parser.add_argument("--in-memory", action="store_true", help="also run fuse_models + save_fused_model")
    parser.add_argument(
        "--mergekit", nargs="?", const="auto", default=None, metavar="PATH",
        help="also run mergekit-moe (PATH to the executable; default: mergekit-moe on PATH); skipped when absent",
    )  # fmt: skip
    parser.add_argument("--workdir", help="folder for inputs and outputs (kept; default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    parser.add_argument("--out", default="fusion_bench.json", help="JSON report path (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    prog = "python -m h3fusion.bench.fusion_bench"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from h3fusion.utils.files import OutputDirError, atomic_write_json, check_output_file

    try:
        check_output_file(args.out, "--out")
    except OutputDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run_bench(args)
    atomic_write_json(args.out, report, indent=1)
    print(f"\nwrote {args.out}")
    failed = [r for r in report["results"] if r.get("error") and not r["error"].startswith("skipped")]
    return 1 if failed else 0


def collect(device: str, quick: bool) -> list[dict]:
    """For `h3fusion bench --only fusion` (CPU work whatever the device): our streamed fusion at the default shape,
    or the quick shape with `--quick`; rows as in the JSON report."""
    args = argparse.Namespace(
        shape="llama-3.2-1b", quick=quick, vocab=None, hidden=None, intermediate=None, layers=None, experts=3,
        dtype="bfloat16", max_shard_size="5GB" if not quick else "200KB", in_memory=False, mergekit=None,
        router_init="random",
        workdir=None, keep=False,
    )  # fmt: skip
    report = run_bench(args)
    return [{"case": f"{report['shape']['hidden']}h x {report['shape']['layers']}L", **r} for r in report["results"]]


if __name__ == "__main__":
    sys.exit(main())
