// CPU fused expert FFN: plan -> gather -> per-expert gate/up GEMM with SiLU-and-mul right after -> per-expert down
// GEMM -> weighted combine; and its backward, which recomputes the activation from the saved pre-activation.
//
// Every GEMM writes straight into a row slice of one expert-sorted buffer (or an expert's slice of a weight
// gradient), so nothing is allocated per expert. Threads: many small experts run one expert per thread (each GEMM
// single-threaded inside the parallel region); few large experts run one after another with BLAS's own threads.
#include "moe_cpu.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <h3fusion/checks.h>

#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace h3fusion::cpu {
namespace {

// Below this many rows per active expert, BLAS threading inside one GEMM pays less than one expert per thread.
constexpr int64_t kRowsPerExpertForBlasThreads = 256;
// Cost of touching one expert's weights, in rows of work, for balancing experts over threads.
constexpr int64_t kExpertFixedCostRows = 8;

struct Dims {
  int64_t T, H, k, E, F;
};

Dims check_ffn_args(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                    const at::Tensor& down_proj) {
  check_dim(x, "x", 2);
  check_float(x, "x");
  const int64_t T = x.size(0), H = x.size(1);
  check_dim(weights, "weights", 2);
  check_size(weights, "weights", 0, T, "x.shape[0]");
  TORCH_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == x.scalar_type(),
              "weights must have dtype float32 or x's dtype (", x.scalar_type(), "), got ", weights.scalar_type());
  const int64_t k = weights.size(1);
  TORCH_CHECK(k >= 1, "weights.shape[1] (k) must be >= 1, got shape ", weights.sizes());
  check_dim(gate_up_proj, "gate_up_proj", 3);
  check_same_dtype(gate_up_proj, "gate_up_proj", x, "x");
  const int64_t E = gate_up_proj.size(0);
  TORCH_CHECK(E >= 1, "gate_up_proj.shape[0] (number of experts) must be >= 1, got shape ", gate_up_proj.sizes());
  TORCH_CHECK(gate_up_proj.size(1) % 2 == 0, "gate_up_proj.shape[1] must be even (2 * intermediate size), got shape ",
              gate_up_proj.sizes());
  check_size(gate_up_proj, "gate_up_proj", 2, H, "x.shape[1]");
  const int64_t F = gate_up_proj.size(1) / 2;
  check_dim(down_proj, "down_proj", 3);
  check_same_dtype(down_proj, "down_proj", x, "x");
  check_size(down_proj, "down_proj", 0, E, "gate_up_proj.shape[0]");
  check_size(down_proj, "down_proj", 1, H, "x.shape[1]");
  check_size(down_proj, "down_proj", 2, F, "gate_up_proj.shape[1] / 2");
  check_same_device(weights, "weights", x, "x");
  check_same_device(gate_up_proj, "gate_up_proj", x, "x");
  check_same_device(down_proj, "down_proj", x, "x");
  return {T, H, k, E, F};
}

// Calls fn(e, row_begin, rows) for every expert. Parallel mode hands each thread a contiguous group of experts
// with about the same number of rows; serial mode leaves the threads to BLAS and the elementwise loops.
template <typename Fn>
void for_each_expert(const int64_t* off, int64_t E, bool parallel, const Fn& fn) {
  const int64_t nt = parallel ? std::min<int64_t>(at::get_num_threads(), E) : 1;
  if (nt <= 1) {
    for (int64_t e = 0; e < E; ++e) fn(e, off[e], off[e + 1] - off[e]);
    return;
  }
  auto cost = [&](int64_t e) {
    const int64_t n = off[e + 1] - off[e];
    return n > 0 ? n + kExpertFixedCostRows : 1;
  };
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) total += cost(e);
  std::vector<int64_t> bounds(nt + 1, E);
  bounds[0] = 0;
  int64_t acc = 0, g = 1;
  for (int64_t e = 0; e < E && g < nt; ++e) {
    acc += cost(e);
    if (acc * nt >= total * g) bounds[g++] = e + 1;
  }
  // OpenMP workers do not inherit this thread's dispatch state (the below-autograd guard): carry it over.
  const at::ThreadLocalState tls;
  at::parallel_for(0, nt, 1, [&](int64_t gb, int64_t ge) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    for (int64_t gi = gb; gi < ge; ++gi)
      for (int64_t e = bounds[gi]; e < bounds[gi + 1]; ++e) fn(e, off[e], off[e + 1] - off[e]);
  });
}

