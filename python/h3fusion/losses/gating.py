"""H3Fusion training losses: the gating loss, the per-expert drift regularizer and the load-balancing loss.

The H3Fusion objective (design.md §3, "Training") is

    L = L_LM + λ_gate · L_gate + Σ_i γ_i · R_i (+ λ_bal · L_balance)

Router logits follow the transformers convention of `MixtralForCausalLM(..., output_router_logits=True)`: one
tensor `[B*S, E]` per MoE layer, tokens in row-major (batch, sequence) order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

import h3fusion_ext

from .sharded_drift import per_expert_squared_norm, reference_like

__all__ = [
    "canonical_param_name",
    "drift_regularization",
    "expert_drift_norms",
    "expert_reference_state",
    "gating_loss",
    "load_balancing_loss",
    "mean_router_probs",
]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_PARAM_RE = re.compile(r"(?:^|\.)mlp\.experts\.(gate_up_proj|down_proj)$")


def _stack_layers(router_logits: Sequence[torch.Tensor] | torch.Tensor, attention_mask: torch.Tensor):
    """Checks shapes and returns (probs[L, B, S, E], mask[B, S]), both fp32 (fp64 for fp64 logits)."""
    if isinstance(router_logits, torch.Tensor):
        router_logits = [router_logits]
    if len(router_logits) == 0:
        raise ValueError("router_logits must hold one tensor per MoE layer, got none")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, S], got shape {tuple(attention_mask.shape)}")
    b, s = attention_mask.shape
    num_experts = router_logits[0].shape[-1]
    layers = []
    for idx, z in enumerate(router_logits):
        if z.dim() != 2 or z.shape[0] != b * s or z.shape[1] != num_experts:
            raise ValueError(
                f"router_logits[{idx}] must be [B*S, E] = [{b * s}, {num_experts}] to match attention_mask "
                f"{tuple(attention_mask.shape)}, got {tuple(z.shape)}"
            )
        # softmax in at least fp32, as the model's router computes it (design.md §2); an fp64 model stays fp64
        layers.append(torch.softmax(z.to(h3fusion_ext.accumulate_dtype(z.dtype)), dim=-1).view(b, s, num_experts))
    probs = torch.stack(layers, dim=0)
    mask = attention_mask.to(device=probs.device, dtype=probs.dtype)
    return probs, mask


def mean_router_probs(router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
    """Padding-aware mean router probability of each example.

    p̄_b = (1 / (L · n_b)) Σ_l Σ_{s: mask[b,s]=1} softmax(z_{l,b,s}),  n_b = Σ_s mask[b, s].

    Args:
        router_logits: one float tensor [B*S, E] per MoE layer (raw logits, not probabilities).
        attention_mask: [B, S], 1 for real tokens and 0 for padding (any integer/bool/float dtype).

    Returns:
        float32 tensor [B, E]; each row sums to 1.
    """
    probs, mask = _stack_layers(router_logits, attention_mask)
    counts = mask.sum(dim=1)
    if bool((counts <= 0).any()):
        raise ValueError("attention_mask has an example with no real tokens; its router probability is undefined")
    summed = (probs * mask[None, :, :, None]).sum(dim=(0, 2))  # [B, E]
    return summed / (counts[:, None] * probs.shape[0])


def gating_loss(
    router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """H3Fusion gating loss: the NLL of each example's category under its mean router probability.

    L_gate = (1/B) Σ_b −log p̄_b[label_b], with p̄_b from `mean_router_probs` (mean over MoE layers and over the
    example's non-padding tokens of softmax(router logits)). The log is taken of probabilities directly — there is
    no second softmax (the original code's CrossEntropyLoss on probabilities, defect (e)) — and padding tokens do
    not enter the mean (defect (g)).

    Args:
        router_logits: one tensor [B*S, E] per MoE layer.
        attention_mask: [B, S], 1 = real token.
        labels: int64 [B], the expert index of each example's category, in [0, E).

    Returns:
        fp32 scalar.
    """
    pbar = mean_router_probs(router_logits, attention_mask)
    labels = labels.to(device=pbar.device, dtype=torch.long).reshape(-1)
    if labels.shape[0] != pbar.shape[0]:
        raise ValueError(f"labels must be [B] = [{pbar.shape[0]}], got shape {tuple(labels.shape)}")
    if bool(((labels < 0) | (labels >= pbar.shape[1])).any()):
        raise ValueError(f"labels must be expert indices in [0, {pbar.shape[1]}), got {labels.tolist()}")
    picked = pbar.gather(1, labels[:, None]).squeeze(1)
    # clamp only guards log(0) in fp32 underflow; it never changes a representable probability's loss noticeably.
    return -torch.log(picked.clamp_min(torch.finfo(picked.dtype).tiny)).mean()


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None, top_k: int
) -> torch.Tensor:
    """Switch-style load-balancing loss, padding-aware, averaged over MoE layers.

    For each layer l: f_e = (1/(k·T)) Σ_t Σ_{j<k} 1[e_tj = e] (fraction of the top-k assignments routed to e),
    P_e = (1/T) Σ_t softmax(z_t)_e, over the T non-padding tokens; L_l = E · Σ_e f_e · P_e.
    L_balance = (1/L) Σ_l L_l. Perfectly uniform routing gives 1; gradients flow through P only.

    Args:
        router_logits: one tensor [B*S, E] per MoE layer (or [T, E] with attention_mask None).
        attention_mask: [B, S] or None (all tokens real).
        top_k: experts per token, 1 <= top_k <= E.

    Returns:
        fp32 scalar.
    """
    if isinstance(router_logits, torch.Tensor):
        router_logits = [router_logits]
    if attention_mask is None:
        attention_mask = torch.ones(1, router_logits[0].shape[0], device=router_logits[0].device)
    probs, mask = _stack_layers(router_logits, attention_mask)
    num_experts = probs.shape[-1]
    if not 1 <= int(top_k) <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    probs = probs.flatten(1, 2)  # [L, T, E]
    m = mask.reshape(-1)[None, :, None]
    total = m.sum()
    if float(total) <= 0:
        raise ValueError("attention_mask has no real tokens")
    idx = probs.topk(int(top_k), dim=-1).indices
    assign = torch.zeros_like(probs).scatter_(-1, idx, 1.0)
    f = (assign * m).sum(dim=1) / (total * top_k)  # [L, E]
    p = (probs * m).sum(dim=1) / total  # [L, E]
    return (num_experts * (f * p).sum(dim=-1)).mean()


def canonical_param_name(name: str) -> str:
    """Strips wrapper prefixes so a parameter has the same name bare, under PEFT, DDP or torch.compile.

    `base_model.model.model.layers.0.mlp.experts.base_layer.gate_up_proj` -> `model.layers.0.mlp.experts.gate_up_proj`.
    """
    for prefix in ("module.", "_orig_mod.", "base_model.model."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    while ".base_layer." in name:  # nested PEFT wrappers repeat it
        name = name.replace(".base_layer.", ".")
    return name


def expert_reference_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Snapshot θ⁽⁰⁾ of every expert weight (`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj`
    [E, H, F]), detached copies on the parameters' own devices, keyed by `canonical_param_name`."""
    state = {}
    for name, p in model.named_parameters():
        key = canonical_param_name(name)
        if _EXPERT_PARAM_RE.search(key):
            state[key] = p.detach().clone()
    if not state:
        raise ValueError("model has no MoE expert weights (`*.mlp.experts.gate_up_proj` / `down_proj`)")
    return state


def _lora_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Effective LoRA deltas (alpha/r)·B·A of PEFT ParamWrapper-adapted expert weights, keyed like the weights."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # PEFT is optional
        return {}
    deltas: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        key = canonical_param_name(f"{mod_name}.{module.parameter_name}")
        if module.disable_adapters or module.merged:
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            d = module.get_delta_weight(adapter)  # includes the alpha/r scaling
            deltas[key] = d if key not in deltas else deltas[key] + d
    return deltas


def _lora_experts_by_key(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """Our `LoRAExperts` modules' base-weight keys -> (module, projection name)."""
    from ..models.lora_experts import FACTOR_NAMES, LoRAExperts

    return {
        canonical_param_name(f"{name}.{projection}"): (module, projection)
        for name, module in model.named_modules()
        if isinstance(module, LoRAExperts)
        for projection in FACTOR_NAMES
    }


def expert_drift_norms(
    model: torch.nn.Module, reference_state: Mapping[str, torch.Tensor], squared: bool = False
) -> torch.Tensor:
    """R_i for every expert: the mean over MoE layers of ‖ΔW_{i,l}‖₂ (gate, up and down together).

    ΔW = θ − θ⁽⁰⁾ for trainable expert weights, plus the effective (alpha/r)·B·A for LoRA experts (PEFT's, or our
    `LoRAExperts`, whose shared `[1, ...]` base broadcasts over the E adapters).

    Args:
        model: the fused model (bare, PEFT-wrapped or DDP-wrapped).
        reference_state: from `expert_reference_state`, taken at fusion time.
        squared: use ‖ΔW‖² instead of ‖ΔW‖.

    Returns:
        fp32 tensor [E].
    """
    lora = _lora_deltas(model)
    ours = _lora_experts_by_key(model)  # our LoRAExperts: (module, projection) per base-weight key
    per_layer: dict[int, torch.Tensor] = {}
    seen = set()
    for name, p in model.named_parameters():
        key = canonical_param_name(name)
        if key not in reference_state:
            continue
        seen.add(key)
        ref = reference_state[key]
        if ref.shape != p.shape:
            raise ValueError(f"reference_state[{key!r}] has shape {tuple(ref.shape)}, the model's {tuple(p.shape)}")
        delta = (p - reference_like(ref, p)) if p.requires_grad else None  # DTensor under FSDP2 (design.md §9)
        if key in lora:
            delta = lora[key] if delta is None else delta + lora[key]
        if key in ours and delta is None:  # frozen base: ‖s·B·A‖² from r×r Gram matrices, no [out, in] product
            sq = ours[key][0].delta_squared_norms(ours[key][1])
        else:
            if key in ours:
                delta = delta + ours[key][0].delta_weight(ours[key][1])  # [1 or E, ...] + [E, ...]
            if delta is None:
                continue  # frozen and not adapted: no drift possible
            sq = per_expert_squared_norm(delta)  # [E], per-shard partial sums gathered when sharded
        layer = int(_LAYER_RE.search(key).group(1)) if _LAYER_RE.search(key) else -1
        per_layer[layer] = per_layer[layer] + sq if layer in per_layer else sq
    missing = set(reference_state) - seen
    if missing:
        raise ValueError(f"reference_state names weights the model does not have: {sorted(missing)[:3]}")
    if not per_layer:
        # nothing trainable: R = 0, but keep the graph-free scalar on the right device
        any_ref = next(iter(reference_state.values()))
        return torch.zeros(any_ref.shape[0], device=any_ref.device)
    num_layers = len({int(m.group(1)) for k in reference_state if (m := _LAYER_RE.search(k))} or {-1})
    sq_sum = torch.stack(list(per_layer.values()))  # [L', E]
    if squared:
        per = sq_sum
    else:
        # sqrt with a zero (sub)gradient at ΔW = 0 (the first step of full-weight training); plain sqrt gives NaN.
        pos = sq_sum > 0
        per = torch.where(pos, sq_sum, torch.ones_like(sq_sum)).sqrt() * pos
    return per.sum(dim=0) / num_layers


def drift_regularization(
    model: torch.nn.Module,
    reference_state: Mapping[str, torch.Tensor],
    gammas: Sequence[float] | torch.Tensor,
    squared: bool = False,
) -> torch.Tensor:
    """Σ_i γ_i · R_i with R_i = (1/L) Σ_l ‖ΔW_{i,l}‖₂ (design.md §3); see `expert_drift_norms`.

    Args:
        model: the fused model.
        reference_state: expert weights at fusion time (`expert_reference_state`).
        gammas: one non-negative weight per expert (length E).
        squared: use the squared norm.

    Returns:
        fp32 scalar.
    """
    norms = expert_drift_norms(model, reference_state, squared=squared)
    g = torch.as_tensor(gammas, dtype=norms.dtype, device=norms.device).reshape(-1)
    if g.shape[0] != norms.shape[0]:
        raise ValueError(f"gammas must have one entry per expert ({norms.shape[0]}), got {g.shape[0]}")
    if bool((g < 0).any()):
        raise ValueError(f"gammas must be non-negative, got {g.tolist()}")
    return (g * norms).sum()
