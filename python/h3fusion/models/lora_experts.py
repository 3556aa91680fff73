"""LoRA experts on `h3fusion_ext.moe_ffn`: expert e computes with W_e + s·B_e·A_e without ever forming that sum.

`LoRAExperts` holds the base expert weights (per expert `[E, ...]`, or one base shared by every expert `[1, ...]`,
design.md §11) and per-expert LoRA factors for both projections, and has transformers' experts signature
`forward(hidden_states[T, H], top_k_index[T, k], top_k_weights[T, k]) -> [T, H]`, so it takes the place of
`MixtralExperts` inside Mixtral's sparse MoE block (`block.experts`).

Factor layout (the `h3fusion_ext.ExpertLoRA` one; E experts, rank r, hidden H, FFN width F):
    gate_up_lora_A [E, r, H], gate_up_lora_B [E, 2F, r]     (rows 0..F-1 of B: gate, F..2F-1: up)
    down_lora_A    [E, r, F], down_lora_B    [E, H, r]
    scaling s = lora_alpha / r (PEFT's rule)
"""

from __future__ import annotations

import math

import torch
from torch import nn

import h3fusion_ext

from .experts_layout import check_experts_layout, moe_blocks

__all__ = [
    "FACTOR_NAMES",
    "LoRAExperts",
    "add_lora_experts",
    "is_lora_factor",
    "lora_experts_modules",
    "merge_lora_experts",
]

# projection -> (A name, B name); the projections in the order transformers registers their base weights
FACTOR_NAMES = {"gate_up_proj": ("gate_up_lora_A", "gate_up_lora_B"), "down_proj": ("down_lora_A", "down_lora_B")}
_FACTORS = tuple(n for pair in FACTOR_NAMES.values() for n in pair)


def is_lora_factor(name: str) -> bool:
    """True for the parameter names of `LoRAExperts`' factors (`...experts.gate_up_lora_A`, ...)."""
    return name.rsplit(".", 1)[-1] in _FACTORS