int64_t max_rows(const int64_t* off, int64_t E) {
  int64_t m = 0;
  for (int64_t e = 0; e < E; ++e) m = std::max(m, off[e + 1] - off[e]);
  return m;
}

bool use_expert_threads(const int64_t* off, int64_t E) {
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) active += off[e + 1] > off[e];
  const int64_t rows = off[E];
  return active > 1 && rows < kRowsPerExpertForBlasThreads * active;
}

// A fresh CPU buffer for a large output or scratch tensor. Buffers this big come straight from mmap, so every call
// would otherwise take one page fault per 4 KiB on first touch (tens of ms for the [T*k, 2F] pre-activation); asking
// for transparent huge pages (in "madvise" mode on most distributions) cuts that 512-fold. Advisory only: the kernel
// may ignore it, and the contents are written before they are read either way.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  static const bool enabled = std::getenv("H3FUSION_NO_HUGEPAGES") == nullptr;  // escape hatch, read once
  if (enabled && t.device().is_cpu() && last > first)
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

// out = a @ b, written into a view (a row slice of a buffer, or one expert's slice of a gradient).
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// ---- skinny GEMM for experts with a handful of rows (decode) -------------------------------------------------
// out[r, j] = sum_i a[r, i] * w[j, i]: each weight row is streamed from memory once and dotted with every input row
// while it sits in L1. BLAS packs the whole weight matrix first, which for 1-8 rows costs several times the stream.
// Partial sums run in kLanes independent lanes (vectorisable; the same summation order every run). The function
// is compiled for three ISA levels and the loader picks the best the CPU has.
constexpr int64_t kSkinnyMaxRows = 8;
constexpr int64_t kPrefetchFloats = 2048;

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define H3F_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define H3F_ISA_CLONES
#endif

template <int NB>
__attribute__((always_inline)) inline void skinny_rows(const float* __restrict__ a, int64_t lda,
                                                       const float* __restrict__ wj, int64_t K, float* out,
                                                       int64_t ldo) {
  constexpr int kLanes = 16;
  float acc[NB][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= K; i += kLanes) {
    // Weights are one long stream; hardware prefetchers stop at 4 KiB page edges, so ask for the line 8 KiB ahead
    // (a hint: past the end of the tensor it is simply dropped).
    __builtin_prefetch(wj + i + kPrefetchFloats, 0, 0);
    for (int r = 0; r < NB; ++r)
      for (int l = 0; l < kLanes; ++l) acc[r][l] += wj[i + l] * a[r * lda + i + l];
  }
  // A fixed pairwise tree over the lanes (vectorisable halving steps), then the scalar tail.
  for (int half = kLanes / 2; half >= 1; half /= 2)
    for (int r = 0; r < NB; ++r)
      for (int l = 0; l < half; ++l) acc[r][l] += acc[r][l + half];
  for (int r = 0; r < NB; ++r) {
    float sum = acc[r][0];
    for (int64_t t = i; t < K; ++t) sum += wj[t] * a[r * lda + t];
    out[r * ldo] = sum;
  }
}

H3F_ISA_CLONES void skinny_gemm_nt(
    const float* a, int64_t lda, int64_t n, const float* w, int64_t M, int64_t K, float* out, int64_t ldo) {
  for (int64_t j = 0; j < M; ++j) {
    const float* wj = w + j * K;
    int64_t r = 0;
    for (; r + 4 <= n; r += 4) skinny_rows<4>(a + r * lda, lda, wj, K, out + r * ldo + j, ldo);
    switch (n - r) {
      case 3: skinny_rows<3>(a + r * lda, lda, wj, K, out + r * ldo + j, ldo); break;
      case 2: skinny_rows<2>(a + r * lda, lda, wj, K, out + r * ldo + j, ldo); break;
      case 1: skinny_rows<1>(a + r * lda, lda, wj, K, out + r * ldo + j, ldo); break;
      default: break;
    }
  }
}

// out[n, M] = a[n, K] @ w[M, K]^T for contiguous row blocks: the skinny kernel for few fp32 rows, BLAS otherwise.
void linear_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& w) {
  const int64_t n = a.size(0);
  if (a.scalar_type() == at::kFloat && n <= kSkinnyMaxRows && a.is_contiguous() && w.is_contiguous() &&
      out.is_contiguous()) {
    skinny_gemm_nt(a.const_data_ptr<float>(), a.size(1), n, w.const_data_ptr<float>(), w.size(0), w.size(1),
                   out.mutable_data_ptr<float>(), out.size(1));
    return;
  }
  mm_into(out, a, w.t());
}

