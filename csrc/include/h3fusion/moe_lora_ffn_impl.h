// The per-expert-LoRA expert FFN (moe_lora_ffn_forward / _backward, design.md §10), written once over ATen GEMMs
// and a device's plan / gather / combine primitives, and instantiated by csrc/cpu/moe_lora_ffn.cpp and
// csrc/cuda/moe_lora_ffn.cu.
//
// `Dev` provides (static functions):
//   route_plan(experts[T,k] int32, E) -> (sorted_pairs[R] int32, pair_rows[R] int32, expert_offsets[E+1] int64)
//   gather(x[T,C], sorted_pairs, k) -> rows[R,C], rows[r] = x[sorted_pairs[r] / k]
//   combine(rows[R,C], weights[T,k] or undefined (= ones), pair_rows, k) -> [T,C], summed in slot order with fp32
//       (fp64) accumulation, no atomics
// with R = T*k rows in expert order. The expert offsets are read on the host once per call (on CUDA a device sync;
// this body is the obviously-correct one, not the fast one).
//
// Never forms W + s B A. Per expert e (its rows from the plan), with z the rank-r detour:
//   z1 = X A1_e^T [n,r];  h = X W1_e^T + s z1 B1_e^T [n,2F];  a = act(h[:, :F]) * h[:, F:];
//   z2 = a A2_e^T [n,r];  o = a W2_e^T + s z2 B2_e^T [n,H];   y_t = sum_j w_tj o_(t,j).
// A shared base (leading dim 1) is applied by linearity: x W1^T once over the T tokens (then gathered into rows),
// and y = (sum_j w_tj a_(t,j)) W2^T + sum_j w_tj s z2 B2_e^T: one dense GEMM over T rows for each base projection,
// only the rank-r terms grouped per expert. The backward uses the same algebra (grad_x, grad of the shared base and
// W2 grad_y over T rows).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <h3fusion/checks.h>

#include <array>
#include <cmath>
#include <string>
#include <utility>
#include <tuple>
#include <vector>

namespace h3fusion::lora {

enum class Activation { kSilu, kGelu, kGeluTanh };

inline Activation parse_activation(c10::string_view name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(false, "activation must be one of \"silu\", \"gelu\", \"gelu_tanh\", got \"", std::string(name), "\"");
}

inline at::Tensor activate(const at::Tensor& g, Activation act) {
  switch (act) {
    case Activation::kSilu: return at::silu(g);
    case Activation::kGelu: return at::gelu(g, "none");
    case Activation::kGeluTanh: return at::gelu(g, "tanh");
  }
  TORCH_INTERNAL_ASSERT(false);
}

// grad_in = act'(g) * grad, written into `out` (a strided column slice is fine).
inline void activate_backward_into(at::Tensor out, const at::Tensor& grad, const at::Tensor& g, Activation act) {
  switch (act) {
    case Activation::kSilu: at::silu_backward_out(out, grad, g); return;
    case Activation::kGelu: at::gelu_backward_out(out, grad, g, "none"); return;
    case Activation::kGeluTanh: at::gelu_backward_out(out, grad, g, "tanh"); return;
  }
}

// a[n,F] = act(h[:, :F]) * h[:, F:], rounded like the plain-PyTorch expression (act rounded, then the product).
inline at::Tensor gated(const at::Tensor& h, int64_t F, Activation act) {
  return activate(h.narrow(1, 0, F), act).mul_(h.narrow(1, F, F));
}

// dh[n,2F] <- the gradient of a = act(g) * u given da[n,F]: dg = act'(g) (da u), du = da act(g).
inline void gated_backward_into(const at::Tensor& dh, const at::Tensor& h, const at::Tensor& da, int64_t F,
                                Activation act) {
  const at::Tensor g = h.narrow(1, 0, F), u = h.narrow(1, F, F);
  activate_backward_into(dh.narrow(1, 0, F), da * u, g, act);
  at::Tensor du = dh.narrow(1, F, F);
  at::mul_out(du, da, activate(g, act));
}

// out = a @ b, written into a view (a row slice of a buffer, one expert's slice of a gradient).
inline void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// out = alpha * (a @ b), written into a view (beta = 0: whatever `out` held is ignored, NaN included).
inline void mm_scaled_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (alpha == 1.0) {
    at::mm_out(out, a, b);
  } else {
    at::addmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/alpha);
  }
}

