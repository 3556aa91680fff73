// The per-expert-LoRA expert FFN (moe_lora_ffn_forward / _backward, design.md §10), written once over ATen ops and
// a device's plan / gather / combine primitives; instantiated by csrc/cpu/moe_lora_ffn.cpp and
// csrc/cuda/moe_lora_ffn.cu.
//
// `Dev` provides:
//   kHostThreads: whether experts may be spread over host threads (CPU: yes; CUDA: no, one stream)
//   route_plan(experts[T,k] int32, E) -> (sorted_pairs[R] int32, pair_rows[R] int32, expert_offsets[E+1] int64)
//   gather(x[T,C], sorted_pairs, k) -> rows[R,C], rows[r] = x[sorted_pairs[r] / k]
//   combine(rows[R,C], weights[T,k] or undefined (= ones), pair_rows, k) -> [T,C], summed in slot order with fp32
//       (fp64) accumulation, no atomics
//   gated, gated_backward: the row passes of the gated activation (as AtenRowPasses in moe_lora_common.h)
// with R = T*k rows in expert order. The expert offsets are read on the host once per call (on CUDA a sync).
//
// Never forms W + s B A. Per expert e (its rows from the plan; X = its x rows), the rank-r detours z:
//   z1 = X A1_e^T [n,r];  h = X W1_e^T + s z1 B1_e^T [n,2F];  a = act(h[:, :F]) * h[:, F:];
//   z2 = a A2_e^T [n,r];  o = a W2_e^T + s z2 B2_e^T [n,H];   y_t = sum_j w_tj o_(t,j).
// A shared base (leading dim 1) is applied by linearity: x W1^T once over the T tokens (gathered into rows), and
// y = (sum_j w_tj a_(t,j)) W2^T + sum_j w_tj s z2 B2_e^T: one dense GEMM over T rows per base projection, only the
// rank-r terms grouped per expert. The backward uses the same algebra (see backward()).
#pragma once

#include <ATen/ATen.h>

#include <h3fusion/checks.h>
#include <h3fusion/moe_lora_common.h>

#include <array>
#include <tuple>
#include <vector>

