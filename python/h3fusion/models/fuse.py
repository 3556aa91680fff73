"""Build the H3Fusion MoE: N aligned Llama/Mistral-family models -> one `MixtralForCausalLM` (design.md §3).

In every decoder layer expert i is aligned model i's MLP (gate and up stacked into `gate_up_proj[i]`, down into
`down_proj[i]`), each expert written from its own source tensor (never one shared tensor: design.md §3 defect (a)).
Attention, norms, embeddings and lm_head come from the base or their element-wise mean over the aligned models.
Inputs are read one layer at a time (see `checkpoint_io`), so N large checkpoints are never all in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from h3fusion.utils.files import check_output_dir, staged_output_dir

from .checkpoint_io import WeightSource, open_source
from .construction import no_init_weights as _no_init
from .lora_experts import lora_experts_modules
from .lora_merge import LoraAdapterWeights
from .prototypes import prototype_rows
from .shared_format import is_shared_model, write_shared_model

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
ROUTER_INITS = ("random", "zeros", "prototypes")
ATTENTION_MODES = ("base", "mean")
EXPERTS_LAYOUTS = ("materialised", "shared")
# Compared in this order; the first difference is the one reported.
_MATCH_FIELDS = (
    "model_type",
    "hidden_size",
    "vocab_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "tie_word_embeddings",
)


def check_compatible(base: WeightSource, aligned: Mapping[str, WeightSource]) -> None:
    """Refuse bases Mixtral cannot represent and aligned models that differ from the base.

    Raises:
        ValueError: naming the unsupported base feature, or the aligned model and its first differing field.
    """
    cfg = base.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"base model_type {cfg.model_type!r} is not supported: fusion into Mixtral needs a Llama/Mistral-family "
            f"model (one of {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            raise ValueError(f"base has {flag}=True; Mixtral has no such biases, so it cannot be fused")
    for name, src in aligned.items():
        for field in _MATCH_FIELDS:
            a, b = getattr(cfg, field, None), getattr(src.config, field, None)
            if a != b:
                raise ValueError(f"aligned model {name!r} differs from the base in {field}: base {a!r}, {name!r} {b!r}")


def mixtral_config(base_config, names: Sequence[str], top_k: int, record: dict):
    """A `MixtralConfig` with the base's attention / RoPE / norm settings and one expert per aligned model."""
    from transformers import MixtralConfig

    c = base_config
    kwargs = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        sliding_window=getattr(c, "sliding_window", None),
        attention_dropout=getattr(c, "attention_dropout", 0.0),
        num_local_experts=len(names),
        num_experts_per_tok=top_k,
        h3fusion=record,
    )
    # RoPE must be the base's exactly (Mixtral's default theta differs from Llama's).
    rope = getattr(c, "rope_parameters", None)
    if rope is not None:
        kwargs["rope_parameters"] = dict(rope)
    else:  # transformers < 5 style
        kwargs["rope_theta"] = getattr(c, "rope_theta", 10000.0)
        if getattr(c, "rope_scaling", None):
            kwargs["rope_scaling"] = dict(c.rope_scaling)
    cfg = MixtralConfig(**kwargs)
    cfg.architectures = ["MixtralForCausalLM"]
    return cfg


def _shared(key: str, base: WeightSource, aligned: list[WeightSource], attention: str) -> torch.Tensor:
    if attention == "base":
        return base.get(key)
    acc = None
    for src in aligned:
        t = src.get(key).float()
        acc = t.clone() if acc is None else acc.add_(t)
    return acc / len(aligned)


