// Pieces of the per-expert-LoRA expert FFN (design.md §10) shared by its forward and backward
// (h3fusion/moe_lora_ffn_impl.h) on both devices: the gated activation over ATen ops (AtenRowPasses, the device-
// generic row passes; the CPU has vectorised ones in csrc/cpu/row_passes.h), GEMMs into views, the argument checks,
// the host copy of the expert offsets, and the expert scheduler.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <h3fusion/activation.h>
#include <h3fusion/checks.h>
#include <h3fusion/expert_checks.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace h3fusion::lora {

// out = act(g) (out may be a strided view).
inline void activate_into(at::Tensor out, const at::Tensor& g, Activation act) {
  switch (act) {
    case Activation::kSilu: at::silu_out(out, g); return;
    case Activation::kGelu: at::gelu_out(out, g, "none"); return;
    case Activation::kGeluTanh: at::gelu_out(out, g, "tanh"); return;
  }
}

// out = act'(g) * grad.
inline void activate_backward_into(at::Tensor out, const at::Tensor& grad, const at::Tensor& g, Activation act) {
  switch (act) {
    case Activation::kSilu: at::silu_backward_out(out, grad, g); return;
    case Activation::kGelu: at::gelu_backward_out(out, grad, g, "none"); return;
    case Activation::kGeluTanh: at::gelu_backward_out(out, grad, g, "tanh"); return;
  }
}

// a[n,F] = act(h[:, :F]) * h[:, F:], rounded like the plain-PyTorch expression (act rounded, then the product).
inline void gated_into(at::Tensor a, const at::Tensor& h, int64_t F, Activation act) {
  activate_into(a, h.narrow(1, 0, F), act);
  a.mul_(h.narrow(1, F, F));
}

// dh[n,2F] <- the gradient of a = act(g) * u given da[n,F]: dg = act'(g) (da u), du = da act(g).
inline void gated_backward_into(const at::Tensor& dh, const at::Tensor& h, const at::Tensor& da, int64_t F,
                                Activation act) {
  const at::Tensor g = h.narrow(1, 0, F), u = h.narrow(1, F, F);
  activate_backward_into(dh.narrow(1, 0, F), da * u, g, act);
  at::Tensor du = dh.narrow(1, F, F);
  activate_into(du, g, act);
  du.mul_(da);
}

// The row passes of the op over ATen ops, for any device (h3fusion/activation.h gives the math; at::silu / at::gelu
// compute the same functions):
//   gated(a[n,F], h[n,2F]):  a = act(h[:, :F]) * h[:, F:]
//   gated_backward(h, u[n,F], dh[n,2F] or undefined, sorted_pairs of these rows [n] int32, w_pair[R] and
//       grad_w_pair[R] (or undefined) in the accumulation dtype, by pair):  with w = w_pair[sp[i]] and a recomputed,
//       grad_w_pair[sp[i]] = u_i . a_i (a rounded to x.dtype first), dh = the gated backward of da = w u.
struct AtenRowPasses {
  static void gated(const at::Tensor& a, const at::Tensor& h, int64_t F, Activation act) { gated_into(a, h, F, act); }

  static void gated_backward(const at::Tensor& h, const at::Tensor& u, const at::Tensor& dh, const at::Tensor& sp,
                             const at::Tensor& w_pair, const at::Tensor& grad_w_pair, int64_t F, Activation act) {
    const at::Tensor idx = sp.to(at::kLong);
    if (grad_w_pair.defined()) {
      at::Tensor a = at::empty_like(u);
      gated_into(a, h, F, act);
      const auto acc = grad_w_pair.scalar_type();
      at::Tensor g = grad_w_pair;
      g.index_copy_(0, idx, (u.to(acc) * a.to(acc)).sum(1));
    }
    if (dh.defined()) gated_backward_into(dh, h, u * w_pair.index_select(0, idx).unsqueeze(1), F, act);
  }
};

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
Dims check_args(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                const at::Tensor& down_proj, const at::Tensor& gate_up_a, const at::Tensor& gate_up_b,
                const at::Tensor& down_a, const at::Tensor& down_b, double scaling);  // (csrc/op_checks.cpp)

