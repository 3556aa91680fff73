// CPU fused expert FFN: plan -> per expert: gather -> gate/up GEMM -> act(gate) * up -> down GEMM -> weighted sum into y;
// and its backward, which recomputes the activation from the saved pre-activation and computes only the gradients
// that output_mask asks for.
//
// Threads: when no expert has more than a few rows (decode), the threads split every expert's weight rows
// (few_rows_ffn.h). Many small experts run one group of experts per thread (single-threaded GEMMs inside the parallel
// region).
// The forward of few large experts splits bf16 tokens into groups (forward_token_groups) that each run every expert
// on their rows: one run of groups per thread when there are enough groups, else groups one after another (always so
// for other dtypes), each GEMM with all threads (BLAS's, or for fp32 projections on AVX2 and AMD CPUs the narrow
// tile's split of the weight rows: small_gemm.h, large_nt) and the row passes with at::parallel_for. With at least two
// active experts per thread, the backward also runs one group of experts per thread (fewer barriers; see
// backward_thread_count).
// Memory: every scratch buffer is per expert (or per row block of an expert) and per thread, so a forward without
// autograd holds only y and a block of scratch per thread; only the training forward keeps the [T*k, 2F]
// pre-activation for the backward.
// The gated-activation row passes (row_passes.h: silu, gelu, gelu_tanh) are written to vectorise and compiled for
// three ISA levels (the loader picks the best).
#include "few_rows_ffn.h"
#include "large_buffers.h"
#include "moe_cpu.h"
#include "row_passes.h"
#include "small_gemm.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <h3fusion/checks.h>
#include <h3fusion/op_checks.h>

#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace h3fusion::cpu {
namespace {

// Below this many rows per active expert, BLAS threading inside one GEMM pays less than one expert per thread.
constexpr int64_t kRowsPerExpertForBlasThreads = 256;
// Cost of touching one expert's weights, in rows of work, for balancing experts over threads.
constexpr int64_t kExpertFixedCostRows = 8;

// The argument checks of both devices (h3fusion/op_checks.h), and the CPU's ISA override read on this thread.
MoeDims check_ffn_args(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                       const at::Tensor& down_proj) {
  const MoeDims d = check_moe_ffn_args(x, weights, gate_up_proj, down_proj);
  (void)cpu_isa_capped_at_avx2();  // read first here, on the calling thread: a bad value is an error, not an abort
  return d;
}

// Calls fn(slot, e, row_begin, rows) for every expert. Parallel mode runs one task per thread (slot = the task, for
// per-thread scratch); each task takes the next expert from a shared counter over the experts by falling cost, until
// none is left (longest first, then whoever is free). Which thread runs an expert does not change a bit: each expert
// writes its own rows and gradients with single-threaded kernels. A plan fixed before the threads start (each expert
// to the group with the least work so far) lost time wherever its cost guess or the threads' speeds were off: a
// descheduled vCPU on a shared host left the other core idle at the end (T16 H512 F256 E64 k8 fp32 fwd+bwd, 2 threads,
// 21 interleaved calls: faster in 17, median 16.4 -> 15.9 ms; T256 no slower). Serial mode (slot 0) leaves the
// threads to BLAS and the row passes.
template <typename Fn>
void for_each_expert(const int64_t* off, int64_t E, int64_t nt, const Fn& fn) {
  if (nt <= 1) {
    for (int64_t e = 0; e < E; ++e) fn(int64_t(0), e, off[e], off[e + 1] - off[e]);
    return;
  }
  auto cost = [&](int64_t e) {
    const int64_t n = off[e + 1] - off[e];
    return n > 0 ? n + kExpertFixedCostRows : 1;
  };
  std::vector<int64_t> order(E);
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  std::atomic<size_t> next{0};
  // OpenMP workers do not inherit this thread's dispatch state (the below-autograd guard): carry it over.
  const at::ThreadLocalState tls;
  at::parallel_for(0, nt, 1, [&](int64_t sb, int64_t se) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    for (int64_t slot = sb; slot < se; ++slot)
      for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < order.size();) {
        const int64_t e = order[i];
        fn(slot, e, off[e], off[e + 1] - off[e]);
      }
  });
}

// Experts with at least one row.
int64_t active_experts(const int64_t* off, int64_t E) {
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) active += off[e + 1] > off[e];
  return active;
}

int64_t max_rows(const int64_t* off, int64_t E) {
  int64_t m = 0;
  for (int64_t e = 0; e < E; ++e) m = std::max(m, off[e + 1] - off[e]);
  return m;
}

