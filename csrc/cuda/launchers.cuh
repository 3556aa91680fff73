// Host-side entry points shared between the CUDA files (permutation, gather, combine are building blocks of
// moe_ffn). Each is implemented in the .cu named beside it; all run on the current stream with no host sync.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace h3fusion::cuda {

// moe_plan.cu: experts[T,k] int32 -> (sorted_pairs[T*k] int32, pair_rows[T*k] int32, expert_offsets[E+1] int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_plan(const at::Tensor& experts, int64_t num_experts);

// moe_plan.cu: rows[N, ...] (contiguous, any dtype) <- 0 for rows [expert_offsets[E], N): the rows route_plan
// gives to pairs whose expert id is outside [0, E) and that no grouped GEMM writes. Reads offsets on the device.
void zero_unrouted_rows(const at::Tensor& rows, const at::Tensor& expert_offsets);

// moe_plan.cu: x[T,H] -> x_sorted[T*k,H], x_sorted[r] = x[sorted_pairs[r] / k].
at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& sorted_pairs, int64_t k);

// moe_plan.cu: rows[T*k,H], weights[T,k], pair_rows[T*k] -> y[T,H] (rows.dtype, fp32 accumulation, no atomics).
at::Tensor combine_rows(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& pair_rows);

}  // namespace h3fusion::cuda
