"""h3fusion_ext: MoE routing, permutation, fused expert FFN and linear-log-prob ops for CPU and CUDA.

Public ops (autograd-aware, `torch.compile`-traceable):
    topk_route(logits[T,E], k, renormalize=True) -> (weights[T,k] fp32, experts[T,k] int32)
    moe_ffn(x[T,H], weights[T,k], experts[T,k], gate_up_proj[E,2F,H], down_proj[E,H,F], *, lora=None,
            activation="silu") -> y[T,H]   (lora: ExpertLoRA per-expert adapters, optionally on a shared base)
    linear_logprob(hidden[N,H], weight[V,H], targets[N], ignore_index=-100) -> logp[N] fp32
`accumulate_dtype(*dtypes)` is the dtype they accumulate in (fp64 for fp64, else fp32).
`h3fusion_ext.reference` has the same functions in plain PyTorch (the test oracle).
"""

from . import (
    moe_lora,  # noqa: F401  (registers the LoRA op's fake kernels and autograd)
    reference,
)
from ._dtypes import accumulate_dtype
from ._library import has_cuda_kernels
from .gemm_backend import moe_ffn_backend, moe_ffn_gemm_mode, set_moe_ffn_gemm_mode
from .logprob import linear_logprob
from .moe import ExpertLoRA, moe_combine, moe_ffn, moe_gather, moe_route_plan
from .routing import topk_route

__all__ = [
    "ExpertLoRA",
    "accumulate_dtype",
    "has_cuda_kernels",
    "linear_logprob",
    "moe_combine",
    "moe_ffn",
    "moe_ffn_backend",
    "moe_ffn_gemm_mode",
    "moe_gather",
    "moe_route_plan",
    "reference",
    "set_moe_ffn_gemm_mode",
    "topk_route",
]
__version__ = "0.1.0"
