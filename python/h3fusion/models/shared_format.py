"""The shared-base fused model on disk (design.md §11), `load_fused_model`, and its export to a plain Mixtral.

A folder holds
    config.json                   the fused `MixtralConfig` (as a materialised fusion would have it) whose
                                  `h3fusion` record has `experts_layout: "shared"` and a `shared_experts` object:
                                  {"format": "h3fusion-shared-experts", "format_version": 1,
                                   "weights": "shared_experts.safetensors", "rank": R, "lora_alpha": alpha, ...}
    shared_experts.safetensors    every tensor under its transformers name; per layer l the MoE block holds
                                  model.layers.l.mlp.gate.weight [E, H], model.layers.l.mlp.experts.gate_up_proj
                                  [1, 2F, H] and .down_proj [1, H, F] (the base FFN, once), .gate_up_lora_A [E, R, H],
                                  .gate_up_lora_B [E, 2F, R], .down_lora_A [E, R, F], .down_lora_B [E, H, R];
                                  lm_head.weight is left out when the embeddings are tied
    tokenizer files, and our output marker
Expert e of layer l is W + (alpha/R)·B_e·A_e for both projections. There is no model.safetensors, so transformers'
`from_pretrained` refuses the folder instead of loading something else; `load_fused_model` reads it, and
`export_shared_model` (CLI `h3fusion export`) turns it into a plain Mixtral checkpoint.
"""

from __future__ import annotations

import os

import torch

from h3fusion.utils.files import atomic_write_text, read_json

from .lora_experts import lora_experts_modules, merge_lora_experts
from .shared_experts import build_shared_model

__all__ = [
    "FORMAT",
    "SHARED_WEIGHTS",
    "export_shared_model",
    "is_shared_dir",
    "is_shared_model",
    "load_fused_model",
    "shared_record",
    "write_shared_model",
]

FORMAT = "h3fusion-shared-experts"
FORMAT_VERSION = 1
SHARED_WEIGHTS = "shared_experts.safetensors"


def is_shared_model(model: torch.nn.Module) -> bool:
    """True when the model's experts are `LoRAExperts` on a shared base."""
    modules = lora_experts_modules(model)
    return bool(modules) and all(m.shared_base for _, m in modules)


def shared_record(config) -> dict | None:
    """The `shared_experts` object of a config's h3fusion record, or None for any other model."""
    record = getattr(config, "h3fusion", None)
    if isinstance(config, dict):
        record = config.get("h3fusion")
    value = record.get("shared_experts") if isinstance(record, dict) else None
    return value if isinstance(value, dict) else None


