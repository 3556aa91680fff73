// CUDA bodies of moe_ffn_forward / moe_ffn_backward (schemas in csrc/ops.cpp, oracle in reference/moe.py).
//
// Design: the op is a chain of device-only steps on the current stream; no value computed on the device is
// ever read on the host (expert group sizes stay in expert_offsets), so forward and backward never synchronise
// and can be captured in a CUDA graph. Every reduction has a fixed order (no floating-point atomics), so results
// are bitwise reproducible.
//   forward:  (sorted_pairs, pair_rows, offsets) = route_plan(experts, E)              (moe_plan.cu)
//             h[r] = W_gu[e] x[t(r)], act[r] = act(h[r,:F]) * h[r,F:]    one grouped GEMM, x read via sorted_pairs
//             o[r] = W_down[e] act[r]                                    grouped GEMM
//             y[t] = sum_j w[t,j] o[pair_rows[t*k+j]]                   combine_rows (moe_plan.cu)
//   backward: U[r] = W_down[e]^T grad_y[t(r)]            (fp32)   grouped GEMM, grad_y read via sorted_pairs
//             grad_w[t,j] = U[r] . act[r], dH[r] = act'(h[r]) (w U[r]), act recomputed from h (one row kernel)
//             grad_down[e] = sum_{r in e} (w_r grad_y[t(r)]) act[r]^T                  grouped "K = rows" GEMM
//             grad_gate_up[e] = sum_{r in e} dH[r] x[t(r)]^T                           grouped "K = rows" GEMM
//             dX[r] = W_gu[e]^T dH[r]; grad_x[t] = sum_j dX[pair_rows[t*k+j]]           grouped GEMM + combine_rows
// Tile shape of every GEMM: 64 x 64 per 128-thread block, reduction step 32 (grouped_gemm_core.cuh): WMMA for
// bf16/fp16 with fp32 accumulation, a SIMT fp32 loop for fp32.
// GEMM backend: these "own" kernels, or at::_grouped_mm around the same plan/gather/combine kernels
// (moe_ffn_torch_gemm.cu); chosen per call after the argument checks (moe_gemm_backend.h: H3FUSION_GROUPED_GEMM).
// Known limits: fp64 is CPU-only (a clear error here). Expert ids outside [0, E) cannot be checked without a
// host sync; their contract is that such a pair contributes zero and gets zero gradient: route_plan puts it in
// a row >= offsets[E] that no grouped GEMM writes, and zero_unrouted_rows zeroes those rows of h and o (forward)
// and of U and dX (backward), so y, grad_x and grad_weights get exact zeros from them (the GEMMs also
// bounds-check every index they read, so a bad plan cannot read or write out of bounds).
// Intermediates: h [T*k, 2F] (returned), act [T*k, F], o or dX [T*k, H] in x.dtype and U [T*k, F] fp32 in backward.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "arg_checks.h"
#include "grouped_gemm.cuh"
#include "launchers.cuh"
#include "moe_ffn_torch_gemm.h"
#include "moe_gemm_backend.h"

