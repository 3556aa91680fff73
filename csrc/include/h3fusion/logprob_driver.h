// Host-side pieces of linear_logprob shared by the CPU and CUDA bodies: argument checks, the chunk plan, and the
// chunk loops that run the GEMMs (ATen: BLAS on the CPU, cuBLAS on CUDA) around device-specific elementwise steps.
//
// Memory: the only [rows, vocab]-shaped buffers are one logits block of at most `rows x chunk` elements in the
// accumulation dtype (plus, on CUDA for bf16/fp16, the same block of softmax gradients in the input dtype), reused
// for every block. The vocabulary is the outer loop so that a weight chunk's gradient is finished before the next
// chunk starts; the row blocks inside it accumulate in a fixed order (deterministic, no atomics).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <tuple>

#include "h3fusion/checks.h"

// mm with an fp32 result for bf16/fp16 inputs (aten::mm.dtype) exists on CUDA in every torch we support from 2.9 on;
// before that we fall back to a low-precision GEMM followed by an upcast.
#if (TORCH_VERSION_MAJOR > 2) || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define H3F_HAS_MM_OUT_DTYPE 1
#else
#define H3F_HAS_MM_OUT_DTYPE 0
#endif

namespace h3fusion::logprob {

// Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise.
inline at::ScalarType acc_dtype(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by forward and backward. Errors name the argument.
// (defined in csrc/op_checks.cpp)
void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets);

// Checks of the backward's extra [N] vectors (grad_logp, grad_lse, lse): rank, length, floating dtype, device.
// (defined in csrc/op_checks.cpp)
void check_row_vector(const at::Tensor& t, const char* name, const at::Tensor& hidden);

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const long long parsed = std::atoll(v);
  return parsed > 0 ? static_cast<int64_t>(parsed) : fallback;
}

// The blocking: `chunk` vocabulary rows per GEMM and `rows` hidden rows per block, with rows * chunk <= budget.
// H3FUSION_LOGPROB_VOCAB_CHUNK (default 4096) and H3FUSION_LOGPROB_BLOCK_ELEMS (default 2^26, i.e. 256 MiB of fp32
// logits) override them; the tests use tiny values to exercise several chunks and row blocks on tiny shapes.
struct Plan {
  int64_t chunk;
  int64_t rows;
};

inline Plan make_plan(int64_t n, int64_t v) {
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(v, env_int("H3FUSION_LOGPROB_VOCAB_CHUNK", 4096)));
  const int64_t budget = env_int("H3FUSION_LOGPROB_BLOCK_ELEMS", int64_t(1) << 26);
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(n, 1), budget / chunk));
  return {chunk, rows};
}

// The first rows * cols elements of a flat buffer, viewed as a contiguous [rows, cols] matrix (so one buffer serves
// every block, including the smaller last ones).
inline at::Tensor view2d(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// out = a @ b where out (contiguous) has the accumulation dtype and a, b may be bf16/fp16.
inline void mm_acc(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
    return;
  }
#if H3F_HAS_MM_OUT_DTYPE
  if (a.is_cuda()) {
    at::mm_out(out, a, b, out.scalar_type());  // cuBLAS: low-precision inputs, fp32 accumulation and result
    return;
  }
#endif
  out.copy_(at::mm(a, b));
}

// out += a @ b in out's dtype. `scratch` is a flat buffer of out's dtype with at least out.numel() elements, used only
// when the GEMM inputs are low precision (the fp32-result GEMM cannot accumulate into an fp32 matrix in place).
inline void addmm_acc(at::Tensor out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scratch) {
  if (a.scalar_type() == out.scalar_type()) {
    out.addmm_(a, b);
    return;
  }
  at::Tensor tmp = view2d(scratch, out.size(0), out.size(1));
  mm_acc(tmp, a, b);
  out.add_(tmp);
}

// Forward chunk loop. `h` [N,H] and `w` [V,H] are contiguous; the GEMMs run in `gemm_dtype` (the CPU upcasts
// bf16/fp16 to fp32 chunk by chunk; CUDA keeps the input dtype and asks cuBLAS for an fp32 result). For every block
// `update(logits [r, c] acc dtype, row0, v0)` folds the block into the running logsumexp and picks target logits.
template <class Update>
void forward_chunks(const at::Tensor& h, const at::Tensor& w, at::ScalarType gemm_dtype, at::ScalarType acc,
                    Update&& update) {
  const int64_t n = h.size(0), v = w.size(0);
  if (n == 0) return;
  const Plan plan = make_plan(n, v);
  const at::Tensor hg = h.scalar_type() == gemm_dtype ? h : h.to(gemm_dtype);
  const at::Tensor logits_buf = at::empty({plan.rows * plan.chunk}, h.options().dtype(acc));
  for (int64_t v0 = 0; v0 < v; v0 += plan.chunk) {
    const int64_t c = std::min(plan.chunk, v - v0);
    at::Tensor wc = w.narrow(0, v0, c);
    if (wc.scalar_type() != gemm_dtype) wc = wc.to(gemm_dtype);
    for (int64_t r0 = 0; r0 < n; r0 += plan.rows) {
      const int64_t r = std::min(plan.rows, n - r0);
      at::Tensor logits = view2d(logits_buf, r, c);
      mm_acc(logits, hg.narrow(0, r0, r), wc.t());
      update(logits, r0, v0);
    }
  }
}

