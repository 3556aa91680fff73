"""What our ops can run: the experts layout check and the MoE-block finder, used by `hf_experts` (the transformers
drop-in) and `lora_experts` (our LoRA experts); their own module, as `hf_experts` imports `lora_experts`."""

from __future__ import annotations

from torch import nn

__all__ = ["check_experts_layout", "moe_blocks"]


def check_experts_layout(experts: nn.Module) -> None:
    """Raise NotImplementedError when an experts module is not Mixtral's bias-free concatenated SwiGLU layout."""
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
    act = getattr(getattr(experts, "config", None), "hidden_act", None)
    if act is None:
        fn = getattr(experts, "act_fn", None)
        act = "silu" if fn is None or "silu" in type(fn).__name__.lower() else type(fn).__name__
    if act not in ("silu", "swish"):
        unsupported.append(f"activation {act!r} (only SwiGLU/silu)")
    if unsupported:
        raise NotImplementedError(
            f"{name}: experts_implementation='h3fusion' supports Mixtral-layout SwiGLU experts only; "
            f"unsupported: {', '.join(unsupported)}"
        )


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks of `model`: submodules with both a `.gate` and an `.experts` module."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "gate", None), nn.Module) and isinstance(getattr(m, "experts", None), nn.Module)
    ]
