"""`fuse_to_disk`: build the H3Fusion checkpoint straight into safetensors shards, never holding the fused model.

`fuse_models` + `save_fused_model` allocate the whole `MixtralForCausalLM` (N times the base's MLPs) before writing
it. Here nothing of the fused model exists in memory: the output's tensor names, shapes and shard files are planned
from the config alone (a `meta`-device model), then every output tensor is read from its source checkpoint (safetensors
`safe_open`, memory-mapped) when its shard file reaches it, written, and freed. Memory beyond the inputs' mapped pages
is about one tensor (the largest is the embedding / lm_head), not one shard and not the model; with attention="mean"
one fp32 sum of the shared tensor being averaged, with a LoRA expert one fp32 copy of the weight being merged.

The checkpoint is the one `save_fused_model` writes (tensor for tensor, same config.json and generation_config.json,
same shard naming and index for the same `max_shard_size`): transformers saves a Mixtral in its original layout, one
tensor per expert projection (`model.layers.L.block_sparse_moe.experts.E.w1/w2/w3.weight` = gate/down/up,
`block_sparse_moe.gate.weight` = router), which is also what vLLM, SGLang and mergekit read, so no expert stack is
ever built. The router weights are computed first (`router_weights`: random, zeros, or prototype rows from the base
run layer by layer), as in `fuse_models`, so the same seed gives the same routers.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from h3fusion.utils.files import check_output_dir, staged_output_dir

from .fuse import FusionInputs, _no_init, expert_weight, prepare_fusion, router_weights, shared_weight
from .safetensors_stream import TensorSpec, write_sharded

__all__ = ["fuse_to_disk", "fused_tensor_specs"]

# transformers' original (saved) Mixtral layout of one expert: w1 = gate_proj, w2 = down_proj, w3 = up_proj
_EXPERT_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
_ROUTER_KEY = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight")


def _meta_model(inputs: FusionInputs):
    """The fused model on the meta device (no memory): its state-dict names and shapes, and its generation config."""
    from transformers import MixtralForCausalLM

    with torch.device("meta"), _no_init():
        model = MixtralForCausalLM(inputs.config)
    return model.to(inputs.dtype)


def fused_tensor_specs(model) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]]]:
    """The tensors `save_pretrained` writes for a fused Mixtral (a meta model is enough), in the order it shards them.

    transformers decides the saved layout: tied weights dropped (`remove_tied_weights_from_state_dict`), then its
    weight conversions reverted (`revert_weight_conversion`: the expert stacks become one tensor per expert
    projection under `block_sparse_moe`). Both run here on meta tensors, so names, shapes and order are exactly the
    ones `save_fused_model` writes; with a transformers that lacks them, the same layout is built by hand.

    Returns:
        (specs, storage): saved name -> shape and dtype, in `save_pretrained`'s order; and, for the tensors that
        in the loaded model are views of one stacked parameter (the experts of a layer), name -> (an id of that
        parameter, its bytes), which `save_pretrained`'s sharding keeps together (`plan_shards`).

    Raises:
        ValueError: a saved MLP tensor this module does not know how to build (a layout change in transformers).
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        saved = _original_layout(model)
    else:
        state = model.state_dict()
        if model.config.tie_word_embeddings:  # meta tensors carry no address to see the tie by
            state.pop("lm_head.weight", None)
        saved = revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))
    for key in saved:
        known = _EXPERT_KEY.fullmatch(key) or _ROUTER_KEY.fullmatch(key)
        if (".mlp." in key or ".block_sparse_moe." in key) and not known:
            raise ValueError(f"fused model tensor {key!r} is saved in a layout fuse_to_disk does not know")
    specs = {k: TensorSpec(tuple(t.shape), t.dtype) for k, t in saved.items()}
    storage = {}
    for k, t in saved.items():
        if t._base is not None:  # a view (meta tensors keep their view relation, not a storage address)
            storage[k] = (id(t._base), t._base.numel() * t._base.element_size())
    return specs, storage


