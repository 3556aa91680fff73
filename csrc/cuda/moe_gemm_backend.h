// Which grouped-GEMM backend the CUDA moe_ffn runs: our WMMA/SIMT kernels ("own", grouped_gemm_*.cu) or
// at::_grouped_mm ("torch", moe_ffn_torch_gemm.cu). Implemented in moe_gemm_backend.cpp.
//
// Mode (process-wide): H3FUSION_GROUPED_GEMM=auto|own|torch, read once at the first moe_ffn call on CUDA (unset or
// empty = auto); the op moe_ffn_set_gemm_backend changes it at run time (tests, benchmarks).
//   auto:  torch where at::_grouped_mm has its device-side path (no host sync) for the call, own elsewhere;
//   own:   always our kernels;
//   torch: at::_grouped_mm wherever it accepts the operands, including torch's host-synchronising fallback loop
//          (float32/float16, or GPUs other than sm_90/sm_100, torch >= 2.9); a call it cannot take is an error
//          that says why, never a silent switch to our kernels.
// at::_grouped_mm's device-side path (torch's CUTLASS kernels) needs: a torch that has it (2.8+), bfloat16,
// compute capability 9.x (10.x too from torch 2.9), 16-byte row strides (H and F multiples of 8 in bf16),
// fewer than 1024 experts and 16-byte aligned expert weights.
#pragma once

#include <ATen/core/Tensor.h>

// 1 when this torch has at::_grouped_mm (torch >= 2.8, CUDA); the "torch" backend compiles to a stub otherwise.
#if __has_include(<ATen/ops/_grouped_mm.h>) && !defined(USE_ROCM)
#define H3FUSION_HAS_GROUPED_MM 1
#else
#define H3FUSION_HAS_GROUPED_MM 0
#endif

namespace h3fusion::cuda {

enum class MoeGemmBackend { kOwn, kTorch };

// The backend for one moe_ffn call with activations x[T,H] and weights gate_up_proj[E,2F,H], down_proj[E,H,F]
// (already validated), under the current mode. Records the choice for moe_ffn_gemm_backend(). Raises when the
// mode is "torch" and at::_grouped_mm cannot take these operands.
MoeGemmBackend choose_moe_gemm_backend(const at::Tensor& x, const at::Tensor& gate_up_proj,
                                       const at::Tensor& down_proj);

}  // namespace h3fusion::cuda
