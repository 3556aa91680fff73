"""Shared-base experts (design.md §11): every expert of a layer = the base FFN (kept once) + that expert's LoRA.

When the aligned models are LoRA adapters of the base, expert i of layer l is *exactly* W_base,l + Δ_i,l with
Δ_i,l = s·B·A of adapter i. `SharedExpertsPlan` turns each adapter's gate / up / down factors into the factors of a
`LoRAExperts` module with a shared base (`[1, 2F, H]`, `[1, H, F]`):
    gate/up: A = [A_gate; A_up] ([r_g + r_u, H]), B = [[s_g B_gate, 0], [0, s_u B_up]] ([2F, r_g + r_u])
    down:    A = A_down ([r_d, F]), B = s_d B_down ([H, r_d])
Each adapter's own scaling s (alpha / r, rsLoRA, rank/alpha patterns) is folded into its B, so the module's scaling
is 1; adapters of different ranks are padded with zero rows of A / columns of B to the largest rank R. Both are exact
(zero factors add nothing; s·B is B's scaling done once ahead of time instead of at every forward).

A full-weight aligned model has no factors; with `delta_rank=r` its per-projection delta from the base is replaced
by its best rank-r approximation (truncated SVD: B = U_r·diag(S_r), A = V_rᵀ; randomized for large matrices, see
`_truncated`), and the relative reconstruction error ‖Δ − Δ_r‖_F / ‖Δ‖_F is recorded per layer, expert and
projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .lora_experts import LoRAExperts
from .lora_merge import LoraAdapterWeights, lora_scaling
from .weight_source import WeightSource

__all__ = ["SharedExpertsPlan", "build_shared_model"]

_MLP = ("gate_proj", "up_proj", "down_proj")


def _adapter_factors(src: LoraAdapterWeights, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A [r, in], s·B [out, r]) in fp32 for one adapted Linear, or None when the adapter leaves it alone."""
    if module not in src._a:
        return None
    a, b = src._a[module].float(), src._b[module].float()
    if src._fan_in_fan_out:  # the stored delta is (B A)ᵀ = Aᵀ Bᵀ
        a, b = b.T, a.T
    return a, b * lora_scaling(src.adapter_config, module)


def _stack(parts: Sequence[tuple[torch.Tensor, torch.Tensor] | None], outs: Sequence[int], fan_in: int):
    """Block-diagonal stacking of factors of projections that share their input (gate and up): A rows stacked, B
    block-diagonal over the output rows. Missing parts contribute no rank."""
    a_rows = [part[0] for part in parts if part is not None]
    rank = sum(a.shape[0] for a in a_rows)
    a = torch.cat(a_rows) if a_rows else torch.zeros(0, fan_in)
    b = torch.zeros(sum(outs), rank)
    row = col = 0
    for part, out in zip(parts, outs, strict=True):
        if part is not None:
            r = part[0].shape[0]
            b[row : row + out, col : col + r] = part[1]
            col += r
        row += out
    return a, b


# Above this many elements the exact SVD costs minutes per matrix (a 7B model's [2F, H] is 90M): a randomized one.
EXACT_SVD_MAX_NUMEL = 1 << 22