def _original_layout(model) -> dict[str, torch.Tensor]:
    """Mixtral's original saved layout (meta tensors), for transformers versions without `revert_weight_conversion`."""
    saved: dict[str, torch.Tensor] = {}
    tied = bool(model.config.tie_word_embeddings)
    for key, t in model.state_dict().items():
        prefix, _, leaf = key.partition(".mlp.")
        if key == "lm_head.weight" and tied:
            continue
        if leaf == "gate.weight":
            saved[f"{prefix}.block_sparse_moe.gate.weight"] = t
        elif leaf == "experts.gate_up_proj":
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                saved[f"{prefix}.block_sparse_moe.experts.{e}.w1.weight"] = gate
                saved[f"{prefix}.block_sparse_moe.experts.{e}.w3.weight"] = up
        elif leaf == "experts.down_proj":
            for e in range(t.shape[0]):
                saved[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = t[e]
        else:
            saved[key] = t
    return saved


def _producer(inputs: FusionInputs, routers: Sequence[torch.Tensor], specs: Mapping[str, TensorSpec], bar):
    def produce(key: str) -> torch.Tensor:
        if m := _EXPERT_KEY.fullmatch(key):
            layer, expert, w = int(m[1]), int(m[2]), m[3]
            value = expert_weight(inputs, expert, layer, _EXPERT_PROJ[w], specs[key].shape)
        elif m := _ROUTER_KEY.fullmatch(key):
            value = routers[int(m[1])]
        else:
            value = shared_weight(inputs, key)
            if tuple(value.shape) != specs[key].shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit the fused model's {specs[key].shape}")
        if bar is not None:
            bar.update(specs[key].nbytes)
        return value

    return produce


@torch.no_grad()
def fuse_to_disk(
    base: Any,
    aligned: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    top_k: int = 2,
    attention: str = "base",
    router_init: str = "random",
    prototype_prompts: Mapping[str, Sequence[Any]] | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    allow_non_mlp_adapter: bool = False,
) -> str:
    """Fuse like `fuse_models` and save like `save_fused_model`, streaming tensor by tensor into the output shards.

    The output folder is written as a hidden staging folder next to `out_dir` and renamed into place when complete
    (`h3fusion.utils.files`), so an interrupted run leaves no half checkpoint; it carries our output marker. It holds
    config.json (with the `h3fusion` fusion record), generation_config.json, the safetensors weights
    (`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` past
    `max_shard_size`) and the base's tokenizer.

    Args:
        base, aligned, top_k, attention, router_init, prototype_prompts, tokenizer, dtype, allow_non_mlp_adapter:
            as `fuse_models`.
        out_dir: the destination folder: new, empty, or a previous output of ours with `overwrite`.
        max_shard_size: bytes or a string like "5GB", as `save_pretrained`.
        overwrite: replace a previous h3fusion output in `out_dir`.
        progress: show a progress bar (bytes written).

    Returns:
        The output folder (absolute).

    Raises:
        ValueError: as `fuse_models`.
        h3fusion.utils.files.OutputDirError: `out_dir` may not be written (a user's folder, an input of the run...).
    """
    inputs = prepare_fusion(
        base, aligned, top_k=top_k, attention=attention, router_init=router_init,
        prototype_prompts=prototype_prompts, dtype=dtype, allow_non_mlp_adapter=allow_non_mlp_adapter,
    )  # fmt: skip
    out = check_output_dir(out_dir, overwrite=overwrite, inputs=inputs.input_paths(base, aligned), what="out_dir")
    if tokenizer is None and isinstance(base, (str, os.PathLike)):
        from transformers import AutoTokenizer

        with contextlib.suppress(Exception):
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(base))
    routers = router_weights(inputs, base, prototype_prompts, tokenizer)  # small: N x H per layer
    model = _meta_model(inputs)
    specs, storage = fused_tensor_specs(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s.nbytes for s in specs.values()), desc="fusing", unit="B", unit_scale=True)
    try:
        with staged_output_dir(out, "fuse") as tmp:
            # the files save_pretrained writes next to the weights, with the fields it sets
            model.config.dtype = str(inputs.dtype).split(".")[1]
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(tmp)
            if model.can_generate():
                model.generation_config.save_pretrained(tmp)
            produce = _producer(inputs, routers, specs, bar)
            write_sharded(tmp, specs, produce, max_shard_size=max_shard_size, storage=storage)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        if bar is not None:
            bar.close()
        for src in (inputs.base_src, *inputs.sources):
            close = getattr(src, "close", None)
            if close is not None:
                close()
    return str(out)