// expert_offsets on the host (one copy; a sync on CUDA), checked: starts at 0, non-decreasing, ends <= R.
std::vector<int64_t> host_offsets(const at::Tensor& offsets, int64_t E, int64_t R);  // (csrc/op_checks.cpp)

// Rows [off[E], R) belong to no expert (ids outside [0, E), possible on CUDA only): zero, so they contribute nothing.
inline void zero_tail(const at::Tensor& rows, const std::vector<int64_t>& off) {
  if (!rows.defined()) return;
  const int64_t end = off.back(), R = rows.size(0);
  if (end < R) rows.narrow(0, end, R - end).zero_();
}

template <typename... Rows>
void zero_tails(const std::vector<int64_t>& off, const Rows&... rows) {
  (zero_tail(rows, off), ...);
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

// ---- row groups ------------------------------------------------------------------------------------------------
// The op runs its per-expert steps over groups of consecutive experts whose rows total at most a budget (about a
// quarter of the rows; an expert with more rows is a group of its own), with the [rows, F]-wide scratch buffers sized
// for one group and reused by the next: the peak memory of the scratch falls about four-fold. Every expert's work is
// the same GEMMs and row passes on the same rows either way, so the results do not depend on the grouping.
constexpr int64_t kRowGroupsPerCall = 4;

struct RowGroup {
  int64_t begin, end;           // rows [begin, end) of the R rows in expert order
  std::vector<int64_t> offsets;  // [E+1]: the experts' rows relative to `begin` (experts outside the group: none)
};

// The groups over [0, R) (the last one also takes the rows of no expert, [off[E], R)); `one` = a single group.
inline std::vector<RowGroup> row_groups(const std::vector<int64_t>& off, int64_t R, bool one) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  const int64_t budget = one ? R : std::max<int64_t>(1, (R + kRowGroupsPerCall - 1) / kRowGroupsPerCall);
  std::vector<int64_t> cuts{0};
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] > off[e] && off[e + 1] - cuts.back() > budget && off[e] > cuts.back()) cuts.push_back(off[e]);
  cuts.push_back(R);
  std::vector<RowGroup> groups;
  for (size_t g = 0; g + 1 < cuts.size(); ++g) {
    RowGroup rg{cuts[g], cuts[g + 1], std::vector<int64_t>(off.size())};
    for (size_t e = 0; e < off.size(); ++e) rg.offsets[e] = std::clamp(off[e], rg.begin, rg.end) - rg.begin;
    groups.push_back(std::move(rg));
  }
  return groups;
}

// The most rows of any group (the scratch buffers' height).
inline int64_t max_group_rows(const std::vector<RowGroup>& groups) {
  int64_t m = 0;
  for (const RowGroup& g : groups) m = std::max(m, g.end - g.begin);
  return m;
}

// The token of each row: sorted_pairs / k as int64 [R], for gathering one group's rows with index_select.
inline at::Tensor row_tokens(const at::Tensor& sorted_pairs, int64_t k) {
  return sorted_pairs.to(at::kLong).div_(k, "floor");
}

// out[n,C] (a group buffer's rows) = src[tokens[i]] for the group's tokens [n].
inline void gather_into(at::Tensor out, const at::Tensor& src, const at::Tensor& tokens) {
  at::index_select_out(out, src, 0, tokens);
}

// ---- expert scheduling -------------------------------------------------------------------------------------------
// Below this many rows per active expert, one expert per thread beats BLAS threads inside each GEMM (moe_ffn's rule).
constexpr int64_t kRowsPerExpertForBlasThreads = 256;
// Cost of one expert's fixed work, in rows, for balancing experts over threads.
constexpr int64_t kExpertFixedCostRows = 8;

inline int64_t active_experts(const std::vector<int64_t>& off) {
  int64_t active = 0;
  for (size_t e = 0; e + 1 < off.size(); ++e) active += off[e + 1] > off[e];
  return active;
}