namespace h3fusion::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& experts_in,
    const at::Tensor& gate_up_in, const at::Tensor& down_in, bool save_pre_activation,
    c10::string_view activation_name) {
  const MoeDims d = check_moe_ffn_common(x_in, weights_in, gate_up_in, down_in);
  const Activation activation = parse_activation(activation_name);
  check_moe_ffn_experts(experts_in, x_in, d);
  const c10::cuda::CUDAGuard guard(x_in.device());
  if (choose_moe_gemm_backend(x_in, gate_up_in, down_in) == MoeGemmBackend::kTorch) {
    auto out = moe_ffn_forward_torch_gemm(x_in, weights_in, experts_in, gate_up_in, down_in, activation);
    // without a backward to follow, the pre-activation is not kept (freed when this call returns)
    if (!save_pre_activation) std::get<4>(out) = at::empty({0, gate_up_in.size(1)}, x_in.options());
    return out;
  }

  const int64_t R = d.T * d.k;
  const auto idx_opts = experts_in.options().dtype(at::kInt);
  if (d.T == 0) {  // no rows: nothing to launch; the plan is empty and every expert has zero rows
    return {at::empty({0, d.H}, x_in.options()), at::empty({0}, idx_opts), at::empty({0}, idx_opts),
            at::zeros({d.E + 1}, idx_opts.dtype(at::kLong)), at::empty({0, 2 * d.F}, x_in.options())};
  }
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const at::Tensor gate_up = gate_up_in.contiguous();
  const at::Tensor down = down_in.contiguous();

  auto [sorted_pairs, pair_rows, offsets] = route_plan(experts_in.contiguous(), d.E);
  const at::Tensor tile_starts = grouped_tile_starts(offsets);
  at::Tensor h = at::empty({R, 2 * d.F}, x.options());
  at::Tensor act = at::empty({R, d.F}, x.options());
  grouped_gate_up_act(x, sorted_pairs, d.k, gate_up, offsets, tile_starts, h, act, activation);
  zero_unrouted_rows(h, offsets);  // pairs with an expert id outside [0, E): saved for backward as zeros
  at::Tensor o = at::empty({R, d.H}, x.options());
  grouped_linear(act, down, offsets, tile_starts, o);
  zero_unrouted_rows(o, offsets);  // ... and they contribute zero to y
  at::Tensor y = combine_rows(o, weights, pair_rows);
  // Without a backward to follow, the pre-activation is not kept (it is freed when this call returns).
  if (!save_pre_activation) h = at::empty({0, 2 * d.F}, x.options());
  return {y, sorted_pairs, pair_rows, offsets, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& gate_up_in,
    const at::Tensor& down_in, const at::Tensor& sorted_pairs_in, const at::Tensor& pair_rows_in,
    const at::Tensor& offsets_in, const at::Tensor& gate_up_out_in, std::array<bool, 4> output_mask,
    c10::string_view activation_name) {
  const MoeDims d = check_moe_ffn_common(x_in, weights_in, gate_up_in, down_in);
  const Activation activation = parse_activation(activation_name);
  const int64_t R = d.T * d.k;
  // output_mask: x, weights, gate_up_proj, down_proj. A gradient left out skips its GEMMs and comes back undefined.
  // (The per-pair dot products of grad_weights are fused into gated_act_backward and cost no extra pass here.)
  const auto [need_x, need_w, need_gu, need_down] = output_mask;
  if (!need_x && !need_w && !need_gu && !need_down) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  check_moe_ffn_backward_args(grad_y_in, x_in, sorted_pairs_in, pair_rows_in, offsets_in, gate_up_out_in, d);
  const c10::cuda::CUDAGuard guard(x_in.device());
  if (choose_moe_gemm_backend(x_in, gate_up_in, down_in) == MoeGemmBackend::kTorch) {
    return moe_ffn_backward_torch_gemm(grad_y_in, x_in, weights_in, gate_up_in, down_in, sorted_pairs_in,
                                       pair_rows_in, offsets_in, gate_up_out_in, need_x, need_w, need_gu, need_down,
                                       activation);
  }

  if (d.T == 0) {  // no rows: every weight gradient is exactly zero, nothing to launch beyond the fills
    return {need_x ? at::empty({0, d.H}, x_in.options()) : at::Tensor(),
            need_w ? at::empty({0, d.k}, weights_in.options()) : at::Tensor(),
            need_gu ? at::zeros({d.E, 2 * d.F, d.H}, gate_up_in.options()) : at::Tensor(),
            need_down ? at::zeros({d.E, d.H, d.F}, down_in.options()) : at::Tensor()};
  }
  const at::Tensor grad_y = grad_y_in.to(x_in.scalar_type()).contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor gate_up = gate_up_in.contiguous();
  const at::Tensor down = down_in.contiguous();
  const at::Tensor sorted_pairs = sorted_pairs_in.contiguous();
  const at::Tensor pair_rows = pair_rows_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor h = gate_up_out_in.contiguous();
  // routing weights in fp32, flat by pair: the scale of the down-projection gradient and of dA
  const at::Tensor w_f32 = weights_in.to(at::kFloat).contiguous().view({R});

  const at::Tensor tile_starts = grouped_tile_starts(offsets);
  at::Tensor u_grad = at::empty({R, d.F}, x.options().dtype(at::kFloat));
  grouped_linear_t(grad_y, sorted_pairs, d.k, down, offsets, tile_starts, u_grad);
  zero_unrouted_rows(u_grad, offsets);  // with h zero there too: grad_w = 0 and dh = 0 for unrouted pairs

  at::Tensor dh = at::empty({R, 2 * d.F}, x.options());
  at::Tensor act = at::empty({R, d.F}, x.options());
  at::Tensor grad_w_f32 = at::empty({R}, x.options().dtype(at::kFloat));
  gated_act_backward(u_grad, h, w_f32, sorted_pairs, dh, act, grad_w_f32, activation);
  u_grad = at::Tensor();  // free before the next large temporaries

  at::Tensor grad_down, grad_gate_up, grad_x, grad_weights;
  if (need_down) {
    grad_down = at::empty({d.E, d.H, d.F}, x.options());
    grouped_wgrad(grad_y, sorted_pairs, d.k, w_f32, act, at::Tensor(), 1, offsets, grad_down);
  }
  if (need_gu) {
    grad_gate_up = at::empty({d.E, 2 * d.F, d.H}, x.options());
    grouped_wgrad(dh, at::Tensor(), 1, at::Tensor(), x, sorted_pairs, d.k, offsets, grad_gate_up);
  }
  if (need_x) {
    at::Tensor dx_rows = at::empty({R, d.H}, x.options());
    grouped_linear_t(dh, at::Tensor(), 1, gate_up, offsets, tile_starts, dx_rows);
    zero_unrouted_rows(dx_rows, offsets);  // unrouted pairs add nothing to grad_x
    const at::Tensor unit = at::ones({d.T, d.k}, x.options().dtype(at::kFloat));
    grad_x = combine_rows(dx_rows, unit, pair_rows);
  }
  if (need_w) grad_weights = grad_w_f32.view({d.T, d.k}).to(weights_in.scalar_type());
  return {grad_x, grad_weights, grad_gate_up, grad_down};
}

}  // namespace
}  // namespace h3fusion::cuda

TORCH_LIBRARY_IMPL(h3fusion, CUDA, m) {
  m.impl("moe_ffn_forward", &h3fusion::cuda::moe_ffn_forward_cuda);
  m.impl("moe_ffn_backward", &h3fusion::cuda::moe_ffn_backward_cuda);
}
