"""The transformers drop-in: "h3fusion" in transformers' experts interface, and `replace_moe_blocks`.

transformers (>= 5) stores MoE experts as `gate_up_proj[E, 2F, H]` + `down_proj[E, H, F]` and dispatches their
forward through `ExpertsInterface` by `config._experts_implementation`. Registering "h3fusion" there lets
`from_pretrained(..., experts_implementation="h3fusion")` run the experts on `h3fusion_ext.moe_ffn`.
`replace_moe_blocks` goes one step further and also routes with `h3fusion_ext.topk_route` (fp32 logits).

Importing transformers' MoE integration costs seconds, so importing `h3fusion` does not: it installs a one-shot
import hook that registers "h3fusion" the moment transformers loads that module (or at once if it already has).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

import h3fusion_ext

from .._lazy_registration import MOE_MODULE as _MOE_MODULE
from .._lazy_registration import register_lazily  # noqa: F401  (re-exported)

IMPLEMENTATION = "h3fusion"
# Routers that compute softmax -> top-k -> (optional) renormalise, i.e. exactly `topk_route`.
SUPPORTED_ROUTERS = ("MixtralTopKRouter", "Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter", "OlmoeTopKRouter")


def _check_experts_layout(experts: nn.Module) -> None:
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


def h3fusion_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The "h3fusion" entry of transformers' ExpertsInterface.

    Args:
        self: a transformers experts module (`gate_up_proj[E, 2F, H]`, `down_proj[E, H, F]`).
        hidden_states: [T, H].
        top_k_index: [T, k] expert ids (int64 from transformers' routers, int32 from ours).
        top_k_weights: [T, k] routing weights (fp32, or the model dtype for Qwen-style routers).

    Returns:
        [T, H] in hidden_states.dtype.
    """
    _check_experts_layout(self)
    return h3fusion_ext.moe_ffn(
        hidden_states, top_k_weights.float(), top_k_index.to(torch.int32), self.gate_up_proj, self.down_proj
    )


def register_experts_implementation() -> bool:
    """Register "h3fusion" in transformers' `ExpertsInterface` (idempotent).

    Returns:
        True when registered (now or before), False when this transformers has no experts interface (< 5).
    """
    try:
        moe = importlib.import_module(_MOE_MODULE)
    except ImportError:
        return False
    interface = getattr(moe, "ExpertsInterface", None)
    if interface is None:
        return False
    if interface._global_mapping.get(IMPLEMENTATION) is not h3fusion_experts_forward:
        interface.register(IMPLEMENTATION, h3fusion_experts_forward)
    return True


class H3FusionRouterMixin:
    """Replaces a transformers top-k router's forward with fp32 logits + `h3fusion_ext.topk_route`.

    Returns what transformers' routers return: (router_logits[T, E] fp32, weights[T, k] fp32, experts[T, k] int32).
    """

    def forward(self, hidden_states: torch.Tensor):
        h = hidden_states.reshape(-1, self.weight.shape[1])
        logits = F.linear(h.float(), self.weight.float())
        renormalize = bool(getattr(self, "norm_topk_prob", True))
        weights, experts = h3fusion_ext.topk_route(logits, int(self.top_k), renormalize)
        return logits, weights, experts


class H3FusionExpertsMixin:
    """Replaces a transformers experts module's forward with `h3fusion_experts_forward` whatever its config says."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return h3fusion_experts_forward(self, hidden_states, top_k_index, top_k_weights)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type) -> None:
    # A subclass keeps isinstance() true, so transformers' output recorders (router_logits) still find the router.
    cls = type(module)
    if issubclass(cls, mixin):
        return
    sub = _SUBCLASSES.get((cls, mixin))
    if sub is None:
        sub = _SUBCLASSES[(cls, mixin)] = type(f"H3Fusion{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    module.__class__ = sub


def _router_name(gate: nn.Module) -> str | None:
    for klass in type(gate).__mro__:
        if klass.__name__ in SUPPORTED_ROUTERS:
            return klass.__name__
    return None


def check_block(block: nn.Module) -> None:
    """Validate that `block` (with `.gate` and `.experts`) has a layout our ops run exactly.

    Raises:
        ValueError: unsupported router or inconsistent shapes (the message names the class and the problem).
        NotImplementedError: unsupported experts layout.
    """
    gate, experts = block.gate, block.experts
    if _router_name(gate) is None:
        raise ValueError(
            f"{type(block).__name__}: router {type(gate).__name__} is not supported by h3fusion "
            f"(supported: {', '.join(SUPPORTED_ROUTERS)}); its routing rule may differ from softmax top-k"
        )
    if isinstance(experts, nn.ModuleList):
        raise ValueError(f"{type(block).__name__}: experts stored as a ModuleList (pre-v5 layout) are not supported")
    _check_experts_layout(experts)
    w, gu, dp = gate.weight, experts.gate_up_proj, experts.down_proj
    E, H = w.shape
    if gu.dim() != 3 or dp.dim() != 3 or gu.shape[0] != E or gu.shape[2] != H or dp.shape != (E, H, gu.shape[1] // 2):
        raise ValueError(
            f"{type(block).__name__}: shapes router {tuple(w.shape)}, gate_up_proj {tuple(gu.shape)}, down_proj "
            f"{tuple(dp.shape)} do not match [E,H], [E,2F,H], [E,H,F]"
        )


def replace_moe_blocks(model: nn.Module) -> int:
    """Run every MoE block of a transformers model on h3fusion_ext: router -> `topk_route`, experts -> `moe_ffn`.

    Works in place and keeps all parameters (no copies), the block's own forward (so Qwen2-MoE's shared expert
    and Mixtral's jitter still apply) and `output_router_logits`. Supported: Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE
    (and models built from their blocks, such as the fused H3Fusion model).

    Args:
        model: any nn.Module; blocks are submodules with both `.gate` and `.experts`.

    Returns:
        The number of MoE blocks replaced (0 for a dense model).

    Raises:
        ValueError / NotImplementedError: a block with an unsupported router or experts layout (nothing is changed).
    """
    blocks = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "gate", None), nn.Module) and isinstance(getattr(m, "experts", None), nn.Module)
    ]
    for block in blocks:  # validate all first, so a refusal leaves the model untouched
        check_block(block)
    for block in blocks:
        _swap_class(block.gate, H3FusionRouterMixin)
        _swap_class(block.experts, H3FusionExpertsMixin)
    return len(blocks)
