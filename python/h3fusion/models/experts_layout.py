"""What our ops can run: the experts layout check and the MoE-block finder, used by `hf_experts` (the transformers
drop-in) and `lora_experts` (our LoRA experts); their own module, as `hf_experts` imports `lora_experts`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

__all__ = ["check_experts_layout", "experts_activation", "moe_blocks"]


# transformers' activation names (config.hidden_act) and act_fn classes -> moe_ffn's gated activations. Every tanh
# form of GELU is the same function, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written differently.
_HIDDEN_ACTS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
}
_ACT_CLASSES = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh",
}


def experts_activation(experts: nn.Module) -> str | None:
    """The `moe_ffn` activation ("silu", "gelu", "gelu_tanh") of a transformers experts module, None if unsupported.

    Read from the module's `act_fn` (what its own forward runs), else from `config.hidden_act`; no activation at all
    means SwiGLU (Mixtral's default).
    """
    own = getattr(experts, "moe_ffn_activation", None)  # our LoRAExperts say it themselves
    if own is not None:
        return own if own in set(_HIDDEN_ACTS.values()) else None
    fn = getattr(experts, "act_fn", None)
    if fn is not None:
        if isinstance(fn, nn.GELU):
            return "gelu_tanh" if fn.approximate == "tanh" else "gelu"
        found = _ACT_CLASSES.get(type(fn).__name__)
        if found is not None:
            return found
        if fn is F.silu:
            return "silu"
        if fn is F.gelu:
            return "gelu"
        return None
    act = getattr(getattr(experts, "config", None), "hidden_act", None)
    return "silu" if act is None else _HIDDEN_ACTS.get(act)


def check_experts_layout(experts: nn.Module) -> str:
    """The experts' `moe_ffn` activation; NotImplementedError when the module is not Mixtral's bias-free
    concatenated gated (SwiGLU / GeGLU) layout."""
    name = type(experts).__name__
    unsupported = [
        flag
        for flag, bad in (
            ("has_bias", getattr(experts, "has_bias", False)),
            ("is_transposed", getattr(experts, "is_transposed", False)),
            ("has_post_expert_norm", getattr(experts, "has_post_expert_norm", False)),
            ("expert parallelism", getattr(experts, "_is_expert_parallel", False)),
            ("has_gate=False", not getattr(experts, "has_gate", True)),
            ("interleaved gate/up (is_concatenated=False)", not getattr(experts, "is_concatenated", True)),
        )
        if bad
    ]
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        unsupported.append("no gate_up_proj/down_proj")
    activation = experts_activation(experts)
    if activation is None:
        fn = getattr(experts, "act_fn", None)
        what = type(fn).__name__ if fn is not None else getattr(getattr(experts, "config", None), "hidden_act", None)
        unsupported.append(f"activation {what!r} (supported: {', '.join(sorted(_HIDDEN_ACTS))})")
    if unsupported:
        raise NotImplementedError(
            f"{name}: experts_implementation='h3fusion' supports Mixtral-layout gated experts (SwiGLU, GeGLU) only; "
            f"unsupported: {', '.join(unsupported)}"
        )
    return activation


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks of `model`: submodules with both a `.gate` and an `.experts` module."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "gate", None), nn.Module) and isinstance(getattr(m, "experts", None), nn.Module)
    ]
