"""The transformers drop-in: "h3fusion" in transformers' experts interface, and `replace_moe_blocks`.

transformers (>= 5) stores MoE experts as `gate_up_proj[E, 2F, H]` + `down_proj[E, H, F]` and dispatches their
forward through `ExpertsInterface` by `config._experts_implementation`. Registering "h3fusion" there lets
`from_pretrained(..., experts_implementation="h3fusion")` run the experts on `h3fusion_ext.moe_ffn`.
`replace_moe_blocks` goes one step further and also routes with `h3fusion_ext.topk_route` (fp32 logits), and
`set_experts_implementation` switches a model between that and transformers' own implementations (`grouped_mm`,
`eager`). Both keep our `LoRAExperts` (`lora_experts.py`, which run on `moe_ffn` with per-expert LoRA and refuse
transformers' implementations) and see through PEFT's wrappers (LoRA on the expert weights via `target_parameters`,
routers in `modules_to_save`), so LoRA experts run on our kernels with their effective weights W + BA.

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
from .experts_layout import check_experts_layout as _check_experts_layout
from .experts_layout import experts_activation  # noqa: F401  (re-exported: h3fusion.parallel reads it here)
from .experts_layout import moe_blocks as _moe_blocks
from .lora_experts import LoRAExperts

IMPLEMENTATION = "h3fusion"
# What `set_experts_implementation` accepts: ours (router and experts on h3fusion_ext), or transformers' own.
EXPERTS_IMPLEMENTATIONS = (IMPLEMENTATION, "grouped_mm", "eager")
# Routers that compute softmax -> top-k -> (optional) renormalise, i.e. exactly `topk_route`.
SUPPORTED_ROUTERS = ("MixtralTopKRouter", "Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter", "OlmoeTopKRouter")


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
    activation = _check_experts_layout(self)
    return h3fusion_ext.moe_ffn(
        hidden_states,
        top_k_weights.to(h3fusion_ext.accumulate_dtype(hidden_states.dtype, top_k_weights.dtype)),
        top_k_index.to(torch.int32),
        self.gate_up_proj,
        self.down_proj,
        activation=activation,
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


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x[T, H] @ weight[E, H]^T in fp32 for bf16/fp16/fp32 (fp64 stays fp64): the logits of every router we run,
    ours and the replaced transformers ones."""
    acc = h3fusion_ext.accumulate_dtype(x.dtype, weight.dtype)
    return F.linear(x.to(acc), weight.to(acc))


class H3FusionRouterMixin:
    """Replaces a transformers top-k router's forward with fp32 logits + `h3fusion_ext.topk_route`.

    Returns what transformers' routers return: (router_logits[T, E] fp32, weights[T, k] fp32, experts[T, k] int32);
    an fp64 model keeps fp64 logits and weights.
    """

    def forward(self, hidden_states: torch.Tensor):
        h = hidden_states.reshape(-1, self.weight.shape[1])
        logits = router_logits(h, self.weight)
        renormalize = bool(getattr(self, "norm_topk_prob", True))
        weights, experts = h3fusion_ext.topk_route(logits, int(self.top_k), renormalize)
        return logits, weights, experts