// Many small experts (decided by the shape alone, so that results never depend on the thread count): experts are
// spread over threads, one group per thread, each GEMM single-threaded. Otherwise serial mode: experts one after
// another, BLAS threads inside each GEMM.
bool expert_parallel_mode(const int64_t* off, int64_t E) {
  const int64_t active = active_experts(off, E);
  return active > 1 && off[E] < kRowsPerExpertForBlasThreads * active;
}

// Thread groups for for_each_expert: 1 in serial mode.
int64_t expert_thread_count(const int64_t* off, int64_t E) {
  return expert_parallel_mode(off, E) ? std::min<int64_t>(at::get_num_threads(), E) : 1;
}

// Thread groups of the backward. Its per-expert results (gradient rows, routing-weight dots, weight gradients) are
// the same whichever thread computes an expert, so unlike the forward it may also choose by thread count: with at
// least two active experts per thread, one group of experts per thread (single-threaded GEMMs, one parallel region
// for the whole backward) beats BLAS threads inside every GEMM. Measured at T2048 H512 F1408 E8 k2 fp32 on 2 busy
// cores: fwd+bwd 0.74x the time (every one of 8 interleaved calls faster): a threaded GEMM and each row pass is a
// barrier, and a descheduled thread stalls the other at every one of them. With fewer experts than that (or many
// threads) BLAS threads keep every core busy.
int64_t backward_thread_count(const int64_t* off, int64_t E) {
  const int64_t active = active_experts(off, E);
  const int64_t threads = at::get_num_threads();
  const bool per_expert = expert_parallel_mode(off, E) || (threads > 1 && active >= 2 * threads);
  return per_expert ? std::min<int64_t>(threads, E) : 1;
}

// Rows per block of one expert in the few-large-experts forward, for R rows (of one token group) over `active`
// experts: the scratch (gathered x, pre-activation, output) stays at about an eighth of the experts' rows, so a
// forward without autograd holds little beyond y.
// Where bf16 GEMMs are widened to fp32 (small_gemm.h: widen_bf16_gemm), blocks are kWidenedBlockRows rows: the fp32
// copies of a block's activation and of a weight chunk come on top of the scratch, and at 512-640 rows a forward
// without autograd peaked at twice the eager loop's memory (T2048 H512 F1408 E8 k2 bf16: 19.9 MB against 9.2).
constexpr int64_t kWidenedBlockRows = 256;
int64_t forward_block_rows(int64_t R, int64_t active, bool widened) {
  if (widened) return kWidenedBlockRows;
  const int64_t avg = (R + std::max<int64_t>(active, 1) - 1) / std::max<int64_t>(active, 1);
  return std::max<int64_t>(512, avg + avg / 4);
}

// Token groups of the few-large-experts forward: contiguous ranges of tokens, each taking about this many rows of
// every active expert.
constexpr int64_t kTokenGroupRows = 256;
constexpr int64_t kMaxTokenGroups = 64;