def is_shared_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a folder in the shared-base format (its config.json says so)."""
    file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(file):
        return False
    record = shared_record(read_json(file))
    return record is not None and record.get("format") == FORMAT


def _state_to_save(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the embeddings: stored once
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_shared_model(model, out_dir: str | os.PathLike) -> None:
    """Write config.json and the weights of a shared-base model into `out_dir` (an existing folder; callers stage it
    and rename it into place, as `save_fused_model` and the trainer's checkpoints do).

    Raises:
        ValueError: the model's experts are not `LoRAExperts` on a shared base.
    """
    from safetensors.torch import save_file

    modules = lora_experts_modules(model)
    if not is_shared_model(model):
        raise ValueError("write_shared_model needs a shared-base model (LoRAExperts with a [1, ...] base)")
    first = modules[0][1]
    record = dict(getattr(model.config, "h3fusion", None) or {})
    shared = dict(shared_record(model.config) or {})
    shared.update(format=FORMAT, format_version=FORMAT_VERSION, weights=SHARED_WEIGHTS)
    shared.update(rank=first.rank, lora_alpha=first.lora_alpha)
    record.update(experts_layout="shared", shared_experts=shared)
    model.config.h3fusion = record
    model.config.dtype = next(model.parameters()).dtype  # recorded as save_pretrained does
    save_file(_state_to_save(model), os.path.join(os.fspath(out_dir), SHARED_WEIGHTS), metadata={"format": "pt"})
    atomic_write_text(os.path.join(os.fspath(out_dir), "config.json"), model.config.to_json_string())


def load_shared_state(model, path: str | os.PathLike) -> None:
    """Load the weights of a shared-base folder into a model built for it (every key checked, names in errors)."""
    from safetensors.torch import load_file

    from .weight_source import safetensors_error

    file = os.path.join(os.fspath(path), SHARED_WEIGHTS)
    if not os.path.isfile(file):
        raise ValueError(f"{os.fspath(path)} is a shared-base model folder without its weights file {SHARED_WEIGHTS}")
    try:
        state = load_file(file)
    except Exception as exc:
        raise safetensors_error(file, exc) from None
    want = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        want.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(f"{file}: missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
    for key, like in want.items():
        if state[key].shape != like.shape:
            raise ValueError(f"{file}: {key} has shape {tuple(state[key].shape)}, expected {tuple(like.shape)}")
    with torch.no_grad():
        for key, like in want.items():
            like.copy_(state[key])
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def load_fused_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None):
    """Load a fused model folder: the shared-base format, or a plain (materialised) Mixtral checkpoint.

    Args:
        path: the folder (`save_fused_model` / `h3fusion fuse` output, or a `h3fusion train` final model).
        dtype: the parameters' dtype (default: as stored).
        device: where to put the model (default: CPU).

    Returns:
        A `MixtralForCausalLM` in eval mode; for the shared-base format its blocks hold `LoRAExperts` (run on
        `h3fusion_ext.moe_ffn`), for a plain checkpoint it is what `AutoModelForCausalLM.from_pretrained` gives.

    Raises:
        ValueError: a folder that is not a model, or a shared-base folder whose files do not match its config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path} is not a model folder: it has no config.json")
    if not is_shared_dir(path):
        model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        return (model.to(device) if device is not None else model).eval()
    config = AutoConfig.from_pretrained(path)
    record = shared_record(config)
    if int(record.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: shared-experts format version {record.get('format_version')} is newer than this "
                         f"h3fusion reads ({FORMAT_VERSION})")  # fmt: skip
    for field in ("rank", "lora_alpha"):
        if not isinstance(record.get(field), (int, float)) or record[field] <= 0:
            raise ValueError(f"{path}/config.json: h3fusion.shared_experts.{field} must be a positive number")
    if dtype is None:
        dtype = _stored_dtype(os.path.join(path, record.get("weights", SHARED_WEIGHTS)))
    model = build_shared_model(config, int(record["rank"]), dtype, float(record["lora_alpha"]))
    load_shared_state(model, path)
    model.config._name_or_path = path
    return (model.to(device) if device is not None else model).eval()


def _stored_dtype(file: str) -> torch.dtype:
    from safetensors import safe_open

    from .checkpoint_io import _SAFE_DTYPES
    from .weight_source import safetensors_error

    try:
        with safe_open(file, framework="pt") as f:
            key = next((k for k in f.keys() if k.endswith("embed_tokens.weight")), None) or next(iter(f.keys()))
            return _SAFE_DTYPES[f.get_slice(key).get_dtype()]
    except StopIteration:
        raise ValueError(f"{file} holds no tensors") from None
    except Exception as exc:
        raise safetensors_error(file, exc) from None


def export_shared_model(model):
    """Fold a shared-base model's adapters into E materialised experts per layer (in place): a plain
    `MixtralForCausalLM` whose config record says `experts_layout: "materialised"` (what the shared record said is
    kept under `exported_from_shared`).

    Returns:
        `model`, now plain.
    """
    if not is_shared_model(model):
        raise ValueError("export_shared_model needs a shared-base model (from load_fused_model on such a folder)")
    merge_lora_experts(model)
    record = dict(getattr(model.config, "h3fusion", None) or {})
    shared = record.pop("shared_experts", None)
    for key in ("format", "format_version", "weights"):
        (shared or {}).pop(key, None)
    record.update(experts_layout="materialised", exported_from_shared=shared)
    model.config.h3fusion = record
    return model