class H3FusionExpertsMixin:
    """Replaces a transformers experts module's forward with `h3fusion_experts_forward` whatever its config says."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return h3fusion_experts_forward(self, hidden_states, top_k_index, top_k_weights)


_SUBCLASSES: dict[tuple[type, type], type] = {}
_ORIGINALS: dict[type, type] = {}  # our subclass -> the class it replaced


def _swap_class(module: nn.Module, mixin: type) -> None:
    # A subclass keeps isinstance() true, so transformers' output recorders (router_logits) still find the router.
    cls = type(module)
    if issubclass(cls, mixin):
        return
    sub = _SUBCLASSES.get((cls, mixin))
    if sub is None:
        sub = _SUBCLASSES[(cls, mixin)] = type(f"H3Fusion{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
        _ORIGINALS[sub] = cls
    module.__class__ = sub


def _router_name(gate: nn.Module) -> str | None:
    for klass in type(gate).__mro__:
        if klass.__name__ in SUPPORTED_ROUTERS:
            return klass.__name__
    return None


def _routers(gate: nn.Module) -> list[nn.Module]:
    """The router modules behind a block's `.gate`: itself, or the routers inside a wrapper (PEFT's
    `modules_to_save` keeps the original and a trainable copy; either may be the one that runs)."""
    if _router_name(gate) is not None:
        return [gate]
    return [m for m in gate.modules() if m is not gate and _router_name(m) is not None]


def _base_experts(experts: nn.Module) -> nn.Module:
    """The experts module behind a block's `.experts`. PEFT's `target_parameters` wraps it in (nested) ParamWrappers
    whose forward parametrises `gate_up_proj` / `down_proj` to W + BA and then calls this module's forward, so our
    forward receives the effective weights."""
    while isinstance(getattr(experts, "base_layer", None), nn.Module):
        experts = experts.base_layer
    return experts


def check_block(block: nn.Module) -> None:
    """Validate that `block` (with `.gate` and `.experts`) has a layout our ops run exactly.

    Raises:
        ValueError: unsupported router or inconsistent shapes (the message names the class and the problem).
        NotImplementedError: unsupported experts layout.
    """
    routers, experts = _routers(block.gate), _base_experts(block.experts)
    if not routers:
        raise ValueError(
            f"{type(block).__name__}: router {type(block.gate).__name__} is not supported by h3fusion "
            f"(supported: {', '.join(SUPPORTED_ROUTERS)}); its routing rule may differ from softmax top-k"
        )
    if isinstance(experts, nn.ModuleList):
        raise ValueError(f"{type(block).__name__}: experts stored as a ModuleList (pre-v5 layout) are not supported")
    _check_experts_layout(experts)
    w, gu, dp = routers[0].weight, experts.gate_up_proj, experts.down_proj
    E, H = w.shape
    lora = isinstance(experts, LoRAExperts)
    # LoRA experts may share one base FFN ([1, ...]) between their E adapters
    Eb = 1 if lora and experts.shared_base else E
    if lora and experts.num_experts != E:
        raise ValueError(f"{type(block).__name__}: router has {E} experts, its LoRA experts {experts.num_experts}")
    if gu.dim() != 3 or dp.dim() != 3 or gu.shape[0] != Eb or gu.shape[2] != H or dp.shape != (Eb, H, gu.shape[1] // 2):
        raise ValueError(
            f"{type(block).__name__}: shapes router {tuple(w.shape)}, gate_up_proj {tuple(gu.shape)}, down_proj "
            f"{tuple(dp.shape)} do not match [E,H], [E,2F,H], [E,H,F]"
        )


def replace_moe_blocks(model: nn.Module) -> int:
    """Run every MoE block of a transformers model on h3fusion_ext: router -> `topk_route`, experts -> `moe_ffn`.

    Works in place and keeps all parameters (no copies), the block's own forward (so Qwen2-MoE's shared expert
    and Mixtral's jitter still apply) and `output_router_logits`. Supported: Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE
    (and models built from their blocks, such as the fused H3Fusion model), bare or wrapped by PEFT (LoRA on the
    expert weights, routers in `modules_to_save`). `restore_moe_blocks` undoes it.

    Args:
        model: any nn.Module; blocks are submodules with both `.gate` and `.experts`.

    Returns:
        The number of MoE blocks replaced (0 for a dense model).

    Raises:
        ValueError / NotImplementedError: a block with an unsupported router or experts layout (nothing is changed).
    """
    blocks = _moe_blocks(model)
    for block in blocks:  # validate all first, so a refusal leaves the model untouched
        check_block(block)
    for block in blocks:
        for router in _routers(block.gate):
            _swap_class(router, H3FusionRouterMixin)
        if not isinstance(block.experts, LoRAExperts):  # LoRA experts run on moe_ffn already
            _swap_class(_base_experts(block.experts), H3FusionExpertsMixin)
    return len(blocks)


def restore_moe_blocks(model: nn.Module) -> int:
    """Undo `replace_moe_blocks`: every router and experts module gets its transformers class back.

    Returns:
        The number of modules restored.
    """
    restored = 0
    for module in model.modules():
        original = _ORIGINALS.get(type(module))
        if original is not None:
            module.__class__ = original
            restored += 1
    return restored


def _pretrained_model(model: nn.Module) -> nn.Module:
    # DDP / DeepSpeed / torch.compile keep the model in `.module` / `._orig_mod`; PEFT in `.get_base_model()`.
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        else:
            inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


def set_experts_implementation(model: nn.Module, implementation: str) -> str:
    """Choose what runs the MoE blocks of a transformers model (bare or PEFT-wrapped), in place.

    "h3fusion": routers on `h3fusion_ext.topk_route` and experts on `h3fusion_ext.moe_ffn` (`replace_moe_blocks`);
    "grouped_mm" / "eager": transformers' own routers and experts implementation (any replacement is undone first).

    Args:
        model: a transformers model, possibly wrapped (PEFT, DDP).
        implementation: one of `EXPERTS_IMPLEMENTATIONS`.

    Returns:
        The implementation now in use (`current_experts_implementation(model)`).

    Raises:
        ValueError: an unknown implementation, or one this model cannot run (the message names it).
        NotImplementedError: "h3fusion" on a block layout our ops do not support.
    """
    if implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(
            f"experts_implementation must be one of {', '.join(EXPERTS_IMPLEMENTATIONS)}, got {implementation!r}"
        )
    if implementation == IMPLEMENTATION:
        replace_moe_blocks(model)
    else:
        if any(isinstance(b.experts, LoRAExperts) for b in _moe_blocks(model)):
            raise ValueError(
                f"experts_implementation={implementation!r}: this model's LoRA experts (LoRAExperts) run on "
                "h3fusion_ext.moe_ffn only; fold them first with h3fusion.models.lora_experts.merge_lora_experts "
                "(or `h3fusion export` for a shared-base model)"
            )
        restore_moe_blocks(model)
        pretrained = _pretrained_model(model)
        if not hasattr(pretrained, "set_experts_implementation"):
            raise ValueError(
                f"{type(pretrained).__name__} has no transformers experts interface: "
                f"experts_implementation={implementation!r} needs transformers >= 5"
            )
        pretrained.set_experts_implementation(implementation)
    return current_experts_implementation(model)


def current_experts_implementation(model: nn.Module) -> str | None:
    """What runs the MoE blocks of `model` now: "h3fusion" when they are replaced (or the config names it), else
    the config's transformers implementation ("grouped_mm", "eager", ...); None for a model without a config."""
    blocks = _moe_blocks(model)
    if blocks and all(isinstance(_base_experts(b.experts), (H3FusionExpertsMixin, LoRAExperts)) for b in blocks):
        return IMPLEMENTATION
    config = getattr(_pretrained_model(model), "config", None)
    return getattr(config, "_experts_implementation", None)