def _truncated(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-`rank` factors (A [r, in], B [out, r]) of `delta` [out, in] fp32 and the relative Frobenius error of B·A.

    Small matrices: the exact SVD (the best rank-r approximation). Large ones: `torch.svd_lowrank` (q = 2r + 10,
    6 power iterations, a fixed seed so fusion is reproducible, the caller's RNG untouched). Either way B·A =
    U_r U_rᵀ Δ with orthonormal U_r, so the error reported, sqrt(1 − Σ S_r² / ‖Δ‖²), is exact for the factors kept.
    """
    total = float(delta.double().pow(2).sum())
    exact = delta.numel() <= EXACT_SVD_MAX_NUMEL or 2 * rank + 10 >= min(delta.shape)
    if exact:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(delta, q=2 * rank + 10, niter=6)
        vh = v.T
    r = min(rank, s.shape[0])
    # exact SVD: the dropped singular values themselves (no cancellation when almost nothing is dropped)
    dropped = float(s[r:].double().pow(2).sum()) if exact else max(total - float(s[:r].double().pow(2).sum()), 0.0)
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    return vh[:r].contiguous(), (u[:, :r] * s[:r]).contiguous(), error


class SharedExpertsPlan:
    """Checks that every aligned model can be a shared-base expert and computes the common rank R.

    Args:
        names: expert names, in expert order.
        sources: their weight sources (LoRA adapters of the base, or full models with `delta_rank`).
        base: the base model's weights.
        delta_rank: rank of the truncated SVD for full-weight aligned models (None: refuse them).

    Raises:
        ValueError: naming the aligned model that is neither a LoRA adapter of the base nor allowed by delta_rank,
            or an adapter that replaces MLP weights in full (modules_to_save).
    """

    def __init__(
        self, names: Sequence[str], sources: Sequence[WeightSource], base: WeightSource, delta_rank: int | None
    ):
        if delta_rank is not None and int(delta_rank) < 1:
            raise ValueError(f"delta_rank must be >= 1, got {delta_rank}")
        self.names, self.sources, self.base = list(names), list(sources), base
        self.delta_rank = None if delta_rank is None else int(delta_rank)
        cfg = base.config
        self.num_layers, self.F = cfg.num_hidden_layers, cfg.intermediate_size
        rank = 0
        for name, src in zip(self.names, self.sources, strict=True):
            if isinstance(src, LoraAdapterWeights):
                full = sorted(k for k in src._replace if ".mlp." in k)
                if full:
                    raise ValueError(
                        f"expert {name!r}: the adapter {src.path} replaces MLP weights in full ({full[0]}, ...), so "
                        "its expert is not base + LoRA; fuse with experts='materialised'"
                    )
                for layer in range(self.num_layers):
                    p = f"model.layers.{layer}.mlp."
                    ranks = {m: src._a[p + m].shape[0] if p + m in src._a else 0 for m in _MLP}
                    rank = max(rank, ranks["gate_proj"] + ranks["up_proj"], ranks["down_proj"])
            elif self.delta_rank is None:
                raise ValueError(
                    f"expert {name!r} ({src.description}) is a full model, not a LoRA adapter of the base: "
                    "experts='shared' keeps the base FFN once plus each expert's adapter. Fuse it with "
                    "experts='materialised', or pass delta_rank=r (CLI: --delta-rank r) to approximate its delta "
                    "from the base by a truncated SVD"
                )
            else:
                rank = max(rank, self.delta_rank)
        self.rank = max(rank, 1)
        self.errors: dict[str, dict[str, dict[str, float]]] = {}  # layer -> expert -> projection -> rel. error

    def _factors(self, e: int, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        src, p = self.sources[e], f"model.layers.{layer}.mlp."
        H = self.base.config.hidden_size
        if isinstance(src, LoraAdapterWeights):
            parts = [_adapter_factors(src, p + m) for m in _MLP]
            return {
                "gate_up_proj": _stack(parts[:2], (self.F, self.F), H),
                "down_proj": _stack(parts[2:], (H,), self.F),
            }
        out = {}
        for projection, keys in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            delta = torch.cat([src.get(f"{p}{k}.weight").float() - self.base.get(f"{p}{k}.weight").float()
                               for k in keys])  # fmt: skip
            a, b, err = _truncated(delta, self.delta_rank)
            self.errors.setdefault(str(layer), {}).setdefault(self.names[e], {})[projection] = err
            out[projection] = (a, b)
        return out

    @torch.no_grad()
    def fill_layer(self, experts: LoRAExperts, layer: int) -> None:
        """Write layer `layer`'s base FFN and every expert's (padded, scaled) factors into `experts`."""
        p = f"model.layers.{layer}.mlp."
        gate_up = torch.cat([self.base.get(p + "gate_proj.weight"), self.base.get(p + "up_proj.weight")])
        experts.gate_up_proj[0].copy_(gate_up)
        experts.down_proj[0].copy_(self.base.get(p + "down_proj.weight"))
        for name in ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B"):
            getattr(experts, name).zero_()  # padding rows / columns stay zero
        for e in range(len(self.sources)):
            for projection, (a, b) in self._factors(e, layer).items():
                r = a.shape[0]
                prefix = "gate_up" if projection == "gate_up_proj" else "down"
                getattr(experts, f"{prefix}_lora_A")[e, :r].copy_(a)
                getattr(experts, f"{prefix}_lora_B")[e, :, :r].copy_(b)

    def record(self) -> dict:
        """What the fused config records about the shared experts (`config.h3fusion["shared_experts"]`)."""
        out = {
            "rank": self.rank,
            "scaling": 1.0,
            "rank_handling": "zero-padded to the largest rank; each adapter's scaling folded into its B",
        }
        if self.delta_rank is not None:
            out["delta_rank"] = self.delta_rank
            out["delta_relative_error"] = self.errors
        return out

    def layer_errors(self) -> dict[int, float]:
        """Per layer, the largest relative reconstruction error over experts and projections (SVD experts only)."""
        return {int(k): max(max(v.values()) for v in experts.values()) for k, experts in self.errors.items()}


def build_shared_model(config, rank: int, dtype: torch.dtype, lora_alpha: float | None = None):
    """A `MixtralForCausalLM` whose blocks hold `LoRAExperts` on a shared base, parameters uninitialised.

    Built with one expert per block (so the base FFN `[1, 2F, H]` is allocated once, never E copies), then given the
    config's E-expert routers (`gate.weight [E, H]`) and `LoRAExperts(num_experts=E, rank)` around that base.

    Args:
        config: the fused `MixtralConfig` (num_local_experts = E, num_experts_per_tok = k).
        rank: R, the LoRA rank.
        dtype: the parameters' dtype.
        lora_alpha: default R (scaling 1: the adapters' scalings are folded into B).
    """
    from transformers import MixtralForCausalLM

    from .construction import no_init_weights

    E, k = int(config.num_local_experts), int(config.num_experts_per_tok)
    previous = torch.get_default_dtype()
    config.num_local_experts, config.num_experts_per_tok = 1, 1
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = MixtralForCausalLM(config)
    finally:
        config.num_local_experts, config.num_experts_per_tok = E, k
        torch.set_default_dtype(previous)
    model.to(dtype)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # RoPE frequencies stay fp32 (as in fuse)
    model.num_experts, model.num_experts_per_tok = E, k
    for layer in model.model.layers:
        block = layer.mlp
        block.top_k = block.gate.top_k = k
        block.gate.num_experts = E
        block.gate.weight = torch.nn.Parameter(torch.empty(E, config.hidden_size, dtype=dtype))
        alpha = float(rank) if lora_alpha is None else lora_alpha
        block.experts = LoRAExperts.from_experts(block.experts, rank, alpha, num_experts=E, init="zeros")
    return model.eval()
