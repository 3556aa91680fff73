// Argument checks of the CUDA ops (topk_route, moe_route_plan, moe_gather, moe_combine, moe_ffn, moe_lora_ffn,
// linear_logprob): every error a caller can cause is raised by one of these functions, defined in arg_checks.cpp and
// so compiled by the C++ compiler, not by nvcc's host pass; h3fusion/checks.h says why. What stays in the .cu files
// is internal: launch limits and kernel-launch errors. (The GEMM-backend choice and its refusals, host code only,
// live in moe_gemm_backend.cpp for the same reason.)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "h3fusion/op_checks.h"

namespace h3fusion::cuda {

// t must live on a CUDA device (the op's other tensors are checked against it with check_same_device).
void check_cuda(const at::Tensor& t, const char* name);

// topk_route, topk_route_backward, moe_route_plan: the checks both devices share (h3fusion/op_checks.h), then the
// tensors on CUDA.
void check_topk_route(const at::Tensor& logits, int64_t k);

void check_topk_route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& experts);

void check_route_plan(const at::Tensor& experts, int64_t num_experts);

// moe_gather: x [T, H] floating on CUDA, sorted_pairs [T*k] int32 on x's device, k >= 1, T*k <= 2^31 - 1.
void check_gather_rows(const at::Tensor& x, const at::Tensor& sorted_pairs, int64_t k);

// moe_combine: rows [T*k, H] floating on CUDA, weights [T, k] floating and pair_rows [T*k] int32 on rows' device.
void check_combine_rows(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& pair_rows);

// moe_ffn forward and backward: x float32/bfloat16/float16 on CUDA (float64 is CPU-only), then the checks both
// devices share (h3fusion/op_checks.h: check_moe_ffn_args).
MoeDims check_moe_ffn_common(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                             const at::Tensor& down_proj);

// (moe_ffn's experts and backward arguments take the shared checks as they are: check_moe_ffn_experts,
// check_moe_ffn_backward_args.)

// moe_lora_ffn on CUDA: x floating, not float64, on CUDA (the rest is lora::check_args, shared with the CPU).
void check_moe_lora_x(const at::Tensor& x);

// linear_logprob on CUDA: hidden on CUDA (the rest is logprob::check_inputs, shared with the CPU).
void check_logprob_hidden(const at::Tensor& hidden);

}  // namespace h3fusion::cuda