template <typename acc_t>
inline acc_t sigmoid(acc_t g) {
  return acc_t(1) / (acc_t(1) + std::exp(-g));
}

// fp32/fp64 take the sigmoid from ATen's runtime-dispatched vectorised kernel (this file is compiled for the
// baseline ISA, where a scalar exp() per element would cost as much as a small GEMM); bf16/fp16 compute it inline in
// fp32 so the activation is rounded once.
template <typename scalar_t>
constexpr bool kAtenSigmoid = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

// sig[r, f] = sigmoid(h[r, f]) over the gate half of a block of pre-activation rows h[n, 2F].
// Threads split the rows here, never inside a row: left to itself, TensorIterator cuts the element range wherever
// the thread count says, and an element in a vectorised chunk and in a scalar tail can differ in the last bit, so
// y would depend on torch.get_num_threads(). Inside a parallel region each call below runs on one thread.
void sigmoid_of_gate(const at::Tensor& h, at::Tensor sig) {
  const int64_t n = h.size(0), F = h.size(1) / 2;
  at::parallel_for(0, n, std::max<int64_t>(1, 8192 / std::max<int64_t>(F, 1)), [&](int64_t b, int64_t e) {
    at::Tensor out = sig.narrow(0, b, e - b);
    at::sigmoid_out(out, h.narrow(0, b, e - b).narrow(1, 0, F));
  });
}