namespace h3fusion::lora {

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const at::Tensor& weights, const at::Tensor& experts, const at::Tensor& gate_up_in,
    const at::Tensor& down_in, const at::Tensor& a1_in, const at::Tensor& b1_in, const at::Tensor& a2_in,
    const at::Tensor& b2_in, double s, c10::string_view activation, bool save) {
  constexpr bool kThreads = Dev::kHostThreads;
  const Dims d = check_args(x_in, weights, gate_up_in, down_in, a1_in, b1_in, a2_in, b2_in, s);
  const Activation act = parse_activation(activation);
  check_dim(experts, "experts", 2);
  check_dtype(experts, "experts", at::kInt);
  check_size(experts, "experts", 0, d.T, "x.shape[0]");
  check_size(experts, "experts", 1, d.k, "weights.shape[1]");
  check_same_device(experts, "experts", x_in, "x");
  // The internal ops are not part of any autograd graph (autograd for this op is registered in Python).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [sorted_pairs, pair_rows, offsets] = Dev::route_plan(experts.contiguous(), d.E);
  const int64_t R = d.T * d.k, F = d.F;
  const std::vector<int64_t> off = host_offsets(offsets, d.E, R);
  const bool many_small = kThreads && many_small_experts(off);
  const at::Tensor x = x_in.contiguous(), w1 = gate_up_in.contiguous(), w2 = down_in.contiguous();
  const at::Tensor a1 = a1_in.contiguous(), b1 = b1_in.contiguous(), a2 = a2_in.contiguous(),
                   b2 = b2_in.contiguous();
  const auto opts = x.options();

  // Rows in groups of experts (moe_lora_common.h), the scratch (xs, a; h too when it is not kept) one group high. A
  // shared base sums a over the slots for its down projection, so there a is whole: one group.
  const std::vector<RowGroup> groups = row_groups(off, R, d.shared);
  const int64_t G = max_group_rows(groups);
  const at::Tensor tok = row_tokens(sorted_pairs, d.k);
  // Shared base: x W1^T once per token, then into rows; per-expert base: each expert's GEMM below.
  at::Tensor h = d.shared ? Dev::gather(at::mm(x, w1[0].t()), sorted_pairs, d.k)
                          : at::empty({save ? R : G, 2 * F}, opts);
  at::Tensor z1 = at::empty({R, d.r}, opts);
  at::Tensor z2 = at::empty({R, d.r}, opts);
  const at::Tensor o = at::empty({R, d.H}, opts);  // per-expert base: the expert outputs; shared: the rank-r terms
  at::Tensor xs_buf = at::empty({G, d.H}, opts), a_buf = at::empty({G, F}, opts);
  for (const RowGroup& grp : groups) {
    const int64_t g0 = grp.begin, gn = grp.end - grp.begin;
    const std::vector<int64_t>& goff = grp.offsets;
    const at::Tensor xs = xs_buf.narrow(0, 0, gn), a = a_buf.narrow(0, 0, gn);  // [gn,H], [gn,F]
    const at::Tensor hg = h.narrow(0, h.size(0) == R ? g0 : 0, gn);
    const at::Tensor z1g = z1.narrow(0, g0, gn), z2g = z2.narrow(0, g0, gn), og = o.narrow(0, g0, gn);
    gather_into(xs, x, tok.narrow(0, g0, gn));
    // The base GEMM first, then its rank-r term added in fp32 (one rounding of the sum, as PyTorch's own bf16 path
    // rounds W + s B A once): measurably closer to fp64 in bf16 than the other order.
    run_step<kThreads>(
        goff, many_small, /*big_first=*/true,
        [&](int64_t e, int64_t r0, int64_t n) {
          if (!d.shared) mm_into(hg.narrow(0, r0, n), xs.narrow(0, r0, n), w1[e].t());
        },
        [&](int64_t e, int64_t r0, int64_t n) {
          const at::Tensor z1e = z1g.narrow(0, r0, n), he = hg.narrow(0, r0, n);
          mm_into(z1e, xs.narrow(0, r0, n), a1[e].t());
          he.addmm_(z1e, b1[e].t(), /*beta=*/1, /*alpha=*/s);
          Dev::gated(a.narrow(0, r0, n), he, F, act);
        });
    run_step<kThreads>(
        goff, many_small, /*big_first=*/true,
        [&](int64_t e, int64_t r0, int64_t n) {
          if (!d.shared) mm_into(og.narrow(0, r0, n), a.narrow(0, r0, n), w2[e].t());
        },
        [&](int64_t e, int64_t r0, int64_t n) {
          const at::Tensor z2e = z2g.narrow(0, r0, n), oe = og.narrow(0, r0, n);
          mm_into(z2e, a.narrow(0, r0, n), a2[e].t());
          if (d.shared) {
            mm_scaled_into(oe, z2e, b2[e].t(), s);
          } else {
            oe.addmm_(z2e, b2[e].t(), /*beta=*/1, /*alpha=*/s);
          }
        });
    zero_tails(goff, hg, z1g, a, z2g, og);  // rows of no expert (CUDA only; in the last group)
  }
  xs_buf.reset();
  if (!save && !d.shared) h.reset();  // the last group's pre-activation: not needed any more
  at::Tensor y = Dev::combine(o, weights, pair_rows, d.k);
  if (d.shared) y = at::addmm(y, Dev::combine(a_buf, weights, pair_rows, d.k), w2[0].t());  // + (sum_j w_j a_j) W2^T

  if (!save) {
    h = at::empty({0, 2 * F}, opts);
    z1 = at::empty({0, d.r}, opts);
    z2 = at::empty({0, d.r}, opts);
  }
  return {y, sorted_pairs, pair_rows, offsets, h, z1, z2};
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

void check_saved(const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& sorted_pairs,
                 const at::Tensor& pair_rows, const at::Tensor& offsets, const at::Tensor& h, const at::Tensor& z1,
                 const at::Tensor& z2, const Dims& d);  // (csrc/op_checks.cpp)

// The backward, with G the grad_y rows, w the rows' routing weights, da = w (G W2_e + s (G B2_e) A2_e) the gradient
// of a, dh = the gated activation's backward of da, dz1 = dh B1_e:
//   grad_w = a . (G W2_e + s (G B2_e) A2_e)  (= G . o);   grad_W2_e = (wG)^T a;   grad_B2_e = s (wG)^T z2;
//   grad_A2_e = s (w G B2_e)^T a;   grad_W1_e = dh^T X;   grad_B1_e = s dh^T z1;   grad_A1_e = s dz1^T X;
//   grad_x_t = sum_j (dh W1_e + s dz1 A1_e).
// Shared base: G W2 once per token (then into rows), grad_W2 = grad_y^T (sum_j w_j a_j), grad_W1 = (sum_j dh_j)^T x
// and grad_x gets (sum_j dh_j) W1: dense GEMMs over the T tokens.
template <typename Dev>
Grads backward(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weights,
               const at::Tensor& gate_up_in, const at::Tensor& down_in, const at::Tensor& a1_in,
               const at::Tensor& b1_in, const at::Tensor& a2_in, const at::Tensor& b2_in, double s,
               c10::string_view activation, const at::Tensor& sorted_pairs_in, const at::Tensor& pair_rows_in,
               const at::Tensor& offsets_in, const at::Tensor& h_in, const at::Tensor& z1_in, const at::Tensor& z2_in,
               std::array<bool, 8> mask) {
  constexpr bool kThreads = Dev::kHostThreads;
  const Dims d = check_args(x_in, weights, gate_up_in, down_in, a1_in, b1_in, a2_in, b2_in, s);
  const Activation act = parse_activation(activation);
  check_saved(x_in, grad_y_in, sorted_pairs_in, pair_rows_in, offsets_in, h_in, z1_in, z2_in, d);
  const int64_t R = d.T * d.k, F = d.F, H = d.H, E = d.E, r = d.r;

  const auto [need_x, need_w, need_w1, need_w2, need_a1, need_b1, need_a2, need_b2] = mask;
  Grads out;
  if (!(need_x || need_w || need_w1 || need_w2 || need_a1 || need_b1 || need_a2 || need_b2)) return out;
  // What each gradient needs (u: G W2_e + s gb A2_e; gb: G B2_e; gw: w G; a: the recomputed activation).
  const bool need_dh = need_x || need_w1 || need_a1 || need_b1;
  const bool need_u = need_dh || need_w;
  const bool need_gb = need_u || need_a2;
  const bool need_act = need_w2 || need_a2;  // grad_w: the row pass recomputes a itself
  const bool need_dz1 = need_x || need_a1;
  const bool need_gw = need_b2 || (need_w2 && !d.shared);
  const bool need_xs = need_a1 || (need_w1 && !d.shared);

  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const std::vector<int64_t> off = host_offsets(offsets_in, E, R);
  const bool many_small = kThreads && many_small_experts(off);
  const at::Tensor x = x_in.contiguous(), w1 = gate_up_in.contiguous(), w2 = down_in.contiguous();
  const at::Tensor a1 = a1_in.contiguous(), b1 = b1_in.contiguous(), a2 = a2_in.contiguous(),
                   b2 = b2_in.contiguous();
  const at::Tensor sp = sorted_pairs_in.contiguous(), pr = pair_rows_in.contiguous();
  const at::Tensor h = h_in.contiguous(), z1 = z1_in.contiguous(), z2 = z2_in.contiguous();
  const auto opts = x.options();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gy = grad_y_in.to(x.scalar_type()).contiguous();
  // The routing weights by pair, and of each row as a column for broadcasting.
  const at::Tensor w_pair = weights.reshape({-1}).to(acc_dtype).contiguous();
  const at::Tensor w_row = w_pair.index_select(0, sp.to(at::kLong)).unsqueeze(1);

  // Base gradients: every expert with rows is written whole by one GEMM, the others are zeroed; the small factor
  // gradients start at zero.
  const at::Tensor g_w1 = need_w1 ? empty_idle_zeroed({d.shared ? 1 : E, 2 * F, H}, opts, off, d.shared) : at::Tensor();
  const at::Tensor g_w2 = need_w2 ? empty_idle_zeroed({d.shared ? 1 : E, H, F}, opts, off, d.shared) : at::Tensor();
  const at::Tensor g_a1 = need_a1 ? at::zeros({E, r, H}, opts) : at::Tensor();
  const at::Tensor g_b1 = need_b1 ? at::zeros({E, 2 * F, r}, opts) : at::Tensor();
  const at::Tensor g_a2 = need_a2 ? at::zeros({E, r, F}, opts) : at::Tensor();
  const at::Tensor g_b2 = need_b2 ? at::zeros({E, H, r}, opts) : at::Tensor();
  // By pair, zero for pairs of no expert (CUDA only).
  const at::Tensor grad_w_pair = need_w ? at::zeros({R}, opts.dtype(acc_dtype)) : at::Tensor();
  const at::Tensor dxr = need_x ? at::empty({R, H}, opts) : at::Tensor();  // the rows of grad_x, combined at the end

  // Both steps run group after group of experts (moe_lora_common.h), the scratch one group high. A shared base sums
  // a and dh over the slots (dense GEMMs over the tokens), so there they are whole: one group.
  const std::vector<RowGroup> groups = row_groups(off, R, d.shared);
  const int64_t G = max_group_rows(groups);
  const at::Tensor tok = row_tokens(sp, d.k);
  at::Tensor gs_buf = at::empty({G, H}, opts);  // grad_y rows
  at::Tensor a_buf = need_act ? at::empty({G, F}, opts) : at::Tensor();
  at::Tensor u_buf;
  if (need_u) u_buf = d.shared ? Dev::gather(at::mm(gy, w2[0]), sp, d.k) : at::empty({G, F}, opts);
  at::Tensor gb_buf = need_gb ? at::empty({G, r}, opts) : at::Tensor();
  at::Tensor gw_buf = need_gw ? at::empty({G, H}, opts) : at::Tensor();
  at::Tensor gbw_buf = need_a2 ? at::empty({G, r}, opts) : at::Tensor();
  at::Tensor xs_buf = need_xs ? at::empty({G, H}, opts) : at::Tensor();
  at::Tensor dh_buf = need_dh ? at::empty({G, 2 * F}, opts) : at::Tensor();
  at::Tensor dz1_buf = need_dz1 ? at::empty({G, r}, opts) : at::Tensor();
  auto rows = [](const at::Tensor& t, int64_t n) { return t.defined() ? t.narrow(0, 0, n) : at::Tensor(); };

  for (const RowGroup& grp : groups) {
    const int64_t g0 = grp.begin, gn = grp.end - grp.begin;
    const std::vector<int64_t>& goff = grp.offsets;
    // This group's rows of the saved and by-row tensors, and its scratch.
    const at::Tensor hg = h.narrow(0, g0, gn), z1g = z1.narrow(0, g0, gn), z2g = z2.narrow(0, g0, gn);
    const at::Tensor spg = sp.narrow(0, g0, gn), w_rowg = w_row.narrow(0, g0, gn);
    const at::Tensor dxrg = need_x ? dxr.narrow(0, g0, gn) : at::Tensor();
    const at::Tensor gs = rows(gs_buf, gn), a = rows(a_buf, gn), u = rows(u_buf, gn), gb = rows(gb_buf, gn),
                     gw = rows(gw_buf, gn), gbw = rows(gbw_buf, gn), xs = rows(xs_buf, gn), dh = rows(dh_buf, gn),
                     dz1 = rows(dz1_buf, gn);
    gather_into(gs, gy, tok.narrow(0, g0, gn));
    if (need_xs) gather_into(xs, x, tok.narrow(0, g0, gn));

    // Step 1, the down projection: a (recomputed), gb, u, and the gradients of A2, B2 and (per expert) W2.
    run_step<kThreads>(
        goff, many_small, /*big_first=*/false,
        [&](int64_t e, int64_t r0, int64_t n) {
          if (d.shared) return;
          if (need_u) mm_into(u.narrow(0, r0, n), gs.narrow(0, r0, n), w2[e]);
          if (need_w2) mm_into(g_w2[e], gw.narrow(0, r0, n).t(), a.narrow(0, r0, n));
        },
        [&](int64_t e, int64_t r0, int64_t n) {
          const at::Tensor ge = gs.narrow(0, r0, n), we = w_rowg.narrow(0, r0, n);
          const at::Tensor ae = need_act ? a.narrow(0, r0, n) : at::Tensor();
          const at::Tensor gbe = need_gb ? gb.narrow(0, r0, n) : at::Tensor();
          if (need_act) Dev::gated(ae, hg.narrow(0, r0, n), F, act);
          if (need_gb) mm_into(gbe, ge, b2[e]);
          if (need_gw) {
            at::Tensor gwe = gw.narrow(0, r0, n);
            at::mul_out(gwe, ge, we);
            if (need_b2) mm_scaled_into(g_b2[e], gwe.t(), z2g.narrow(0, r0, n), s);
          }
          if (need_a2) {
            at::Tensor gbwe = gbw.narrow(0, r0, n);
            at::mul_out(gbwe, gbe, we);
            mm_scaled_into(g_a2[e], gbwe.t(), ae, s);
          }
        });
    zero_tails(goff, a, u);  // rows of no expert (CUDA only; in the last group): zero gradients

    // Step 2, the gate/up projection: grad_w, da and dh (row passes), dz1, and the gradients of A1, B1, (per expert)
    // W1 and the rows of grad_x.
    run_step<kThreads>(
        goff, many_small, /*big_first=*/false,
        [&](int64_t e, int64_t r0, int64_t n) {
          if (d.shared) return;
          if (need_x) dxrg.narrow(0, r0, n).addmm_(dh.narrow(0, r0, n), w1[e]);
          if (need_w1) mm_into(g_w1[e], dh.narrow(0, r0, n).t(), xs.narrow(0, r0, n));
        },
        [&](int64_t e, int64_t r0, int64_t n) {
          const at::Tensor ue = need_u ? u.narrow(0, r0, n) : at::Tensor();
          // u = G W2_e (the base term, from step 1), plus its rank-r term in fp32: G W2_e + s (G B2_e) A2_e.
          if (need_u) ue.addmm_(gb.narrow(0, r0, n), a2[e], /*beta=*/1, /*alpha=*/s);
          // grad_w (by pair) = u . a; dh = the gated backward of da = w u.
          const at::Tensor dhe = need_dh ? dh.narrow(0, r0, n) : at::Tensor();
          if (need_u)
            Dev::gated_backward(hg.narrow(0, r0, n), ue, dhe, spg.narrow(0, r0, n), w_pair, grad_w_pair, F, act);
          if (!need_dh) return;
          if (need_dz1) mm_into(dz1.narrow(0, r0, n), dhe, b1[e]);
          if (need_b1) mm_scaled_into(g_b1[e], dhe.t(), z1g.narrow(0, r0, n), s);
          if (need_a1) mm_scaled_into(g_a1[e], dz1.narrow(0, r0, n).t(), xs.narrow(0, r0, n), s);
          if (need_x) mm_scaled_into(dxrg.narrow(0, r0, n), dz1.narrow(0, r0, n), a1[e], s);
        });
    zero_tails(goff, dh, dxrg);
  }
  // The scratch is done with (a shared base still sums a and dh over the slots below).
  gs_buf.reset();
  u_buf.reset();
  gb_buf.reset();
  gw_buf.reset();
  gbw_buf.reset();
  xs_buf.reset();
  dz1_buf.reset();
  if (need_w2 && d.shared) mm_into(g_w2[0], gy.t(), Dev::combine(a_buf, weights, pr, d.k));  // grad_y^T sum_j w_j a_j
  a_buf.reset();
  if (!d.shared) dh_buf.reset();
  const at::Tensor& dh = dh_buf;  // shared base: [R,2F]

  if (need_x || need_w1) {
    // Shared base: the per-token sum of the rows' dh meets W1 once (grad_x) and x once (grad_W1).
    const at::Tensor dh_tok = d.shared ? Dev::combine(dh, at::Tensor(), pr, d.k) : at::Tensor();
    if (need_w1 && d.shared) mm_into(g_w1[0], dh_tok.t(), x);
    if (need_x) {
      std::get<0>(out) = Dev::combine(dxr, at::Tensor(), pr, d.k);
      if (d.shared) std::get<0>(out) = at::addmm(std::get<0>(out), dh_tok, w1[0]);
    }
  }
  if (need_w) std::get<1>(out) = grad_w_pair.view({d.T, d.k}).to(weights.scalar_type());
  std::get<2>(out) = g_w1;
  std::get<3>(out) = g_w2;
  std::get<4>(out) = g_a1;
  std::get<5>(out) = g_b1;
  std::get<6>(out) = g_a2;
  std::get<7>(out) = g_b2;
  return out;
}

}  // namespace h3fusion::lora