struct Dims {
  int64_t T, H, k, E, F, r;
  bool shared;  // base with leading dimension 1, shared by every expert
};

// The checks shared by forward and backward; every error names its argument.
inline Dims check_args(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                       const at::Tensor& down_proj, const at::Tensor& gate_up_a, const at::Tensor& gate_up_b,
                       const at::Tensor& down_a, const at::Tensor& down_b, double scaling) {
  check_dim(x, "x", 2);
  check_float(x, "x");
  const int64_t T = x.size(0), H = x.size(1);
  check_dim(weights, "weights", 2);
  check_float(weights, "weights");
  check_size(weights, "weights", 0, T, "x.shape[0]");
  TORCH_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == x.scalar_type(),
              "weights must have dtype float32 or x's dtype (", x.scalar_type(), "), got ", weights.scalar_type());
  const int64_t k = weights.size(1);
  TORCH_CHECK(k >= 1, "weights.shape[1] (k) must be >= 1, got shape ", weights.sizes());
  TORCH_CHECK(std::isfinite(scaling), "scaling (the LoRA scale) must be finite, got ", scaling);

  // The factors fix E and r.
  check_dim(gate_up_a, "gate_up_a", 3);
  check_same_dtype(gate_up_a, "gate_up_a", x, "x");
  const int64_t E = gate_up_a.size(0), r = gate_up_a.size(1);
  TORCH_CHECK(E >= 1, "gate_up_a.shape[0] (the number of experts E) must be >= 1, got shape ", gate_up_a.sizes());
  TORCH_CHECK(r >= 1, "gate_up_a.shape[1] (the LoRA rank r) must be >= 1, got shape ", gate_up_a.sizes());
  check_size(gate_up_a, "gate_up_a", 2, H, "x.shape[1]");

  check_dim(gate_up_proj, "gate_up_proj", 3);
  check_same_dtype(gate_up_proj, "gate_up_proj", x, "x");
  const int64_t Eb = gate_up_proj.size(0);
  TORCH_CHECK(Eb == 1 || Eb == E, "gate_up_proj.shape[0] must be 1 (a base shared by every expert) or the number of "
              "experts E = gate_up_a.shape[0] (", E, "), got shape ", gate_up_proj.sizes());
  TORCH_CHECK(gate_up_proj.size(1) % 2 == 0, "gate_up_proj.shape[1] must be even (2 * intermediate size), got shape ",
              gate_up_proj.sizes());
  check_size(gate_up_proj, "gate_up_proj", 2, H, "x.shape[1]");
  const int64_t F = gate_up_proj.size(1) / 2;
  check_dim(down_proj, "down_proj", 3);
  check_same_dtype(down_proj, "down_proj", x, "x");
  check_size(down_proj, "down_proj", 0, Eb, "gate_up_proj.shape[0]");
  check_size(down_proj, "down_proj", 1, H, "x.shape[1]");
  check_size(down_proj, "down_proj", 2, F, "gate_up_proj.shape[1] / 2");

  check_dim(gate_up_b, "gate_up_b", 3);
  check_same_dtype(gate_up_b, "gate_up_b", x, "x");
  check_size(gate_up_b, "gate_up_b", 0, E, "gate_up_a.shape[0] (E)");
  check_size(gate_up_b, "gate_up_b", 1, 2 * F, "gate_up_proj.shape[1]");
  check_size(gate_up_b, "gate_up_b", 2, r, "gate_up_a.shape[1] (the rank r)");
  check_dim(down_a, "down_a", 3);
  check_same_dtype(down_a, "down_a", x, "x");
  check_size(down_a, "down_a", 0, E, "gate_up_a.shape[0] (E)");
  check_size(down_a, "down_a", 1, r, "gate_up_a.shape[1] (the rank r)");
  check_size(down_a, "down_a", 2, F, "gate_up_proj.shape[1] / 2");
  check_dim(down_b, "down_b", 3);
  check_same_dtype(down_b, "down_b", x, "x");
  check_size(down_b, "down_b", 0, E, "gate_up_a.shape[0] (E)");
  check_size(down_b, "down_b", 1, H, "x.shape[1]");
  check_size(down_b, "down_b", 2, r, "gate_up_a.shape[1] (the rank r)");

  check_same_device(weights, "weights", x, "x");
  check_same_device(gate_up_proj, "gate_up_proj", x, "x");
  check_same_device(down_proj, "down_proj", x, "x");
  check_same_device(gate_up_a, "gate_up_a", x, "x");
  check_same_device(gate_up_b, "gate_up_b", x, "x");
  check_same_device(down_a, "down_a", x, "x");
  check_same_device(down_b, "down_b", x, "x");
  return {T, H, k, E, F, r, Eb == 1};
}

