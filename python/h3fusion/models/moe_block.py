"""H3FusionMoE: one MoE layer (design.md §2) as an nn.Module over the h3fusion_ext ops.

Router logits in fp32 -> `topk_route` (softmax, top-k, Mixtral renormalisation) -> `moe_ffn` (grouped SwiGLU experts).
The weight layout is transformers v5's `MixtralExperts`, so weights copy (or alias) across with no reshaping.
"""

from __future__ import annotations

import torch
from torch import nn

import h3fusion_ext

from .hf_experts import router_logits


class H3FusionRouter(nn.Module):
    """The router: `weight[E, H]`; logits = x W^T computed in fp32 for bf16/fp16/fp32 (fp64 stays fp64)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[T, H] (any float dtype) -> router logits [T, E], float32 (float64 for an fp64 model)."""
        return router_logits(x, self.weight)


class H3FusionExperts(nn.Module):
    """The experts' weights: `gate_up_proj[E, 2F, H]` (rows 0..F-1 gate, F..2F-1 up) and `down_proj[E, H, F]`, and
    their gated activation ("silu": SwiGLU, "gelu" / "gelu_tanh": GeGLU)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, activation: str = "silu"):
        super().__init__()
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x[T, H], weights[T, k] fp32, experts[T, k] int32 -> y[T, H] in x.dtype."""
        return h3fusion_ext.moe_ffn(
            x, weights, experts, self.gate_up_proj, self.down_proj, activation=getattr(self, "activation", "silu")
        )


class H3FusionMoE(nn.Module):
    """A sparse MoE layer: y_t = sum_j w_tj FFN_{e_tj}(x_t), FFN_e(x) = W_down[e] (act(W_gate[e] x) * W_up[e] x).

    Parameters: `router.weight[E, H]`, `experts.gate_up_proj[E, 2F, H]`, `experts.down_proj[E, H, F]`.

    Args:
        hidden_size: H.
        intermediate_size: F, each expert's FFN width.
        num_experts: E >= 1.
        top_k: experts per token, 1 <= top_k <= E.
        renormalize: rescale the kept top-k probabilities to sum to 1 (Mixtral's rule).
        initializer_range: std of the normal initialisation of all three parameters.
        activation: the experts' gated activation, "silu" (SwiGLU), "gelu" or "gelu_tanh" (GeGLU).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool = True,
        initializer_range: float = 0.02,
        activation: str = "silu",
    ):
        super().__init__()
        for arg, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.router = H3FusionRouter(hidden_size, num_experts)
        self.experts = H3FusionExperts(hidden_size, intermediate_size, num_experts, activation)
        self.reset_parameters(initializer_range)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) init of router and experts (transformers' Mixtral rule)."""
        for p in (self.router.weight, self.experts.gate_up_proj, self.experts.down_proj):
            p.normal_(0.0, std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route and run the experts.

        Args:
            x: [..., H] activations (fp32, bf16 or fp16), on the parameters' device.

        Returns:
            y: [..., H] in x.dtype.
            router_logits: [T, E] float32, T = x.numel() // H (what gating and load-balancing losses consume).
        """
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: last dimension {x.shape[-1]} != hidden_size {self.hidden_size}")
        flat = x.reshape(-1, self.hidden_size)
        logits = self.router(flat)
        weights, experts = h3fusion_ext.topk_route(logits, self.top_k, self.renormalize)
        y = self.experts(flat, weights, experts)
        return y.reshape(x.shape), logits

    @classmethod
    def from_hf_block(cls, block, renormalize: bool | None = None) -> H3FusionMoE:
        """Build from a transformers MoE block with `.gate.weight[E,H]` and `.experts.{gate_up_proj,down_proj}`,
        sharing (not copying) its parameters.

        Raises:
            ValueError: the block's layout is not Mixtral's, or its router/experts are wrapped (PEFT).
        """
        from .hf_experts import _base_experts, _check_experts_layout, _routers, check_block

        check_block(block)
        gate, experts = block.gate, block.experts
        if _routers(gate) != [gate] or _base_experts(experts) is not experts:
            # a PEFT-wrapped block computes its weights in forward (W + BA); sharing its raw parameters would drop BA
            raise ValueError(f"{type(block).__name__}: wrapped (e.g. PEFT) router or experts; merge the adapters first")
        E, twoF, H = experts.gate_up_proj.shape
        if renormalize is None:
            renormalize = bool(getattr(gate, "norm_topk_prob", True))
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.hidden_size, out.intermediate_size, out.num_experts = H, twoF // 2, E
        out.top_k, out.renormalize = int(gate.top_k), renormalize
        out.router = H3FusionRouter.__new__(H3FusionRouter)
        nn.Module.__init__(out.router)
        out.router.weight = gate.weight
        out.experts = H3FusionExperts.__new__(H3FusionExperts)
        nn.Module.__init__(out.experts)
        out.experts.gate_up_proj, out.experts.down_proj = experts.gate_up_proj, experts.down_proj
        out.experts.activation = _check_experts_layout(experts)
        return out

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
            f"activation={self.experts.activation}"
        )
