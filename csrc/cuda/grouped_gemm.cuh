// Host entry points of the grouped expert GEMMs used by moe_ffn on CUDA (implemented in grouped_gemm_*.cu).
//
// Shared vocabulary (design.md §5): R = T*k rows in expert-sorted order; rows of expert e are
// [expert_offsets[e], expert_offsets[e+1]) (int64, on the device; their values are never read on the host);
// sorted_pairs[r] = p = t*k + j names the (token, slot) pair of row r, so row r reads token t = p / k.
// Every entry point runs on the current stream, allocates nothing it returns except where stated, never
// synchronises with the host (CUDA-graph capturable) and is deterministic (no floating-point atomics).
// dtypes: float32 (SIMT fp32 path), bfloat16 and float16 (WMMA tensor cores, fp32 accumulation).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include <h3fusion/activation.h>

namespace h3fusion::cuda {

// expert_offsets[E+1] int64 -> tile_starts[E+1] int64, tile_starts[e] = sum_{e' < e} ceil(count_e' / 64):
// the schedule of the row-grouped GEMMs below (one block per 64-row tile of one expert). Device-only work.
at::Tensor grouped_tile_starts(const at::Tensor& expert_offsets);

// Forward gate/up projection with the gated activation fused into the epilogue (grouped_gemm_fwd.cu):
//   h[r, n]    = sum_i x[sorted_pairs[r] / k, i] * gate_up_proj[e(r), n, i]      (n in [0, 2F), written to h)
//   act[r, f]  = act(h[r, f]) * h[r, F + f]                                      (f in [0, F), from the rounded h)
// x[T,H], sorted_pairs[R] int32, gate_up_proj[E,2F,H]; h[R,2F] and act[R,F] preallocated in x.dtype.
void grouped_gate_up_act(const at::Tensor& x, const at::Tensor& sorted_pairs, int64_t k,
                         const at::Tensor& gate_up_proj, const at::Tensor& expert_offsets,
                         const at::Tensor& tile_starts, const at::Tensor& h, const at::Tensor& act,
                         Activation activation);

// out[r, n] = sum_i a[r, i] * w[e(r), n, i]  (a "linear" per expert; grouped_gemm_fwd.cu).
// a[R,K], w[E,N,K] (same dtype), out[R,N] preallocated in a.dtype.
void grouped_linear(const at::Tensor& a, const at::Tensor& w, const at::Tensor& expert_offsets,
                    const at::Tensor& tile_starts, const at::Tensor& out);

// out[r, n] = sum_i a[src(r), i] * w[e(r), i, n]  (the transposed weight; grouped_gemm_dgrad.cu), where
// src(r) = a_rows[r] / a_row_div when a_rows is defined (a read through the permutation) and r otherwise.
// a[*,K], w[E,K,N] (same dtype), out[R,N] preallocated in a.dtype or float32.
void grouped_linear_t(const at::Tensor& a, const at::Tensor& a_rows, int64_t a_row_div, const at::Tensor& w,
                      const at::Tensor& expert_offsets, const at::Tensor& tile_starts, const at::Tensor& out);

// Weight gradient, a grouped GEMM whose reduction runs over each expert's rows (grouped_gemm_wgrad.cu):
//   out[e, m, n] = sum_{r in e, in row order} (s(r) * p[prow(r), m]) * q[qrow(r), n]
// prow(r) = p_rows[r] / p_div if p_rows is defined else r (likewise qrow); s(r) = p_scale[p_rows[r]] if p_scale
// is defined (p_scale float32, indexed by the pair) else 1. p[*,M], q[*,N] same dtype; out[E,M,N] preallocated
// in that dtype. Experts without rows get exact zeros.
void grouped_wgrad(const at::Tensor& p, const at::Tensor& p_rows, int64_t p_div, const at::Tensor& p_scale,
                   const at::Tensor& q, const at::Tensor& q_rows, int64_t q_div, const at::Tensor& expert_offsets,
                   const at::Tensor& out);

// Backward of a = act(g) * u and of the routing weight (grouped_gemm_wgrad.cu), one block per row r:
//   with w = weights_f32[sorted_pairs[r]], a = act recomputed from h exactly as the forward rounded it,
//   grad_w[sorted_pairs[r]] = sum_f u_grad[r, f] * a[r, f]        (u_grad = W_down^T grad_y, float32 [R,F])
//   dh[r, f] = w u_grad[r,f] * up * act'(gate),  dh[r, F+f] = w u_grad[r,f] * act(gate)
// h[R,2F] (x.dtype), weights_f32[T*k] float32; writes dh[R,2F] (x.dtype), act[R,F] (x.dtype),
// grad_w[T*k] float32 (every pair is written exactly once, by its own row).
void gated_act_backward(const at::Tensor& u_grad, const at::Tensor& h, const at::Tensor& weights_f32,
                        const at::Tensor& sorted_pairs, const at::Tensor& dh, const at::Tensor& act,
                        const at::Tensor& grad_w, Activation activation);

}  // namespace h3fusion::cuda