def _copy_(param: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if param.shape != value.shape:
        raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit the fused model's {tuple(param.shape)}")
    param.copy_(value.to(dtype=param.dtype, device=param.device))


@dataclasses.dataclass
class FusionInputs:
    """The checked inputs of a fusion: sources opened, the fused config built (shared by `fuse_models` and
    `fuse_to_disk`, so both build the same model)."""

    names: list[str]
    base_src: WeightSource
    sources: list[WeightSource]
    config: Any  # MixtralConfig, with config.h3fusion = the fusion record
    dtype: torch.dtype
    attention: str
    router_init: str

    def input_paths(self, base: Any, aligned: Mapping[str, Any]) -> list[Any]:
        """The folders the fusion reads (an output must not overlap them)."""
        paths = [base, *aligned.values(), self.config.h3fusion.get("base"), *self.config.h3fusion["sources"].values()]
        return [p for p in paths if isinstance(p, (str, os.PathLike)) and os.path.exists(p)]


def prepare_fusion(
    base: Any,
    aligned: Mapping[str, Any],
    *,
    top_k: int,
    attention: str,
    router_init: str,
    prototype_prompts: Mapping[str, Sequence[Any]] | None,
    dtype: torch.dtype | None,
    allow_non_mlp_adapter: bool,
) -> FusionInputs:
    """Check the options (see `fuse_models`), open every source, check they fit together, build the fused config.

    Raises:
        ValueError: as `fuse_models`.
    """
    if not isinstance(aligned, Mapping) or len(aligned) == 0:
        raise ValueError("aligned must be a non-empty mapping expert name -> model / checkpoint dir / adapter dir")
    names = [str(n) for n in aligned]
    if any(not n for n in names):
        raise ValueError("aligned: expert names must be non-empty")
    if not 1 <= int(top_k) <= len(names):
        raise ValueError(f"top_k must be in [1, {len(names)}] (the number of experts), got {top_k}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {router_init!r}")
    if router_init == "prototypes":
        check_prototype_prompts(prototype_prompts, names)

    base_src = open_source(base, name="base")
    sources = [open_source(spec, base_src, name=n) for n, spec in aligned.items()]
    check_compatible(base_src, dict(zip(names, sources, strict=True)))
    check_adapters(dict(zip(names, sources, strict=True)), attention, allow_non_mlp_adapter)

    record = {
        "experts": names,
        "sources": {n: s.description for n, s in zip(names, sources, strict=True)},
        "base": base_src.description,
        "attention": attention,
        "router_init": router_init,
        "top_k": int(top_k),
    }
    config = mixtral_config(base_src.config, names, int(top_k), record)
    return FusionInputs(names, base_src, sources, config, dtype or base_src.dtype(), attention, router_init)


def shared_weight(inputs: FusionInputs, key: str) -> torch.Tensor:
    """A weight outside the experts and routers (attention, norms, embeddings, lm_head) in the fused dtype: the
    base's, or with attention="mean" the element-wise fp32 mean over the aligned models."""
    return _shared(key, inputs.base_src, inputs.sources, inputs.attention).to(inputs.dtype)


def expert_weight(inputs: FusionInputs, expert: int, layer: int, proj: str, shape: Sequence[int]) -> torch.Tensor:
    """Expert `expert`'s `proj` ("gate_proj", "up_proj", "down_proj") of decoder layer `layer`, in the fused dtype.

    Raises:
        ValueError: the aligned model's tensor does not have `shape` (naming the expert and the weight).
    """
    key = f"model.layers.{layer}.mlp.{proj}.weight"
    value = inputs.sources[expert].get(key)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{inputs.names[expert]}: {key}: shape {tuple(value.shape)} does not fit the fused model's {tuple(shape)}"
        )
    return value.to(inputs.dtype)


def router_weights(
    inputs: FusionInputs, base: Any, prototype_prompts: Mapping[str, Sequence[Any]] | None, tokenizer: Any = None
) -> list[torch.Tensor]:
    """The initial router weight of every decoder layer, [N, H] in the fused dtype (design.md §3 router init).

    "random" draws one normal(0, initializer_range) matrix per layer, in layer order, from torch's global generator
    (so a seed fixes them); "zeros"; "prototypes" computes `prototype_rows` with the base.
    """
    cfg = inputs.config
    shape = (len(inputs.names), cfg.hidden_size)
    if inputs.router_init == "random":
        return [
            torch.empty(shape, dtype=inputs.dtype).normal_(0.0, cfg.initializer_range)
            for _ in range(cfg.num_hidden_layers)
        ]
    if inputs.router_init == "zeros":
        return [torch.zeros(shape, dtype=inputs.dtype) for _ in range(cfg.num_hidden_layers)]
    rows = prototype_rows(base, inputs.base_src, inputs.names, prototype_prompts, tokenizer)
    return [r.to(inputs.dtype) for r in rows]


