"""`LoRAExperts` <-> PEFT adapter folders (LoRA on the 3-D expert weights through `target_parameters`).

The folder is what `peft.PeftModel.from_pretrained(fused_model, folder)` loads onto the fused Mixtral whose expert
weights are the LoRA base: `adapter_config.json` (r, lora_alpha, target_parameters `mlp.experts.gate_up_proj` and
`mlp.experts.down_proj`, routers in modules_to_save `gate`) and `adapter_model.safetensors`.

PEFT's convention for a 3-D parameter `[E, out, in]` (transformers' layout, not transposed; peft
`tuners/lora/layer.py` ParamWrapper): `lora_A` is `Linear(in, r·E)`, weight `[E·r, in]`, expert e's A = rows
e·r .. e·r+r-1; `lora_B` is `Linear(r·E, out)`, weight `[out, r·E]`, expert e's B = columns j·E + e (j < r), i.e.
`weight.reshape(out, r, E)[..., e]`; delta_e = scaling · B_e A_e. One ParamWrapper wraps each targeted parameter, in
the order the experts module registers them (gate_up_proj, then down_proj); the first is innermost, so its keys
carry one `.base_layer` per wrapper around it: `...mlp.experts.base_layer.lora_A.weight` (gate_up_proj) and
`...mlp.experts.lora_A.weight` (down_proj). A router trained in full is saved as `...mlp.gate.weight`.
"""

from __future__ import annotations

import os

import torch

from h3fusion.utils.files import atomic_write_bytes, atomic_write_json, read_json

from .lora_experts import FACTOR_NAMES, LoRAExperts, lora_experts_modules

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "from_peft_layout",
    "load_lora_adapter",
    "peft_adapter_state",
    "save_lora_adapter",
    "to_peft_layout",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _factor_key(experts_name: str, projection: str, which: str) -> str:
    """PEFT's saved key of one factor ("A" or "B") of `projection` on the experts module `experts_name`."""
    order = list(FACTOR_NAMES)  # the registration order of the base weights = PEFT's wrapping order
    outer = len(order) - 1 - order.index(projection)
    return f"{_PREFIX}{experts_name}." + "base_layer." * outer + f"lora_{which}.weight"


def to_peft_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our factors `a [E, r, in]`, `b [E, out, r]` -> PEFT's `lora_A.weight [E·r, in]`, `lora_B.weight [out, r·E]`."""
    E, r = a.shape[0], a.shape[1]
    return a.reshape(E * r, a.shape[-1]), b.permute(1, 2, 0).reshape(b.shape[1], r * E)


def from_peft_layout(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int):
    """PEFT's `lora_A.weight [E·r, in]`, `lora_B.weight [out, r·E]` -> our `a [E, r, in]`, `b [E, out, r]`."""
    r = lora_a.shape[0] // num_experts
    return lora_a.reshape(num_experts, r, lora_a.shape[-1]), lora_b.reshape(lora_b.shape[0], r, num_experts).permute(
        2, 0, 1
    )


def _check_exportable(modules: list[tuple[str, LoRAExperts]]) -> LoRAExperts:
    if not modules:
        raise ValueError("the model has no LoRA experts (LoRAExperts) to save as a PEFT adapter")
    first = modules[0][1]
    for name, m in modules:
        if m.shared_base:
            raise ValueError(
                f"{name}: a shared-base model has no PEFT equivalent (PEFT's base would hold E experts); save it "
                "with h3fusion.save_fused_model, or export it with `h3fusion export`"
            )
        if (m.rank, m.lora_alpha) != (first.rank, first.lora_alpha):
            raise ValueError(f"{name}: rank/alpha {m.rank}/{m.lora_alpha} differ from {first.rank}/{first.lora_alpha}")
    return first


def peft_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved key names: LoRA factors of every `LoRAExperts` and the router weight
    of its MoE block (contiguous CPU copies, in the model dtype)."""
    modules = lora_experts_modules(model)
    _check_exportable(modules)
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, m in modules:
            for projection, (a_name, b_name) in FACTOR_NAMES.items():
                lora_a, lora_b = to_peft_layout(getattr(m, a_name), getattr(m, b_name))
                state[_factor_key(name, projection, "A")] = lora_a
                state[_factor_key(name, projection, "B")] = lora_b
            block = name.rpartition(".")[0]
            gate = model.get_submodule(f"{block}.gate")
            state[f"{_PREFIX}{block}.gate.weight"] = gate.weight
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_lora_adapter(
    model: torch.nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None
) -> str:
    """Write the model's LoRA experts and routers as a PEFT adapter folder (each file atomically).

    Args:
        model: a model with `LoRAExperts` on per-expert bases (not shared), one rank and alpha throughout.
        out_dir: the folder (created if needed; the two adapter files are replaced).
        base_model_name_or_path: recorded in adapter_config.json (the fused model the adapter applies to).

    Returns:
        The folder path.

    Raises:
        ValueError: no LoRA experts, a shared base, or mixed ranks.
    """
    import peft
    from safetensors.torch import save

    first = _check_exportable(lora_experts_modules(model))
    state = peft_adapter_state(model)
    config = peft.LoraConfig(
        r=first.rank,
        lora_alpha=first.lora_alpha,
        target_modules=[],
        target_parameters=[f"mlp.experts.{p}" for p in FACTOR_NAMES],
        modules_to_save=["gate"],
        base_model_name_or_path=base_model_name_or_path,
    ).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config["inference_mode"] = True  # as PEFT's save_pretrained writes it
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, ADAPTER_WEIGHTS), save(state, metadata={"format": "pt"}))
    atomic_write_json(os.path.join(out_dir, ADAPTER_CONFIG), config)
    return os.fspath(out_dir)


@torch.no_grad()
def load_lora_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Load a PEFT adapter folder written by `save_lora_adapter` into the model's `LoRAExperts` and routers.

    Raises:
        ValueError: the rank / alpha differ from the model's, or a tensor is missing or has the wrong shape (named).
    """
    from safetensors.torch import load_file

    from .weight_source import safetensors_error

    adapter_dir = os.fspath(adapter_dir)
    config = read_json(os.path.join(adapter_dir, ADAPTER_CONFIG))
    modules = lora_experts_modules(model)
    first = _check_exportable(modules)
    if (config.get("r"), float(config.get("lora_alpha", -1))) != (first.rank, first.lora_alpha):
        raise ValueError(
            f"{adapter_dir}: r={config.get('r')}, lora_alpha={config.get('lora_alpha')}; the model's LoRA experts "
            f"have r={first.rank}, lora_alpha={first.lora_alpha}"
        )
    file = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    try:
        tensors = load_file(file)
    except Exception as exc:
        raise safetensors_error(file, exc) from None
    want = peft_adapter_state(model)
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise ValueError(f"{file}: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    for key, like in want.items():
        if tuple(tensors[key].shape) != tuple(like.shape):
            raise ValueError(f"{file}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(like.shape)}")
    for name, m in modules:
        for projection, (a_name, b_name) in FACTOR_NAMES.items():
            keys = (_factor_key(name, projection, "A"), _factor_key(name, projection, "B"))
            a, b = from_peft_layout(tensors[keys[0]], tensors[keys[1]], m.num_experts)
            getattr(m, a_name).copy_(a)
            getattr(m, b_name).copy_(b)
        block = name.rpartition(".")[0]
        model.get_submodule(f"{block}.gate").weight.copy_(tensors[f"{_PREFIX}{block}.gate.weight"])