// expert_offsets on the host (one copy; a sync on CUDA), checked: starts at 0, non-decreasing, ends <= R.
inline std::vector<int64_t> host_offsets(const at::Tensor& offsets, int64_t E, int64_t R) {
  const at::Tensor o = offsets.to(at::kCPU).contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  std::vector<int64_t> off(p, p + E + 1);
  TORCH_CHECK(off[0] == 0 && off[E] <= R, "expert_offsets must start at 0 and end at most at x.shape[0] * k (", R,
              ")");
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(off[e + 1] >= off[e], "expert_offsets must be non-decreasing, got a drop after expert ", e);
  return off;
}

// Rows [off[E], R) belong to no expert (ids outside [0, E), possible on CUDA only): zero, so they contribute nothing.
inline void zero_tail(const at::Tensor& rows, const std::vector<int64_t>& off) {
  if (!rows.defined()) return;
  const int64_t end = off.back(), R = rows.size(0);
  if (end < R) rows.narrow(0, end, R - end).zero_();
}

// A gradient [E, ...] whose expert slices a GEMM will write for every expert with rows: the idle experts' slices are
// zeroed here. shared ([1, ...]): written whole by one GEMM over the tokens.
inline at::Tensor empty_idle_zeroed(at::IntArrayRef sizes, const at::TensorOptions& opts, const std::vector<int64_t>& off,
                                    bool shared) {
  at::Tensor t = at::empty(sizes, opts);
  if (!shared)
    for (int64_t e = 0; e + 1 < static_cast<int64_t>(off.size()); ++e)
      if (off[e + 1] == off[e]) t[e].zero_();
  return t;
}

