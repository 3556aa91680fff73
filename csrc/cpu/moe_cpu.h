// CPU building blocks of the MoE ops shared between moe_plan.cpp and moe_ffn.cpp (the CPU twin of
// csrc/cuda/launchers.cuh). Every function checks its arguments and names them in its errors.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace h3fusion::cpu {

// experts[T,k] int32 -> (sorted_pairs[T*k] int32, pair_rows[T*k] int32, expert_offsets[E+1] int64);
// a stable counting sort by expert, so the pairs of one expert stay in ascending order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_plan(const at::Tensor& experts, int64_t num_experts);

// x[T,H] -> x_sorted[T*k,H], x_sorted[r] = x[sorted_pairs[r] / k].
at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& sorted_pairs, int64_t k);

// rows[T*k,H], weights[T,k] (undefined: all ones), pair_rows[T*k] -> y[T,H] in rows.dtype:
// y[t] = sum_j w[t,j] rows[pair_rows[t*k+j]], summed in slot order with fp32 (fp64) accumulation, no atomics.
at::Tensor combine_rows(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& pair_rows, int64_t k);

}  // namespace h3fusion::cpu
