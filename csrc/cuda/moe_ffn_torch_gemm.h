// The "torch" GEMM backend of the CUDA moe_ffn (moe_ffn_torch_gemm.cu): at::_grouped_mm for the four grouped
// GEMMs, with our own route plan, gather, gated-activation and combine kernels around them. Same inputs, outputs and
// contracts as moe_ffn_forward / moe_ffn_backward (csrc/ops.cpp); the caller (moe_ffn.cu) has validated the
// arguments and chosen this backend (moe_gemm_backend.h), which guarantees 16-byte row strides and < 1024 experts.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include <h3fusion/activation.h>

namespace h3fusion::cuda {

// -> y[T,H], sorted_pairs[T*k], pair_rows[T*k], expert_offsets[E+1] int64, gate_up_out[T*k,2F] (x.dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_forward_torch_gemm(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& experts, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, Activation activation);

// -> grad_x[T,H], grad_weights[T,k] (weights.dtype), grad_gate_up_proj[E,2F,H], grad_down_proj[E,H,F].
// need_*: which gradients to compute; one not needed is returned undefined (as aten's native_layer_norm_backward
// does for its output_mask) and its GEMMs are skipped: no weight-gradient GEMMs for frozen experts, no
// W_down^T grad_y when neither x, the routing weights nor gate_up_proj need a gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_backward_torch_gemm(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& sorted_pairs, const at::Tensor& pair_rows,
    const at::Tensor& expert_offsets, const at::Tensor& gate_up_out, bool need_x, bool need_weights,
    bool need_gate_up, bool need_down, Activation activation);

}  // namespace h3fusion::cuda