class LoRAExperts(nn.Module):
    """Experts with per-expert LoRA on both projections, run by `h3fusion_ext.moe_ffn(..., lora=...)`.

    Args:
        gate_up_proj: base `[E, 2F, H]` or shared `[1, 2F, H]` (a Parameter is kept as is, so it may be shared with
            another module; a plain tensor becomes a frozen Parameter).
        down_proj: base `[E, H, F]` or shared `[1, H, F]`, same dtype and device.
        num_experts: E (> 1 allowed with a shared base).
        rank: r >= 1.
        lora_alpha: s = lora_alpha / r (default: alpha = 2r, s = 2).
        init: "peft" (A ~ U(±1/sqrt(in)), B = 0: PEFT's default, the adapters start at zero), "zeros", or
            "empty" (the caller fills the factors).
        activation: the gate's activation, "silu" (SwiGLU), "gelu" or "gelu_tanh" (GeGLU).

    Saving: `h3fusion.save_fused_model` (shared base), `lora_adapter_io.save_lora_adapter` (a PEFT adapter), or
    `merge_lora_experts` first. transformers' own `save_pretrained` writes the factors under names its
    `from_pretrained` reports as UNEXPECTED and drops.

    Raises:
        ValueError: shapes that do not fit together (the message names the argument).
    """

    def __init__(
        self,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        num_experts: int,
        rank: int,
        lora_alpha: float | None = None,
        *,
        init: str = "peft",
        activation: str = "silu",
    ):
        super().__init__()
        if activation not in ("silu", "gelu", "gelu_tanh"):
            raise ValueError(f"activation must be 'silu', 'gelu' or 'gelu_tanh', got {activation!r}")
        self.moe_ffn_activation = activation  # what `experts_layout.experts_activation` reads
        if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
            raise ValueError(
                f"gate_up_proj and down_proj must be 3-D, got {tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
            )
        base, two_f, hidden = gate_up_proj.shape
        if two_f % 2 or tuple(down_proj.shape) != (base, hidden, two_f // 2):
            raise ValueError(
                f"down_proj {tuple(down_proj.shape)} does not fit gate_up_proj {tuple(gate_up_proj.shape)} "
                "([E, 2F, H] and [E, H, F])"
            )
        if int(num_experts) < 1 or base not in (1, int(num_experts)):
            raise ValueError(f"num_experts={num_experts}: the base holds {base} experts (expected 1 = shared, or E)")
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.num_experts, self.rank = int(num_experts), int(rank)
        self.hidden_size, self.intermediate_size = hidden, two_f // 2
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else 2 * self.rank)
        as_param = lambda t: t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.gate_up_proj, self.down_proj = as_param(gate_up_proj), as_param(down_proj)
        E, r, H, F = self.num_experts, self.rank, hidden, self.intermediate_size
        kw = dict(dtype=gate_up_proj.dtype, device=gate_up_proj.device)
        self.gate_up_lora_A = nn.Parameter(torch.empty(E, r, H, **kw))
        self.gate_up_lora_B = nn.Parameter(torch.empty(E, 2 * F, r, **kw))
        self.down_lora_A = nn.Parameter(torch.empty(E, r, F, **kw))
        self.down_lora_B = nn.Parameter(torch.empty(E, H, r, **kw))
        self._plain: tuple[nn.Module, ...] = ()  # the transformers experts module this one replaced (see merge)
        if init != "empty":
            self.reset_lora_parameters(init)

    @property
    def scaling(self) -> float:
        """s = lora_alpha / rank."""
        return self.lora_alpha / self.rank

    @property
    def shared_base(self) -> bool:
        """True when one base FFN (`[1, ...]`) serves every expert."""
        return self.gate_up_proj.shape[0] == 1 and self.num_experts > 1

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "peft") -> None:
        """Initialise the factors: "peft": A ~ U(±1/sqrt(in)) (PEFT's kaiming-uniform, a=sqrt(5)), B = 0; "zeros"."""
        if init not in ("peft", "zeros"):
            raise ValueError(f"init must be 'peft', 'zeros' or 'empty', got {init!r}")
        for a_name, b_name in FACTOR_NAMES.values():
            a, b = getattr(self, a_name), getattr(self, b_name)
            b.zero_()
            if init == "zeros":
                a.zero_()
            else:
                bound = 1.0 / math.sqrt(a.shape[-1])
                a.uniform_(-bound, bound)

    @classmethod
    def from_experts(
        cls, experts: nn.Module, rank: int, lora_alpha: float | None = None, *, num_experts: int | None = None, **kw
    ) -> LoRAExperts:
        """LoRA experts on a transformers experts module's weights, shared (not copied) and frozen.

        Args:
            experts: e.g. `MixtralExperts` (`gate_up_proj[E, 2F, H]`, `down_proj[E, H, F]`; E = 1 with
                `num_experts` > 1 makes a shared base).
            rank, lora_alpha, **kw: see `LoRAExperts`.
            num_experts: E (default: the module's own).

        Returns:
            the new module; `merge_lora_experts` puts `experts` back with the merged weights.
        """
        activation = check_experts_layout(experts)
        gate_up, down = experts.gate_up_proj, experts.down_proj
        gate_up.requires_grad_(False)
        down.requires_grad_(False)
        out = cls(gate_up, down, num_experts or gate_up.shape[0], rank, lora_alpha, activation=activation, **kw)
        out._plain = (experts,)
        return out

    def lora(self) -> h3fusion_ext.ExpertLoRA:
        """The factors as the op's `ExpertLoRA`."""
        return h3fusion_ext.ExpertLoRA(
            self.gate_up_lora_A, self.gate_up_lora_B, self.down_lora_A, self.down_lora_B, self.scaling
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers' experts call.

        Args:
            hidden_states: [T, H] in the weights' dtype.
            top_k_index: [T, k] expert ids (int64 from transformers' routers, int32 from ours).
            top_k_weights: [T, k] routing weights (fp32 or the model dtype).

        Returns:
            [T, H] in hidden_states.dtype.
        """
        return h3fusion_ext.moe_ffn(
            hidden_states,
            top_k_weights.to(h3fusion_ext.accumulate_dtype(hidden_states.dtype, top_k_weights.dtype)),
            top_k_index.to(torch.int32),
            self.gate_up_proj,
            self.down_proj,
            lora=self.lora(),
            activation=self.moe_ffn_activation,
        )

    def delta_weight(self, projection: str) -> torch.Tensor:
        """s·B_e·A_e for every expert: [E, 2F, H] ("gate_up_proj") or [E, H, F] ("down_proj"), fp32 (fp64 for fp64
        factors), differentiable."""
        a_name, b_name = FACTOR_NAMES[projection]
        a, b = getattr(self, a_name), getattr(self, b_name)
        acc = h3fusion_ext.accumulate_dtype(a.dtype, b.dtype)
        return torch.bmm(b.to(acc), a.to(acc)) * self.scaling

    def delta_squared_norms(self, projection: str) -> torch.Tensor:
        """‖s·B_e·A_e‖_F² per expert, [E] fp32 (fp64 for fp64 factors), differentiable, from the r×r Gram matrices
        (no [out, in] product): ‖BA‖² = trace(AᵀBᵀBA) = Σ (BᵀB) ⊙ (AAᵀ)."""
        a_name, b_name = FACTOR_NAMES[projection]
        a, b = getattr(self, a_name), getattr(self, b_name)
        acc = h3fusion_ext.accumulate_dtype(a.dtype, b.dtype)
        a, b = a.to(acc), b.to(acc)
        gram_b = torch.bmm(b.transpose(1, 2), b)  # [E, r, r]
        gram_a = torch.bmm(a, a.transpose(1, 2))  # [E, r, r]
        return (gram_b * gram_a).sum(dim=(1, 2)) * self.scaling**2

    @torch.no_grad()
    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective expert weights W_e + s·B_e·A_e, summed in fp32 (fp64 for fp64 weights) and cast to the base
        dtype.

        Returns:
            gate_up_proj [E, 2F, H], down_proj [E, H, F] (new tensors).
        """
        out = []
        for projection in FACTOR_NAMES:
            base = getattr(self, projection)
            delta = self.delta_weight(projection)
            acc = h3fusion_ext.accumulate_dtype(base.dtype, delta.dtype)  # an fp64 base is never rounded to fp32
            merged = base.to(acc).expand(self.num_experts, -1, -1) + delta.to(acc)
            out.append(merged.to(base.dtype))
        return out[0], out[1]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, rank={self.rank}, lora_alpha={self.lora_alpha}, "
            f"shared_base={self.shared_base}, activation={self.moe_ffn_activation!r}"
        )


def lora_experts_modules(model: nn.Module) -> list[tuple[str, LoRAExperts]]:
    """(qualified name, module) for every `LoRAExperts` in `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAExperts)]


def add_lora_experts(model: nn.Module, rank: int, lora_alpha: float | None = None) -> int:
    """Replace the experts of every MoE block of `model` by `LoRAExperts` on the same (frozen) base weights.

    Args:
        model: a transformers MoE model (Mixtral layout), not PEFT-wrapped.
        rank, lora_alpha: see `LoRAExperts`.

    Returns:
        The number of blocks changed.

    Raises:
        ValueError: a block already has LoRA experts, or its experts are wrapped (PEFT).
        NotImplementedError: an experts layout our op does not run (see `experts_layout`).
    """
    blocks = moe_blocks(model)
    for block in blocks:  # validate all first: a refusal changes nothing
        experts = block.experts
        if isinstance(experts, LoRAExperts):
            raise ValueError(f"{type(block).__name__} already has LoRA experts (rank {experts.rank})")
        if isinstance(getattr(experts, "base_layer", None), nn.Module):
            raise ValueError(f"{type(block).__name__}: the experts are wrapped (PEFT); merge or unload them first")
        check_experts_layout(experts)
    for block in blocks:
        block.experts = LoRAExperts.from_experts(block.experts, rank, lora_alpha)
    return len(blocks)


@torch.no_grad()
def merge_lora_experts(model: nn.Module) -> nn.Module:
    """Fold every `LoRAExperts` into plain transformers experts with W_e + s·B_e·A_e (in place).

    The module each one replaced (`LoRAExperts.from_experts`) comes back holding the merged `[E, ...]` weights, so
    the model is a plain transformers model again (`save_pretrained` / `from_pretrained` round-trip it).

    Returns:
        `model`.

    Raises:
        ValueError: a `LoRAExperts` built without a transformers module to return to.
    """
    for name, module in lora_experts_modules(model):
        if not module._plain:
            raise ValueError(f"{name}: LoRA experts built without a transformers experts module cannot be merged")
        plain = module._plain[0]
        gate_up, down = module.merged_weights()
        plain.gate_up_proj = nn.Parameter(gate_up, requires_grad=module.gate_up_proj.requires_grad)
        plain.down_proj = nn.Parameter(down, requires_grad=module.down_proj.requires_grad)
        if hasattr(plain, "num_experts"):
            plain.num_experts = module.num_experts
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model