// Backward chunk loop: recomputes each logits block, turns it into d logits with
// `dlogits(logits [r, c] acc, row0, v0) -> Tensor [r, c] in gemm_dtype` (may reuse the logits storage), then
//   grad_hidden[rows] += dlogits @ W_chunk          (accumulated over chunks in the accumulation dtype)
//   grad_weight[chunk] = sum over row blocks of dlogits^T @ hidden[rows]   (fixed order).
// Only the gradients named in `mask` (hidden, weight) are computed: a frozen head (mask[1] false) skips both
// weight-gradient GEMMs per block, a frozen input (mask[0] false) skips the grad_hidden GEMM; a skipped gradient is
// returned as an undefined tensor.
// Returns (grad_hidden in h's dtype, grad_weight in w's dtype).
template <class DLogits>
std::tuple<at::Tensor, at::Tensor> backward_chunks(const at::Tensor& h, const at::Tensor& w, at::ScalarType gemm_dtype,
                                                   at::ScalarType acc, std::array<bool, 2> mask, DLogits&& dlogits) {
  const int64_t n = h.size(0), hd = h.size(1), v = w.size(0);
  const bool need_h = mask[0], need_w = mask[1];
  if (!need_h && !need_w) return {at::Tensor(), at::Tensor()};
  at::Tensor grad_weight = need_w ? at::empty_like(w, at::MemoryFormat::Contiguous) : at::Tensor();
  if (n == 0) {
    if (need_w) grad_weight.zero_();
    return {need_h ? at::empty_like(h, at::MemoryFormat::Contiguous) : at::Tensor(), grad_weight};
  }
  const Plan plan = make_plan(n, v);
  const bool multi_block = plan.rows < n;
  const auto acc_opts = h.options().dtype(acc);
  const at::Tensor hg = h.scalar_type() == gemm_dtype ? h : h.to(gemm_dtype);
  at::Tensor grad_hidden_acc = need_h ? at::zeros({n, hd}, acc_opts) : at::Tensor();
  const at::Tensor logits_buf = at::empty({plan.rows * plan.chunk}, acc_opts);
  // Low-precision GEMMs (CUDA bf16/fp16) produce an fp32 product that is then added: one scratch buffer for both.
  at::Tensor scratch;
  if (gemm_dtype != acc) scratch = at::empty({std::max(plan.rows, plan.chunk) * hd}, acc_opts);
  // The weight-gradient chunk accumulates in place when the output already has the accumulation dtype; a single row
  // block in low precision writes the GEMM result once; otherwise it goes through an fp32 buffer.
  const bool gw_in_place = w.scalar_type() == acc;
  const bool gw_direct = !gw_in_place && !multi_block && gemm_dtype == w.scalar_type();
  at::Tensor gw_buf;
  if (need_w && !gw_in_place && !gw_direct) gw_buf = at::empty({plan.chunk * hd}, acc_opts);

  for (int64_t v0 = 0; v0 < v; v0 += plan.chunk) {
    const int64_t c = std::min(plan.chunk, v - v0);
    at::Tensor wc = w.narrow(0, v0, c);
    if (wc.scalar_type() != gemm_dtype) wc = wc.to(gemm_dtype);
    at::Tensor gw_chunk = need_w ? grad_weight.narrow(0, v0, c) : at::Tensor();
    at::Tensor gw_acc = !need_w || gw_direct ? at::Tensor() : (gw_in_place ? gw_chunk : view2d(gw_buf, c, hd));
    for (int64_t r0 = 0; r0 < n; r0 += plan.rows) {
      const int64_t r = std::min(plan.rows, n - r0);
      const at::Tensor hb = hg.narrow(0, r0, r);
      at::Tensor logits = view2d(logits_buf, r, c);
      mm_acc(logits, hb, wc.t());
      const at::Tensor d = dlogits(logits, r0, v0);
      if (need_h) addmm_acc(grad_hidden_acc.narrow(0, r0, r), d, wc, scratch);
      if (!need_w) continue;
      if (gw_direct) {
        at::mm_out(gw_chunk, d.t(), hb);
      } else if (r0 == 0) {
        mm_acc(gw_acc, d.t(), hb);
      } else {
        addmm_acc(gw_acc, d.t(), hb, scratch);
      }
    }
    if (need_w && !gw_in_place && !gw_direct) gw_chunk.copy_(gw_acc);
  }
  at::Tensor grad_hidden;
  if (need_h)
    grad_hidden = grad_hidden_acc.scalar_type() == h.scalar_type() ? grad_hidden_acc
                                                                   : grad_hidden_acc.to(h.scalar_type());
  return {grad_hidden, grad_weight};
}

}  // namespace h3fusion::logprob