@torch.no_grad()
def fuse_models(
    base: Any,
    aligned: Mapping[str, Any],
    *,
    top_k: int = 2,
    attention: str = "base",
    router_init: str = "random",
    prototype_prompts: Mapping[str, Sequence[Any]] | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    allow_non_mlp_adapter: bool = False,
    experts: str = "materialised",
    delta_rank: int | None = None,
):
    """Fuse a base model and N aligned models of the same architecture into a `MixtralForCausalLM`.

    The whole fused model is built in memory; `fuse_to_disk` writes the same checkpoint as this function followed
    by `save_fused_model`, holding only a few tensors at a time.

    Args:
        base: the base model: a loaded `PreTrainedModel` or a checkpoint directory (safetensors).
        aligned: expert name -> aligned model: a loaded model, a checkpoint directory, or a PEFT LoRA adapter
            directory on `base`. Its order is the expert order (expert i = the i-th entry's MLP in every layer).
        top_k: experts per token, 1 <= top_k <= N.
        attention: "base" takes attention, norms, embeddings and lm_head from the base; "mean" takes their
            element-wise mean over the aligned models.
        router_init: "random" (normal, std = initializer_range), "zeros" (uniform routing), or "prototypes":
            row i of layer l's router = the unit-normalised mean hidden state at layer l's MLP input of
            `prototype_prompts[name_i]`, run through the base model (streamed layer by layer from its checkpoint
            when `base` is a directory; see `h3fusion.models.prototypes`).
        prototype_prompts: expert name -> a few prompts (strings, or token-id lists / 1-D tensors); for "prototypes".
        tokenizer: tokenizes string prompts; default: the tokenizer saved with `base` when it is a directory.
        dtype: the fused model's dtype; default: the base's.
        progress: show a per-layer progress bar.
        allow_non_mlp_adapter: a LoRA adapter's changes outside the MLPs (attention, norms, embeddings, lm_head)
            are dropped with attention="base" (only its MLP becomes the expert). By default such an adapter is
            refused, and so is an adapter that changes no MLP at all (its expert would equal the base MLP); with
            True, fusion goes on and a warning lists the dropped modules.
        experts: "materialised" (every expert a full FFN: a plain Mixtral) or "shared" (design.md §11: each layer
            keeps the base FFN once plus every expert's LoRA factors, in `LoRAExperts`; every aligned model must be
            a LoRA adapter of the base, unless `delta_rank` is given). Save it with `save_fused_model`, load it with
            `h3fusion.load_fused_model`, make it a plain Mixtral with `h3fusion export`.
        delta_rank: with experts="shared", full-weight aligned models enter as the rank-`delta_rank` truncated SVD
            of their delta from the base, per projection (gate/up stacked, down); the relative reconstruction errors
            are recorded in `config.h3fusion["shared_experts"]["delta_relative_error"]`.

    Returns:
        A `MixtralForCausalLM` (eval mode) whose `config.h3fusion` records the expert names, sources and options.

    Raises:
        ValueError: bad options, unsupported base architecture, an aligned model whose config differs from the
            base's (the message names the first difference), or an adapter whose changes fusion would drop.
    """
    from transformers import MixtralForCausalLM

    if experts not in EXPERTS_LAYOUTS:
        raise ValueError(f"experts must be one of {EXPERTS_LAYOUTS}, got {experts!r}")
    if delta_rank is not None and experts != "shared":
        raise ValueError("delta_rank applies to experts='shared' only")
    inputs = prepare_fusion(
        base, aligned, top_k=top_k, attention=attention, router_init=router_init,
        prototype_prompts=prototype_prompts, dtype=dtype, allow_non_mlp_adapter=allow_non_mlp_adapter,
    )  # fmt: skip
    config, dtype = inputs.config, inputs.dtype
    plan = None
    if experts == "shared":  # (a record without experts_layout is a materialised fusion, as fuse_to_disk writes)
        config.h3fusion["experts_layout"] = "shared"
        from .shared_experts import SharedExpertsPlan, build_shared_model

        plan = SharedExpertsPlan(inputs.names, inputs.sources, inputs.base_src, delta_rank)
        model = build_shared_model(config, plan.rank, dtype)
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # allocate in the target dtype directly (no fp32 copy of a large model)
        try:
            with _no_init():
                model = MixtralForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        model.to(dtype)
        # RoPE's inverse frequencies stay fp32, as from_pretrained keeps them: `to(dtype)` (and the default dtype
        # above) made them bf16/fp16, and the model in memory then computed other logits than its saved checkpoint
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.eval()

    layers = model.model.layers
    iterator = range(config.num_hidden_layers)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="fusing layers", unit="layer")
    params = dict(model.named_parameters())
    for i in iterator:
        prefix = f"model.layers.{i}."
        for key, p in params.items():
            if key.startswith(prefix) and ".mlp." not in key:
                _copy_(p, shared_weight(inputs, key), key)
        if plan is not None:  # the base FFN once, every expert's (padded, scaled) LoRA factors
            plan.fill_layer(layers[i].mlp.experts, i)
            continue
        module = layers[i].mlp.experts
        F = config.intermediate_size
        for e in range(len(inputs.names)):
            # Each expert slice gets its own model's weights: slices never share storage with each other.
            for target, proj in (
                (module.gate_up_proj[e, :F], "gate_proj"),
                (module.gate_up_proj[e, F:], "up_proj"),
                (module.down_proj[e], "down_proj"),
            ):
                target.copy_(expert_weight(inputs, e, i, proj, target.shape))
    for key, p in params.items():
        if not key.startswith("model.layers."):
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue
            _copy_(p, shared_weight(inputs, key), key)
    if config.tie_word_embeddings:
        model.tie_weights()

    if plan is not None:
        model.config.h3fusion["shared_experts"] = plan.record()
    for layer, w in zip(layers, router_weights(inputs, base, prototype_prompts, tokenizer), strict=True):
        layer.mlp.gate.weight.copy_(w)
    return model