// The number of token groups, from the dtype and shape alone: which rows form one GEMM, and so every bit of y, must
// not depend on the thread count. A thread that owns whole groups runs every step single-threaded with no barrier
// between steps. That pays for bf16, whose GEMMs are oneDNN's: at T2048 H512 F1408 E8 k2 on 2 busy cores the
// forward without autograd went from 51.3 to 49.8 ms, the training forward from 79.4 to 74.0 and fwd+bwd with frozen
// experts from 121 to 115 (medians of 16 interleaved calls, faster in 13-14 of 16; the serial forward had spent 9% of
// its time spinning in barriers). MKL's threaded fp32 GEMMs lost nothing to barriers (the same A/B: 0.95-1.01x), so
// other dtypes keep one group, and so does bf16 on CPUs without bf16 dot products, whose GEMMs are widened to fp32
// (small_gemm.h), each expert's weights once per call.
int64_t forward_token_groups(at::ScalarType dtype, int64_t T, int64_t R, int64_t active) {
  if (dtype != at::kBFloat16 || bf16_widened(dtype)) return 1;
  const int64_t per_expert = R / std::max<int64_t>(active, 1);
  return std::clamp<int64_t>(per_expert / kTokenGroupRows, 1, std::clamp<int64_t>(T, 1, kMaxTokenGroups));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_forward(
    const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& experts_in,
    const at::Tensor& gate_up_in, const at::Tensor& down_in, bool save_pre_activation,
    c10::string_view activation_name) {
  const MoeDims d = check_ffn_args(x_in, weights_in, gate_up_in, down_in);
  const Activation activation = parse_activation(activation_name);
  // The internal GEMMs are not part of any autograd graph (autograd for this op is registered in Python).
  tune_malloc_once();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_moe_ffn_experts(experts_in, x_in, d);
  at::Tensor sorted_pairs, pair_rows, offsets;
  std::tie(sorted_pairs, pair_rows, offsets) = route_plan(experts_in, d.E);

  const at::Tensor x = x_in.contiguous(), w_gu = gate_up_in.contiguous(), w_down = down_in.contiguous();
  const int64_t R = d.T * d.k, F = d.F, H = d.H;
  const auto opts = x.options();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int32_t* sp = sorted_pairs.const_data_ptr<int32_t>();
  const int64_t nt = expert_thread_count(off, d.E);
  // Few large experts: token groups (forward_token_groups), one run of them per thread when there are at least as
  // many groups as threads (slots = threads), else one group after another with all threads in every step (slots = 1).
  const int64_t active = active_experts(off, d.E), threads = at::get_num_threads();
  const int64_t groups = forward_token_groups(x.scalar_type(), d.T, R, active);
  const int64_t slots = threads > 1 && groups >= threads ? threads : 1;
  const bool serial_fill = expert_parallel_mode(off, d.E) ? nt == 1 : slots == 1;
  at::Tensor gate_up_out =
      save_pre_activation ? empty_large({R, 2 * F}, opts, serial_fill) : at::empty({0, 2 * F}, opts);
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "h3fusion_moe_ffn_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The pre-activation of a block: a slice of the saved buffer, or scratch with the activation written over its gate
    // half when nothing is saved (then no separate activation buffer exists).
    auto ffn_block = [&](int64_t e, int64_t r0, int64_t n, const at::Tensor& xs, const at::Tensor& h_scratch,
                         const at::Tensor& act_scratch, const at::Tensor& out) {
      gather_into(xs, x, sp + r0, n, d.k);
      at::Tensor h = save_pre_activation ? gate_up_out.narrow(0, r0, n) : h_scratch;
      linear_into(h, xs, w_gu[e]);
      at::Tensor act = save_pre_activation ? act_scratch : h.narrow(1, 0, F);
      gated_rows(h.mutable_data_ptr<scalar_t>(), act.mutable_data_ptr<scalar_t>(), act.stride(0), n, F, activation);
      linear_into(out, act, w_down[e]);
    };
    // Decode (fp32/bf16, the dtypes of the small GEMMs; no expert above kSmallGemmMaxRows rows): threads split
    // every expert's weight rows.
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
      if (max_rows(off, d.E) <= kSmallGemmMaxRows) {
        const at::Tensor h = save_pre_activation ? gate_up_out : at::empty({R, 2 * F}, opts);
        const at::Tensor act = save_pre_activation ? at::empty({R, F}, opts) : at::Tensor();
        y = combine_rows(few_rows_ffn<scalar_t>(x, w_gu, w_down, sp, off, d.k, h, act, activation), weights_in,
                         pair_rows, d.k);
        return;
      }
    }
    if (expert_parallel_mode(off, d.E)) {
      // Many small experts, one group per thread: per-thread scratch, expert outputs in expert-sorted rows, then the
      // weighted combine in slot order.
      const int64_t mr = max_rows(off, d.E);
      at::Tensor xs_all = at::empty({nt, mr, H}, opts);
      at::Tensor h_all = save_pre_activation ? at::Tensor() : at::empty({nt, mr, 2 * F}, opts);
      at::Tensor act_all = save_pre_activation ? at::empty({nt, mr, F}, opts) : at::Tensor();
      at::Tensor down_out = empty_large({R, H}, opts, nt == 1);
      for_each_expert(off, d.E, nt, [&](int64_t slot, int64_t e, int64_t r0, int64_t n) {
        if (n == 0) return;
        ffn_block(e, r0, n, xs_all[slot].narrow(0, 0, n), save_pre_activation ? at::Tensor() : h_all[slot].narrow(0, 0, n),
                  save_pre_activation ? act_all[slot].narrow(0, 0, n) : at::Tensor(), down_out.narrow(0, r0, n));
      });
      y = combine_rows(down_out, weights_in, pair_rows, d.k);
      return;
    }
    // Few large experts: each token group runs every expert in turn on its rows of that expert (a contiguous slice of
    // the expert's rows, which keep token order), in blocks, and sums the block outputs straight into its own tokens'
    // rows of y (fp32 accumulation for bf16/fp16), so every element of y is summed in expert order whichever thread
    // runs the group.
    // cut[g * E + e]: expert e's first row whose token lies in group g or later; cut[groups * E + e] = its end.
    std::vector<int64_t> cut((groups + 1) * d.E);
    int64_t longest = 0;
    for (int64_t g = 0; g <= groups; ++g) {
      const int32_t first_pair = static_cast<int32_t>(d.T * g / groups * d.k);
      for (int64_t e = 0; e < d.E; ++e) {
        cut[g * d.E + e] = g == groups ? off[e + 1] : std::lower_bound(sp + off[e], sp + off[e + 1], first_pair) - sp;
        if (g > 0) longest = std::max(longest, cut[g * d.E + e] - cut[(g - 1) * d.E + e]);
      }
    }
    const int64_t B = std::min(longest, forward_block_rows(R / groups, active, bf16_widened(x.scalar_type())));
    const bool acc_is_y = x.scalar_type() == acc_dtype;
    at::Tensor acc = at::zeros({d.T, H}, opts.dtype(acc_dtype));
    const at::Tensor w_pair = weights_in.to(acc_dtype).contiguous();
    {
      // per slot: gathered x, then the block's output rows; the pre-activation (nothing saved) or the activation
      at::Tensor xs = at::empty({slots, B, H}, opts);
      at::Tensor h = save_pre_activation ? at::Tensor() : empty_large({slots, B, 2 * F}, opts, slots == 1);
      at::Tensor act = save_pre_activation ? empty_large({slots, B, F}, opts, slots == 1) : at::Tensor();
      auto run_groups = [&](int64_t slot, int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
          for (int64_t e = 0; e < d.E; ++e) {
            const int64_t end = cut[(g + 1) * d.E + e];
            for (int64_t b0 = cut[g * d.E + e]; b0 < end; b0 += B) {
              const int64_t n = std::min(B, end - b0);
              at::Tensor xs_b = xs[slot].narrow(0, 0, n);
              ffn_block(e, b0, n, xs_b, save_pre_activation ? at::Tensor() : h[slot].narrow(0, 0, n),
                        save_pre_activation ? act[slot].narrow(0, 0, n) : at::Tensor(), xs_b);
              accumulate_rows<scalar_t, acc_t>(acc.mutable_data_ptr<acc_t>(), xs_b.const_data_ptr<scalar_t>(), sp + b0,
                                               w_pair.const_data_ptr<acc_t>(), n, d.k, H);
            }
          }
        }
      };
      if (slots == 1) {
        run_groups(0, 0, groups);
      } else {
        // OpenMP workers do not inherit this thread's dispatch state (the below-autograd guard): carry it over.
        const at::ThreadLocalState tls;
        at::parallel_for(0, slots, 1, [&](int64_t sb, int64_t se) {
          const at::ThreadLocalStateGuard tls_guard(tls);
          for (int64_t slot = sb; slot < se; ++slot)
            run_groups(slot, groups * slot / slots, groups * (slot + 1) / slots);
        });
      }
    }  // scratch freed before y is made
    y = acc_is_y ? acc : acc.to(x.scalar_type());
  });
  return {y, sorted_pairs, pair_rows, offsets, gate_up_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_backward(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& gate_up_in,
    const at::Tensor& down_in, const at::Tensor& sorted_pairs_in, const at::Tensor& pair_rows_in,
    const at::Tensor& offsets_in, const at::Tensor& gate_up_out_in, std::array<bool, 4> output_mask,
    c10::string_view activation_name) {
  const MoeDims d = check_ffn_args(x_in, weights_in, gate_up_in, down_in);
  const Activation activation = parse_activation(activation_name);
  // The internal GEMMs are not part of any autograd graph (autograd for this op is registered in Python).
  tune_malloc_once();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t R = d.T * d.k, F = d.F, H = d.H, E = d.E;
  check_moe_ffn_backward_args(grad_y_in, x_in, sorted_pairs_in, pair_rows_in, offsets_in, gate_up_out_in, d);

  // output_mask: x, weights, gate_up_proj, down_proj. What each needs:
  //   U = grad_y rows @ W_down (for dH and grad_w); dH (for grad_x and grad_gate_up); the activation (recomputed in
  //   the row pass for grad_w; written out only for grad_down); x rows (grad_gate_up); grad_y rows scaled by w
  //   (grad_down).
  const auto [need_x, need_w, need_gu, need_down] = output_mask;
  if (!need_x && !need_w && !need_gu && !need_down) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  const bool need_dh = need_x || need_gu, need_u = need_dh || need_w;

  const at::Tensor x = x_in.contiguous(), w_gu = gate_up_in.contiguous(), w_down = down_in.contiguous();
  const at::Tensor sorted_pairs = sorted_pairs_in.contiguous(), offsets = offsets_in.contiguous();
  const at::Tensor h = gate_up_out_in.contiguous();
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[E] == R, "expert_offsets must start at 0 and end at x.shape[0] * k (", R, ")");
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(off[e + 1] >= off[e], "expert_offsets must be non-decreasing, got a drop after expert ", e);
  const int32_t* sp = sorted_pairs.const_data_ptr<int32_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(sp[r] >= 0 && sp[r] < R, "sorted_pairs must lie in [0, x.shape[0] * k = ", R, "), found ", sp[r]);

  const auto opts = x.options();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad_y = grad_y_in.to(x.scalar_type()).contiguous();
  const at::Tensor w_pair = weights_in.to(acc_dtype).contiguous();
  const int64_t nt = backward_thread_count(off, E);
  const int64_t mr = max_rows(off, E);
  // Per-thread scratch for one expert: grad_y rows (scaled by w in place), x rows, U / activation, dH.
  at::Tensor G = empty_large({nt, mr, H}, opts, nt == 1);
  at::Tensor X = need_gu ? empty_large({nt, mr, H}, opts, nt == 1) : at::Tensor();
  at::Tensor UA = empty_large({nt, mr, F}, opts, nt == 1);
  at::Tensor DH = need_dh ? empty_large({nt, mr, 2 * F}, opts, nt == 1) : at::Tensor();
  at::Tensor gx_rows = need_x ? empty_large({R, H}, opts, nt == 1) : at::Tensor();
  at::Tensor grad_w_pair = need_w ? at::empty({R}, opts.dtype(acc_dtype)) : at::Tensor();
  at::Tensor grad_gu = need_gu ? empty_large({E, 2 * F, H}, opts, nt == 1) : at::Tensor();
  at::Tensor grad_down = need_down ? empty_large({E, H, F}, opts, nt == 1) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "h3fusion_moe_ffn_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const acc_t* wp = w_pair.const_data_ptr<acc_t>();
    acc_t* gwp = need_w ? grad_w_pair.mutable_data_ptr<acc_t>() : nullptr;
    for_each_expert(off, E, nt, [&](int64_t slot, int64_t e, int64_t r0, int64_t n) {
      if (n == 0) {  // no rows: the expert's weights get zero gradient
        if (need_gu) zero_gradient(grad_gu[e]);
        if (need_down) zero_gradient(grad_down[e]);
        return;
      }
      at::Tensor G_e = G[slot].narrow(0, 0, n), UA_e = UA[slot].narrow(0, 0, n);
      at::Tensor DH_e = need_dh ? DH[slot].narrow(0, 0, n) : at::Tensor();
      gather_into(G_e, grad_y, sp + r0, n, d.k);
      if (need_u) matmul_into(UA_e, G_e, w_down[e]);
      gated_backward_dispatch<scalar_t>(need_dh, need_w, need_down, hp + r0 * 2 * F, UA_e.mutable_data_ptr<scalar_t>(),
                                         need_dh ? DH_e.mutable_data_ptr<scalar_t>() : nullptr, sp + r0, wp, gwp,
                                         G_e.mutable_data_ptr<scalar_t>(), need_down, n, F, H, activation);
      if (need_down) matmul_tn_into(grad_down[e], G_e, UA_e);
      if (need_gu) {
        at::Tensor X_e = X[slot].narrow(0, 0, n);
        gather_into(X_e, x, sp + r0, n, d.k);
        matmul_tn_into(grad_gu[e], DH_e, X_e);
      }
      if (need_x) matmul_into(gx_rows.narrow(0, r0, n), DH_e, w_gu[e]);
    });
  });
  at::Tensor grad_x = need_x ? combine_rows(gx_rows, at::Tensor(), pair_rows_in, d.k) : at::Tensor();
  at::Tensor grad_weights =
      need_w ? grad_w_pair.view({d.T, d.k}).to(weights_in.scalar_type()) : at::Tensor();
  return {grad_x, grad_weights, grad_gu, grad_down};
}

}  // namespace
}  // namespace h3fusion::cpu

TORCH_LIBRARY_IMPL(h3fusion, CPU, m) {
  m.impl("moe_ffn_forward", &h3fusion::cpu::moe_ffn_forward);
  m.impl("moe_ffn_backward", &h3fusion::cpu::moe_ffn_backward);
}