// act[r, f] = silu(h[r, f]) * h[r, F + f] for a block of n rows; for kAtenSigmoid types `act` already holds
// sigmoid(h[r, f]).
template <typename scalar_t>
void silu_mul_rows(const scalar_t* h, scalar_t* act, int64_t n, int64_t F) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, std::max<int64_t>(1, 8192 / std::max<int64_t>(F, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* __restrict__ hr = h + r * 2 * F;
      scalar_t* __restrict__ ar = act + r * F;
      for (int64_t f = 0; f < F; ++f) {
        const acc_t g = static_cast<acc_t>(hr[f]);
        const acc_t sg = kAtenSigmoid<scalar_t> ? static_cast<acc_t>(ar[f]) : sigmoid(g);
        ar[f] = static_cast<scalar_t>(g * sg * static_cast<acc_t>(hr[F + f]));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_forward(
    const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& experts_in,
    const at::Tensor& gate_up_in, const at::Tensor& down_in) {
  const Dims d = check_ffn_args(x_in, weights_in, gate_up_in, down_in);
  // The internal GEMMs are not part of any autograd graph (autograd for this op is registered in Python).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dim(experts_in, "experts", 2);
  check_dtype(experts_in, "experts", at::kInt);
  check_size(experts_in, "experts", 0, d.T, "x.shape[0]");
  check_size(experts_in, "experts", 1, d.k, "weights.shape[1]");
  check_same_device(experts_in, "experts", x_in, "x");
  at::Tensor sorted_pairs, pair_rows, offsets;
  std::tie(sorted_pairs, pair_rows, offsets) = route_plan(experts_in, d.E);

  const at::Tensor x = x_in.contiguous(), w_gu = gate_up_in.contiguous(), w_down = down_in.contiguous();
  const int64_t R = d.T * d.k, F = d.F;
  const at::Tensor xs = gather_rows(x, sorted_pairs, d.k);
  at::Tensor gate_up_out = empty_large({R, 2 * F}, x.options());
  at::Tensor down_out = empty_large({R, d.H}, x.options());
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const bool expert_threads = use_expert_threads(off, d.E);
  // The activation is per-expert scratch: one expert-sized block reused in serial mode (large fresh buffers cost
  // page faults on every call), the full row range when experts run on different threads.
  at::Tensor act = empty_large({expert_threads ? R : max_rows(off, d.E), F}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "h3fusion_moe_ffn_fwd_cpu", [&] {
    for_each_expert(off, d.E, expert_threads, [&](int64_t e, int64_t r0, int64_t n) {
      if (n == 0) return;
      at::Tensor h_e = gate_up_out.narrow(0, r0, n), act_e = act.narrow(0, expert_threads ? r0 : 0, n);
      linear_into(h_e, xs.narrow(0, r0, n), w_gu[e]);
      if constexpr (kAtenSigmoid<scalar_t>) sigmoid_of_gate(h_e, act_e);
      silu_mul_rows(h_e.const_data_ptr<scalar_t>(), act_e.mutable_data_ptr<scalar_t>(), n, F);
      linear_into(down_out.narrow(0, r0, n), act_e, w_down[e]);
    });
  });
  at::Tensor y = combine_rows(down_out, weights_in, pair_rows, d.k);
  return {y, sorted_pairs, pair_rows, offsets, gate_up_out};
}

// For the n rows of one expert (pointers at the expert's first row), with h = [g | u] the saved pre-activation and
// U = grad_y rows @ W_down[e]:
//   a = silu(g) u;  grad_w[r] = U[r] . a[r];  dA = w_r U;  du = dA silu(g);  dg = dA u silu'(g),
//   silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g).
// Also writes A (the activation, for grad_down) and scales the grad_y rows by w_r in place (for grad_down). For
// kAtenSigmoid types A holds sigmoid(g) on entry. The loops are split so that the elementwise one vectorises and the
// dot product keeps a fixed summation order.
template <typename scalar_t, typename acc_t>
void ffn_backward_rows(const scalar_t* h, const scalar_t* U, const acc_t* w_rows, scalar_t* A, scalar_t* dH,
                       scalar_t* gy, acc_t* grad_w_rows, int64_t n, int64_t F, int64_t H) {
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(F, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* __restrict__ hr = h + r * 2 * F;
      const scalar_t* __restrict__ ur = U + r * F;
      scalar_t* __restrict__ ar = A + r * F;
      scalar_t* __restrict__ dr = dH + r * 2 * F;
      const acc_t w = w_rows[r];
      for (int64_t f = 0; f < F; ++f) {
        const acc_t g = static_cast<acc_t>(hr[f]), u = static_cast<acc_t>(hr[F + f]);
        const acc_t s = kAtenSigmoid<scalar_t> ? static_cast<acc_t>(ar[f]) : sigmoid(g);
        const acc_t silu = g * s, dA = w * static_cast<acc_t>(ur[f]);
        ar[f] = static_cast<scalar_t>(silu * u);
        dr[f] = static_cast<scalar_t>(dA * u * s * (acc_t(1) + g * (acc_t(1) - s)));
        dr[F + f] = static_cast<scalar_t>(dA * silu);
      }
      constexpr int kLanes = 8;  // independent partial sums: vectorisable, and the same order every run
      acc_t part[kLanes] = {};
      int64_t f = 0;
      for (; f + kLanes <= F; f += kLanes)
        for (int l = 0; l < kLanes; ++l)
          part[l] += static_cast<acc_t>(ur[f + l]) * static_cast<acc_t>(ar[f + l]);
      acc_t gw = 0;
      for (int l = 0; l < kLanes; ++l) gw += part[l];
      for (; f < F; ++f) gw += static_cast<acc_t>(ur[f]) * static_cast<acc_t>(ar[f]);
      grad_w_rows[r] = gw;
      scalar_t* __restrict__ gr = gy + r * H;
      for (int64_t i = 0; i < H; ++i) gr[i] = static_cast<scalar_t>(w * static_cast<acc_t>(gr[i]));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_backward(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& gate_up_in,
    const at::Tensor& down_in, const at::Tensor& sorted_pairs_in, const at::Tensor& pair_rows_in,
    const at::Tensor& offsets_in, const at::Tensor& gate_up_out_in) {
  const Dims d = check_ffn_args(x_in, weights_in, gate_up_in, down_in);
  // The internal GEMMs are not part of any autograd graph (autograd for this op is registered in Python).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t R = d.T * d.k, F = d.F, H = d.H, E = d.E;
  check_dim(grad_y_in, "grad_y", 2);
  check_size(grad_y_in, "grad_y", 0, d.T, "x.shape[0]");
  check_size(grad_y_in, "grad_y", 1, H, "x.shape[1]");
  check_dim(sorted_pairs_in, "sorted_pairs", 1);
  check_dtype(sorted_pairs_in, "sorted_pairs", at::kInt);
  check_size(sorted_pairs_in, "sorted_pairs", 0, R, "x.shape[0] * k");
  check_dim(pair_rows_in, "pair_rows", 1);
  check_dtype(pair_rows_in, "pair_rows", at::kInt);
  check_size(pair_rows_in, "pair_rows", 0, R, "x.shape[0] * k");
  check_dim(offsets_in, "expert_offsets", 1);
  check_dtype(offsets_in, "expert_offsets", at::kLong);
  check_size(offsets_in, "expert_offsets", 0, E + 1, "number of experts + 1");
  check_dim(gate_up_out_in, "gate_up_out", 2);
  check_same_dtype(gate_up_out_in, "gate_up_out", x_in, "x");
  check_size(gate_up_out_in, "gate_up_out", 0, R, "x.shape[0] * k");
  check_size(gate_up_out_in, "gate_up_out", 1, 2 * F, "gate_up_proj.shape[1]");

  const at::Tensor x = x_in.contiguous(), w_gu = gate_up_in.contiguous(), w_down = down_in.contiguous();
  const at::Tensor sorted_pairs = sorted_pairs_in.contiguous(), offsets = offsets_in.contiguous();
  const at::Tensor h = gate_up_out_in.contiguous();
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[E] == R, "expert_offsets must start at 0 and end at x.shape[0] * k (", R, ")");
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(off[e + 1] >= off[e], "expert_offsets must be non-decreasing, got a drop after expert ", e);

  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gy = gather_rows(grad_y_in.to(x.scalar_type()), sorted_pairs, d.k);  // scaled by w_r below
  const at::Tensor xs = gather_rows(x, sorted_pairs, d.k);
  const at::Tensor w_rows =
      weights_in.to(acc_dtype).reshape({R}).index_select(0, sorted_pairs.to(at::kLong)).contiguous();
  const bool expert_threads = use_expert_threads(off, E);
  const int64_t ws_rows = expert_threads ? R : max_rows(off, E);  // per-expert scratch, as in the forward
  at::Tensor U = empty_large({ws_rows, F}, x.options());
  at::Tensor A = empty_large({ws_rows, F}, x.options());
  at::Tensor dH = empty_large({ws_rows, 2 * F}, x.options());
  at::Tensor gx_rows = empty_large({R, H}, x.options());
  at::Tensor grad_w_rows = at::empty({R}, x.options().dtype(acc_dtype));
  at::Tensor grad_gu = empty_large({E, 2 * F, H}, x.options());
  at::Tensor grad_down = empty_large({E, H, F}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "h3fusion_moe_ffn_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const acc_t* wr = w_rows.const_data_ptr<acc_t>();
    for_each_expert(off, E, expert_threads, [&](int64_t e, int64_t r0, int64_t n) {
      if (n == 0) {  // no rows: the expert's weights get zero gradient
        grad_gu[e].zero_();
        grad_down[e].zero_();
        return;
      }
      const int64_t w0 = expert_threads ? r0 : 0;
      at::Tensor U_e = U.narrow(0, w0, n), A_e = A.narrow(0, w0, n), dH_e = dH.narrow(0, w0, n);
      mm_into(U_e, gy.narrow(0, r0, n), w_down[e]);
      if constexpr (kAtenSigmoid<scalar_t>) sigmoid_of_gate(h.narrow(0, r0, n), A_e);
      ffn_backward_rows<scalar_t, acc_t>(hp + r0 * 2 * F, U_e.const_data_ptr<scalar_t>(), wr + r0,
                                         A_e.mutable_data_ptr<scalar_t>(), dH_e.mutable_data_ptr<scalar_t>(),
                                         gy.mutable_data_ptr<scalar_t>() + r0 * H,
                                         grad_w_rows.mutable_data_ptr<acc_t>() + r0, n, F, H);
      mm_into(grad_down[e], gy.narrow(0, r0, n).t(), A_e);
      mm_into(grad_gu[e], dH_e.t(), xs.narrow(0, r0, n));
      mm_into(gx_rows.narrow(0, r0, n), dH_e, w_gu[e]);
    });
  });
  at::Tensor grad_x = combine_rows(gx_rows, at::Tensor(), pair_rows_in, d.k);
  // Row r belongs to pair sorted_pairs[r]; pair p reads its row pair_rows[p].
  at::Tensor grad_weights =
      grad_w_rows.index_select(0, pair_rows_in.to(at::kLong)).reshape({d.T, d.k}).to(weights_in.scalar_type());
  return {grad_x, grad_weights, grad_gu, grad_down};
}

}  // namespace
}  // namespace h3fusion::cpu

TORCH_LIBRARY_IMPL(h3fusion, CPU, m) {
  m.impl("moe_ffn_forward", &h3fusion::cpu::moe_ffn_forward);
  m.impl("moe_ffn_backward", &h3fusion::cpu::moe_ffn_backward);
}