def check_prototype_prompts(prompts: Any, names: Sequence[str], where: str = "prototype_prompts") -> None:
    """Check the shape {expert name: [prompt, ...]} with a non-empty list for every expert.

    A prompt is a string or a list of token ids (or a 1-D tensor). A string in place of the list would be read
    character by character, so it is refused.

    Raises:
        ValueError: naming `where` and the offending key.
    """
    if prompts is None:
        raise ValueError(f"router_init='prototypes' needs {where} for every expert")
    if not isinstance(prompts, Mapping):
        raise ValueError(f"{where}: expected an object {{expert name: [prompt, ...]}}, got {type(prompts).__name__}")
    missing = [n for n in names if n not in prompts]
    if missing:
        raise ValueError(f"{where}: router_init='prototypes' needs prompts for every expert; missing {missing}")
    unknown = [k for k in prompts if k not in names]
    if unknown:
        raise ValueError(f"{where}: {unknown} are not expert names (experts: {list(names)})")
    for name in names:
        value = prompts[name]
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Tensor)):
            raise ValueError(
                f"{where}: key {name!r} must be a list of prompts, got {type(value).__name__} "
                f"(write [{value!r}] for a single prompt)"
                if isinstance(value, str)
                else f"{where}: key {name!r} must be a list of prompts, got {type(value).__name__}"
            )
        if len(value) == 0:
            raise ValueError(f"{where}: key {name!r} has no prompts")
        for i, p in enumerate(value):
            ok = (
                isinstance(p, str)
                or isinstance(p, torch.Tensor)
                or (isinstance(p, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in p))
            )
            if not ok:
                raise ValueError(
                    f"{where}: key {name!r}, item {i}: expected a prompt string or a list of token ids, "
                    f"got {type(p).__name__}"
                )