template <typename Fn>
void for_each_expert(const std::vector<int64_t>& off, const Fn& fn) {
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(off.size()); ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n > 0) fn(e, off[e], n);
  }
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const at::Tensor& weights, const at::Tensor& experts, const at::Tensor& gate_up_in,
    const at::Tensor& down_in, const at::Tensor& a1_in, const at::Tensor& b1_in, const at::Tensor& a2_in,
    const at::Tensor& b2_in, double s, c10::string_view activation, bool save) {
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
  const at::Tensor x = x_in.contiguous(), w1 = gate_up_in.contiguous(), w2 = down_in.contiguous();
  const at::Tensor a1 = a1_in.contiguous(), b1 = b1_in.contiguous(), a2 = a2_in.contiguous(),
                   b2 = b2_in.contiguous();
  const auto opts = x.options();

  const at::Tensor xs = Dev::gather(x, sorted_pairs, d.k);  // [R,H]
  at::Tensor h = d.shared ? Dev::gather(at::mm(x, w1[0].t()), sorted_pairs, d.k) : at::empty({R, 2 * F}, opts);
  at::Tensor z1 = at::empty({R, d.r}, opts);
  for_each_expert(off, [&](int64_t e, int64_t r0, int64_t n) {
    const at::Tensor xe = xs.narrow(0, r0, n), z1e = z1.narrow(0, r0, n), he = h.narrow(0, r0, n);
    mm_into(z1e, xe, a1[e].t());
    if (!d.shared) mm_into(he, xe, w1[e].t());
    he.addmm_(z1e, b1[e].t(), /*beta=*/1, /*alpha=*/s);
  });
  zero_tail(h, off);
  zero_tail(z1, off);

  const at::Tensor a = gated(h, F, act);  // [R,F]
  at::Tensor z2 = at::empty({R, d.r}, opts);
  at::Tensor o = at::empty({R, d.H}, opts);  // per-expert base: whole expert outputs; shared: the rank-r terms only
  for_each_expert(off, [&](int64_t e, int64_t r0, int64_t n) {
    const at::Tensor ae = a.narrow(0, r0, n), z2e = z2.narrow(0, r0, n), oe = o.narrow(0, r0, n);
    mm_into(z2e, ae, a2[e].t());
    if (d.shared) {
      mm_scaled_into(oe, z2e, b2[e].t(), s);
    } else {
      mm_into(oe, ae, w2[e].t());
      oe.addmm_(z2e, b2[e].t(), /*beta=*/1, /*alpha=*/s);
    }
  });
  zero_tail(z2, off);
  zero_tail(o, off);
  at::Tensor y = Dev::combine(o, weights, pair_rows, d.k);
  if (d.shared) y = at::addmm(y, Dev::combine(a, weights, pair_rows, d.k), w2[0].t());  // + (sum_j w_j a_j) W2^T

  if (!save) {
    h = at::empty({0, 2 * F}, opts);
    z1 = at::empty({0, d.r}, opts);
    z2 = at::empty({0, d.r}, opts);
  }
  return {y, sorted_pairs, pair_rows, offsets, h, z1, z2};
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

template <typename Dev>
Grads backward(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weights,
               const at::Tensor& gate_up_in, const at::Tensor& down_in, const at::Tensor& a1_in,
               const at::Tensor& b1_in, const at::Tensor& a2_in, const at::Tensor& b2_in, double s,
               c10::string_view activation, const at::Tensor& sorted_pairs_in, const at::Tensor& pair_rows_in,
               const at::Tensor& offsets_in, const at::Tensor& h_in, const at::Tensor& z1_in, const at::Tensor& z2_in,
               std::array<bool, 8> mask) {
  const Dims d = check_args(x_in, weights, gate_up_in, down_in, a1_in, b1_in, a2_in, b2_in, s);
  const Activation act = parse_activation(activation);
  const int64_t R = d.T * d.k, F = d.F, H = d.H, E = d.E, r = d.r;
  check_dim(grad_y_in, "grad_y", 2);
  check_float(grad_y_in, "grad_y");
  check_size(grad_y_in, "grad_y", 0, d.T, "x.shape[0]");
  check_size(grad_y_in, "grad_y", 1, H, "x.shape[1]");
  check_same_device(grad_y_in, "grad_y", x_in, "x");
  for (const auto& [t, name] : {std::pair{&sorted_pairs_in, "sorted_pairs"}, std::pair{&pair_rows_in, "pair_rows"}}) {
    check_dim(*t, name, 1);
    check_dtype(*t, name, at::kInt);
    check_size(*t, name, 0, R, "x.shape[0] * k");
    check_same_device(*t, name, x_in, "x");
  }
  check_dim(offsets_in, "expert_offsets", 1);
  check_dtype(offsets_in, "expert_offsets", at::kLong);
  check_size(offsets_in, "expert_offsets", 0, E + 1, "the number of experts + 1");
  check_same_device(offsets_in, "expert_offsets", x_in, "x");
  for (const auto& [t, name, width] : {std::tuple{&h_in, "gate_up_out", 2 * F}, std::tuple{&z1_in, "gate_up_z", r},
                                       std::tuple{&z2_in, "down_z", r}}) {
    check_dim(*t, name, 2);
    check_same_dtype(*t, name, x_in, "x");
    check_same_device(*t, name, x_in, "x");
    TORCH_CHECK(R == 0 || t->size(0) != 0, name, " is empty: moe_lora_ffn_forward ran with save_for_backward=False, "
                "so it has no backward");
    check_size(*t, name, 0, R, "x.shape[0] * k");
    check_size(*t, name, 1, width, width == r ? "gate_up_a.shape[1] (the rank r)" : "gate_up_proj.shape[1]");
  }

  const auto [need_x, need_w, need_w1, need_w2, need_a1, need_b1, need_a2, need_b2] = mask;
  Grads out;
  if (!(need_x || need_w || need_w1 || need_w2 || need_a1 || need_b1 || need_a2 || need_b2)) return out;
  // What each gradient needs (dh: the pre-activation's gradient; gb = grad_y rows B2; u = grad_y rows W2).
  const bool need_dh = need_x || need_w1 || need_a1 || need_b1;
  const bool need_gb = need_dh || need_w || need_a2;
  const bool need_u = need_dh || need_w;
  const bool need_act = need_w || need_w2 || need_a2;
  const bool need_dz1 = need_x || need_a1;
  const bool need_gw = need_b2 || (need_w2 && !d.shared);  // w-scaled grad_y rows

  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const std::vector<int64_t> off = host_offsets(offsets_in, E, R);
  const at::Tensor x = x_in.contiguous(), w1 = gate_up_in.contiguous(), w2 = down_in.contiguous();
  const at::Tensor a1 = a1_in.contiguous(), b1 = b1_in.contiguous(), a2 = a2_in.contiguous(),
                   b2 = b2_in.contiguous();
  const at::Tensor sp = sorted_pairs_in.contiguous(), pr = pair_rows_in.contiguous();
  const at::Tensor h = h_in.contiguous(), z1 = z1_in.contiguous(), z2 = z2_in.contiguous();
  const auto opts = x.options();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gy = grad_y_in.to(x.scalar_type()).contiguous();
  // Routing weight of each row, as a column for broadcasting.
  const at::Tensor w_row = weights.reshape({-1}).to(acc_dtype).index_select(0, sp.to(at::kLong)).unsqueeze(1);

  const at::Tensor gs = Dev::gather(gy, sp, d.k);  // [R,H] grad_y rows (unscaled)
  const at::Tensor a = need_act ? gated(h, F, act) : at::Tensor();
  at::Tensor u;  // [R,F]: grad_y rows @ W2_e, then da
  if (need_u) u = d.shared ? Dev::gather(at::mm(gy, w2[0]), sp, d.k) : at::empty({R, F}, opts);
  const at::Tensor gb = need_gb ? at::empty({R, r}, opts) : at::Tensor();
  const at::Tensor gw = need_gw ? (gs * w_row).to(x.scalar_type()) : at::Tensor();
  const at::Tensor gbw = need_a2 ? at::empty({R, r}, opts) : at::Tensor();

  // Base gradients: every expert with rows is written whole by one GEMM, the others are zeroed; the small factor
  // gradients start at zero.
  at::Tensor g_w1 = need_w1 ? empty_idle_zeroed({d.shared ? 1 : E, 2 * F, H}, opts, off, d.shared) : at::Tensor();
  at::Tensor g_w2 = need_w2 ? empty_idle_zeroed({d.shared ? 1 : E, H, F}, opts, off, d.shared) : at::Tensor();
  at::Tensor g_a1 = need_a1 ? at::zeros({E, r, H}, opts) : at::Tensor();
  at::Tensor g_b1 = need_b1 ? at::zeros({E, 2 * F, r}, opts) : at::Tensor();
  at::Tensor g_a2 = need_a2 ? at::zeros({E, r, F}, opts) : at::Tensor();
  at::Tensor g_b2 = need_b2 ? at::zeros({E, H, r}, opts) : at::Tensor();

  // Down projection: u, gb, and the gradients of W2 (per expert), A2, B2.
  for_each_expert(off, [&](int64_t e, int64_t r0, int64_t n) {
    const at::Tensor ge = gs.narrow(0, r0, n);
    if (need_u && !d.shared) mm_into(u.narrow(0, r0, n), ge, w2[e]);
    if (need_gb) mm_into(gb.narrow(0, r0, n), ge, b2[e]);
    if (need_w2 && !d.shared) mm_into(g_w2[e], gw.narrow(0, r0, n).t(), a.narrow(0, r0, n));
    if (need_b2) mm_scaled_into(g_b2[e], gw.narrow(0, r0, n).t(), z2.narrow(0, r0, n), s);
    if (need_a2) {
      at::Tensor gbe = gbw.narrow(0, r0, n);
      at::mul_out(gbe, gb.narrow(0, r0, n), w_row.narrow(0, r0, n));
      mm_scaled_into(g_a2[e], gbe.t(), a.narrow(0, r0, n), s);
    }
  });
  zero_tail(u, off);
  zero_tail(gb, off);
  if (need_w2 && d.shared) mm_into(g_w2[0], gy.t(), Dev::combine(a, weights, pr, d.k));  // grad_y^T sum_j w_j a_j

  at::Tensor grad_weights;
  if (need_w) {
    // grad_w[p] = grad_y_t . o_p = u . a + s gb . z2 per row, in the accumulation dtype, then back to pair order.
    const at::Tensor per_row = (u.to(acc_dtype) * a.to(acc_dtype)).sum(1) + (gb.to(acc_dtype) * z2.to(acc_dtype)).sum(1) * s;
    grad_weights = per_row.index_select(0, pr.to(at::kLong)).view({d.T, d.k}).to(weights.scalar_type());
  }

  if (need_dh) {
    // da = w (u + s gb A2_e), in place over u; then dh through the gated activation.
    for_each_expert(off, [&](int64_t e, int64_t r0, int64_t n) {
      u.narrow(0, r0, n).addmm_(gb.narrow(0, r0, n), a2[e], /*beta=*/1, /*alpha=*/s);
    });
    u.mul_(w_row);
    at::Tensor dh = at::empty({R, 2 * F}, opts);
    gated_backward_into(dh, h, u, F, act);
    u = at::Tensor();
    const at::Tensor dz1 = need_dz1 ? at::empty({R, r}, opts) : at::Tensor();
    const at::Tensor dxr = need_x ? at::empty({R, H}, opts) : at::Tensor();  // per-row grad_x before the combine
    const at::Tensor xs = need_a1 || (need_w1 && !d.shared) ? Dev::gather(x, sp, d.k) : at::Tensor();
    for_each_expert(off, [&](int64_t e, int64_t r0, int64_t n) {
      const at::Tensor dhe = dh.narrow(0, r0, n);
      if (need_dz1) mm_into(dz1.narrow(0, r0, n), dhe, b1[e]);
      if (need_b1) mm_scaled_into(g_b1[e], dhe.t(), z1.narrow(0, r0, n), s);
      if (need_a1) mm_scaled_into(g_a1[e], dz1.narrow(0, r0, n).t(), xs.narrow(0, r0, n), s);
      if (need_w1 && !d.shared) mm_into(g_w1[e], dhe.t(), xs.narrow(0, r0, n));
      if (need_x) {
        const at::Tensor dxe = dxr.narrow(0, r0, n);
        if (d.shared) {
          mm_scaled_into(dxe, dz1.narrow(0, r0, n), a1[e], s);
        } else {
          mm_into(dxe, dhe, w1[e]);
          dxe.addmm_(dz1.narrow(0, r0, n), a1[e], /*beta=*/1, /*alpha=*/s);
        }
      }
    });
    zero_tail(dxr, off);
    // Shared base: the per-token sum of the rows' dh meets W1 once (grad_x) and x once (grad_W1).
    const at::Tensor dh_tok = d.shared && (need_x || need_w1) ? Dev::combine(dh, at::Tensor(), pr, d.k) : at::Tensor();
    if (need_w1 && d.shared) mm_into(g_w1[0], dh_tok.t(), x);
    if (need_x) {
      std::get<0>(out) = Dev::combine(dxr, at::Tensor(), pr, d.k);
      if (d.shared) std::get<0>(out) = at::addmm(std::get<0>(out), dh_tok, w1[0]);
    }
  }
  std::get<1>(out) = grad_weights;
  std::get<2>(out) = g_w1;
  std::get<3>(out) = g_w2;
  std::get<4>(out) = g_a1;
  std::get<5>(out) = g_b1;
  std::get<6>(out) = g_a2;
  std::get<7>(out) = g_b2;
  return out;
}

}  // namespace h3fusion::lora