// Many small experts (by the shape alone, so that results never depend on the thread count): all of an expert's
// work runs on one thread, experts spread over the threads. Otherwise the large GEMMs run one expert after another
// with BLAS's threads, and only the small rank-r work and the row passes are spread over experts.
inline bool many_small_experts(const std::vector<int64_t>& off) {
  const int64_t active = active_experts(off);
  return active > 1 && off.back() < kRowsPerExpertForBlasThreads * active;
}

// Calls fn(e, row_begin, rows) for every expert with rows. With `spread` (and a device whose work may run on host
// threads: the CPU) the experts are handed out in contiguous groups of about equal rows, one group per thread;
// every ATen op inside then runs single-threaded (a nested parallel region runs inline), so an expert's result does
// not depend on the thread that ran it. Why spread at all: each GEMM or row pass with its own parallel region costs
// a thread wake-up, which on a busy machine is worth more than the small rank-r GEMMs themselves.
template <bool kHostThreads, typename Fn>
void for_each_expert(const std::vector<int64_t>& off, bool spread, const Fn& fn) {
  std::vector<int64_t> active;
  for (size_t e = 0; e + 1 < off.size(); ++e)
    if (off[e + 1] > off[e]) active.push_back(static_cast<int64_t>(e));
  const int64_t A = static_cast<int64_t>(active.size());
  const int64_t nt = (kHostThreads && spread && !at::in_parallel_region()) ? std::min<int64_t>(at::get_num_threads(), A) : 1;
  if (nt <= 1) {
    for (const int64_t e : active) fn(e, off[e], off[e + 1] - off[e]);
    return;
  }
  auto cost = [&](int64_t i) { return off[active[i] + 1] - off[active[i]] + kExpertFixedCostRows; };
  int64_t total = 0;
  for (int64_t i = 0; i < A; ++i) total += cost(i);
  std::vector<int64_t> bounds(nt + 1, A);
  bounds[0] = 0;
  // Cut g at the expert boundary nearest to g/nt of the cost (with few experts, as in one row group, cutting only
  // after the target could leave a thread idle: two experts, the first the smaller, would both go to thread 0).
  int64_t acc = 0, g = 1;
  for (int64_t i = 0; i < A && g < nt; ++i) {
    const int64_t before = acc;
    acc += cost(i);
    while (g < nt && acc * nt >= total * g) {
      const bool cut_before = i > bounds[g - 1] && total * g - before * nt < acc * nt - total * g;
      bounds[g] = cut_before ? i : i + 1;
      ++g;
    }
  }
  // Worker threads do not inherit this thread's dispatch state (the below-autograd guard): carry it over.
  const at::ThreadLocalState tls;
  at::parallel_for(0, nt, 1, [&](int64_t gb, int64_t ge) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    for (int64_t gi = gb; gi < ge; ++gi)
      for (int64_t i = bounds[gi]; i < bounds[gi + 1]; ++i) {
        const int64_t e = active[i];
        fn(e, off[e], off[e + 1] - off[e]);
      }
  });
}

// One step of the op: `small` (rank-r GEMMs, row passes) for every expert, spread over the threads, and `big` (the
// base GEMMs) expert after expert with BLAS threads, in the order `big_first` says; with many small experts, both on
// the expert's thread.
template <bool kHostThreads, typename Big, typename Small>
void run_step(const std::vector<int64_t>& off, bool many_small, bool big_first, const Big& big, const Small& small) {
  if (many_small) {
    for_each_expert<kHostThreads>(off, true, [&](int64_t e, int64_t r0, int64_t n) {
      if (big_first) big(e, r0, n);
      small(e, r0, n);
      if (!big_first) big(e, r0, n);
    });
    return;
  }
  if (big_first) for_each_expert<kHostThreads>(off, false, big);
  for_each_expert<kHostThreads>(off, true, small);
  if (!big_first) for_each_expert<kHostThreads>(off, false, big);
}

}  // namespace h3fusion::lora