def check_adapters(sources: Mapping[str, WeightSource], attention: str, allow_non_mlp: bool) -> None:
    """Refuse LoRA adapters whose changes the fused model would silently lose (see `fuse_models`).

    An adapter that adapts no MLP module gives an expert equal to the base MLP. With attention="base" the shared
    weights come from the base, so every non-MLP change of an adapter is dropped (with "mean" they enter the mean).

    Raises:
        ValueError: naming the expert and the dropped modules, unless `allow_non_mlp` (then a warning lists them).
    """
    for name, src in sources.items():
        if not isinstance(src, LoraAdapterWeights):
            continue
        non_mlp = src.non_mlp_modules()
        no_mlp = len(non_mlp) == len(src.adapted_modules())
        dropped = non_mlp if attention == "base" else []
        if not no_mlp and not dropped:
            continue
        shown = ", ".join(dropped[:6]) + (f", ... ({len(dropped)} in all)" if len(dropped) > 6 else "")
        if no_mlp:
            problem = f"expert {name!r}: the adapter {src.path} changes no MLP weight (its expert = the base MLP)"
        else:
            problem = f"expert {name!r}: the adapter {src.path} also changes modules outside the MLPs"
        if dropped:
            problem += f"; with attention='base' these changes are dropped: {shown}"
        if not allow_non_mlp:
            raise ValueError(
                f"{problem}. Pass allow_non_mlp_adapter=True (CLI: --allow-non-mlp-adapter) to fuse anyway"
                + (", or attention='mean' to average the shared weights" if dropped and not no_mlp else "")
            )
        warnings.warn(problem, UserWarning, stacklevel=3)


def save_fused_model(
    model,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    base: Any = None,
    *,
    overwrite: bool = False,
    **kwargs,
) -> str:
    """Save a fused model (safetensors, sharded past `max_shard_size`) and the base's tokenizer, atomically.

    Written to a hidden sibling folder first and renamed into place, so an interrupted save never leaves a half
    checkpoint. The folder carries our output marker (`h3fusion.utils.files.OUTPUT_MARKER`). `out_dir` may be new or
    empty; a previous output of ours is replaced only with `overwrite`; anything else (a folder of the user's, the
    working directory, the base or an aligned model the fused model was built from) is refused, never deleted.

    Args:
        model: the fused `MixtralForCausalLM`.
        out_dir: the destination directory.
        tokenizer: saved alongside; default: loaded from `base` when it is a directory holding one.
        base: the base model path (for its tokenizer).
        overwrite: replace a previous h3fusion output in `out_dir`.
        **kwargs: passed to `save_pretrained` (e.g. max_shard_size="2GB").

    Returns:
        The output directory path (absolute).

    A shared-base model (`fuse_models(..., experts="shared")`) is written in the shared-base format (design.md §11).

    Raises:
        h3fusion.utils.files.OutputDirError: `out_dir` may not be written (the message says why).
        ValueError: LoRA experts on per-expert bases (merge them first, or save the adapter).
    """
    if lora_experts_modules(model) and not is_shared_model(model):
        raise ValueError(
            "the model has LoRA experts on per-expert bases: fold them in first (merge_lora_experts), or save the "
            "adapter itself (h3fusion.models.lora_adapter_io.save_lora_adapter)"
        )
    record = getattr(model.config, "h3fusion", None) or {}
    inputs = [base, record.get("base"), *dict(record.get("sources") or {}).values()]
    inputs = [p for p in inputs if isinstance(p, (str, os.PathLike)) and os.path.exists(p)]
    out = check_output_dir(out_dir, overwrite=overwrite, inputs=inputs, what="out_dir")
    if tokenizer is None and isinstance(base, (str, os.PathLike)):
        from transformers import AutoTokenizer

        with contextlib.suppress(Exception):
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(base))
    with staged_output_dir(out, "fuse") as tmp:
        if is_shared_model(model):  # our shared-base format (design.md §11); one safetensors file
            write_shared_model(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return str(out)
