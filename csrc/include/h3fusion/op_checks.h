// Argument checks of the routing and moe_ffn ops that the CPU and CUDA implementations share: one definition each
// (csrc/op_checks.cpp, built by the C++ compiler: h3fusion/checks.h says why), so both devices accept the same
// arguments and raise the same message naming the same argument. What is device-specific stays with the device:
// the CPU checks index values as it reads them (expert ids, sorted_pairs entries), which CUDA cannot without a
// host-device sync; CUDA requires CUDA tensors and refuses float64 (csrc/cuda/arg_checks.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace h3fusion {

// topk_route: logits [T, E] floating, 1 <= k <= E < 2^31 - 1 (expert ids are int32).
void check_topk_route_args(const at::Tensor& logits, int64_t k);

// topk_route_backward: logits as above; experts [T, k] int32 and grad_weights [T, k] floating on logits' device,
// 1 <= k <= E.
void check_topk_route_backward_args(const at::Tensor& grad_weights, const at::Tensor& logits,
                                    const at::Tensor& experts);

// moe_route_plan: experts [T, k] int32 with T*k < 2^31 (the plan's indices are int32), 1 <= num_experts < 2^31 - 1.
void check_route_plan_args(const at::Tensor& experts, int64_t num_experts);

// moe_ffn's sizes: T tokens, hidden H, k slots, E experts, intermediate F.
struct MoeDims {
  int64_t T, H, k, E, F;
};

// moe_ffn forward and backward: x [T, H] floating, weights [T, k] float32 or x's dtype, gate_up_proj [E, 2F, H] and
// down_proj [E, H, F] in x's dtype (check_expert_weights), E >= 1, k >= 1 (k > E is legal: a token may list one
// expert twice, each pair its own row), T*k < 2^31, all on x's device.
MoeDims check_moe_ffn_args(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                           const at::Tensor& down_proj);

// moe_ffn forward: experts [T, k] int32 on x's device.
void check_moe_ffn_experts(const at::Tensor& experts, const at::Tensor& x, const MoeDims& d);

// moe_ffn backward: grad_y [T, H] floating (any float dtype: the ops cast it to x's); sorted_pairs and pair_rows
// [T*k] int32; expert_offsets [E+1] int64; gate_up_out [T*k, 2F] in x's dtype and not the empty stand-in of a
// forward run without save_pre_activation; all on x's device.
void check_moe_ffn_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& sorted_pairs,
                                 const at::Tensor& pair_rows, const at::Tensor& expert_offsets,
                                 const at::Tensor& gate_up_out, const MoeDims& d);

}  // namespace h3fusion
