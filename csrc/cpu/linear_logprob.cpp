// linear_logprob on the CPU: logp_n = h_n . W[t_n] - logsumexp_v(h_n . W[v]) without the [N, V] logits.
//
// The chunk loops and GEMMs are shared with CUDA (h3fusion/logprob_driver.h). Here the GEMMs run in the
// accumulation dtype (bf16/fp16 inputs are upcast one weight chunk at a time) and each logits block is consumed by
// one at::parallel_for over its rows: a fused max / sum-of-exp / target-pick pass in the forward, and an in-place
// softmax-gradient pass in the backward, with an exp written to vectorise (SIMD reductions in a fixed order).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "h3fusion/checks.h"
#include "h3fusion/logprob_driver.h"
#include "h3fusion/logprob_math.h"

namespace {

using at::Tensor;
namespace lp = h3fusion::logprob;

constexpr int64_t kRowGrain = 4;  // rows of a block per task (a row is a whole vocabulary chunk)

#if defined(__GNUC__) && !defined(__clang__)
#define H3F_VECTORIZABLE_EXP __attribute__((optimize("no-trapping-math")))
#else
#define H3F_VECTORIZABLE_EXP
#endif

// exp for softmax arguments (x <= 0 up to rounding; valid for x < 88), written so that the compiler vectorises the
// loops below: Cody-Waite range reduction x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r (the
// classic Cephes coefficients), and 2^n built in the exponent bits. Relative error about 1e-7; 0 below -87 and -inf.
inline __attribute__((always_inline)) H3F_VECTORIZABLE_EXP float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // round(x / ln2) in the low mantissa bits
  const float n = t - 12582912.0f;
  const float rr = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * rr + 1.3981999507e-3f;
  p = p * rr + 8.3334519073e-3f;
  p = p * rr + 4.1665795894e-2f;
  p = p * rr + 1.6666665459e-1f;
  p = p * rr + 5.0000001201e-1f;
  p = p * rr * rr + rr + 1.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  const int32_t bits = (ti - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// The fp32 row passes must vectorise: GCC keeps the selects in exp_nonpos as branches (no SIMD) under the default
// -ftrapping-math, so these few functions are compiled without it (they raise no FP exceptions anyone observes), and
// on x86-64 Linux they get an AVX2+FMA clone picked at load time (8 lanes instead of SSE's 4; the baseline clone
// stays for other CPUs). Each clone is deterministic. The fp64 path (tests, gradcheck) is plain libm.
#if defined(__GNUC__) && !defined(__clang__)
#define H3F_VECTORIZABLE __attribute__((optimize("no-trapping-math")))
#if defined(__x86_64__) && defined(__linux__)
#define H3F_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define H3F_CPU_CLONES
#endif
#else
#define H3F_VECTORIZABLE
#define H3F_CPU_CLONES
#endif

H3F_CPU_CLONES H3F_VECTORIZABLE float row_max(const float* x, int64_t c) {
  float mx = h3fusion::lp_neg_inf<float>();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < c; ++j) mx = x[j] > mx ? x[j] : mx;
  return mx;
}

H3F_CPU_CLONES H3F_VECTORIZABLE float row_sum_exp(const float* x, int64_t c, float mx) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < c; ++j) sum += exp_nonpos(x[j] - mx);
  return sum;
}

H3F_CPU_CLONES H3F_VECTORIZABLE void scale_exp_inplace(float* x, int64_t c, float lse, float coef) {
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) x[j] = coef * exp_nonpos(x[j] - lse);
}

double row_max(const double* x, int64_t c) {
  double mx = h3fusion::lp_neg_inf<double>();
  for (int64_t j = 0; j < c; ++j) mx = x[j] > mx ? x[j] : mx;
  return mx;
}

double row_sum_exp(const double* x, int64_t c, double mx) {
  double sum = 0.0;
  for (int64_t j = 0; j < c; ++j) sum += std::exp(x[j] - mx);
  return sum;
}

void scale_exp_inplace(double* x, int64_t c, double lse, double coef) {
  for (int64_t j = 0; j < c; ++j) x[j] = coef * std::exp(x[j] - lse);
}

// A target outside [0, V) other than ignore_index is an error on the CPU (it is checked before any work).
void check_target_range(const Tensor& targets, int64_t vocab, int64_t ignore_index) {
  const int64_t* t = targets.data_ptr<int64_t>();
  const int64_t n = targets.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < vocab), "targets[", i, "] = ", t[i],
                " is outside [0, V) = [0, ", vocab, ") and is not ignore_index (", ignore_index, ")");
  }
}

std::tuple<Tensor, Tensor> linear_logprob_forward_cpu(const Tensor& hidden, const Tensor& weight,
                                                      const Tensor& targets, int64_t ignore_index) {
  lp::check_inputs(hidden, weight, targets);
  TORCH_CHECK(hidden.device().is_cpu(), "hidden must be a CPU tensor for the CPU kernel, got ", hidden.device());
  const Tensor h = hidden.contiguous(), w = weight.contiguous();
  const Tensor t = targets.to(at::kLong).contiguous();
  const int64_t n = h.size(0), v = w.size(0);
  check_target_range(t, v, ignore_index);
  const auto acc = lp::acc_dtype(h);
  const auto opts = h.options().dtype(acc);
  Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts);
  if (n == 0) return {logp, lse};

  AT_DISPATCH_FLOATING_TYPES(acc, "linear_logprob_forward_cpu", [&] {
    using acc_t = scalar_t;
    Tensor run_max = at::full({n}, h3fusion::lp_neg_inf<acc_t>(), opts);
    Tensor run_sum = at::zeros({n}, opts);
    Tensor tgt_logit = at::zeros({n}, opts);
    acc_t* m = run_max.data_ptr<acc_t>();
    acc_t* s = run_sum.data_ptr<acc_t>();
    acc_t* tl = tgt_logit.data_ptr<acc_t>();
    const int64_t* tp = t.data_ptr<int64_t>();

    lp::forward_chunks(h, w, acc, acc, [&](Tensor& logits, int64_t r0, int64_t v0) {
      const int64_t r = logits.size(0), c = logits.size(1);
      const acc_t* lg = logits.data_ptr<acc_t>();
      // One pass over each row of the block (it stays in cache): max, then sum of exp(x - max), merged into the
      // row's running pair; the target logit is picked when the target falls in this chunk.
      at::parallel_for(0, r, kRowGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t row = r0 + i;
          const acc_t* x = lg + i * c;  // 64-bit offset into the block
          acc_t bm = row_max(x, c);
          acc_t bs = bm == h3fusion::lp_neg_inf<acc_t>() ? acc_t(0) : row_sum_exp(x, c, bm);
          h3fusion::lse_merge(m[row], s[row], bm, bs);
          const int64_t tv = tp[row] - v0;
          if (tv >= 0 && tv < c) tl[row] = x[tv];
        }
      });
    });

    acc_t* lp_out = logp.data_ptr<acc_t>();
    acc_t* lse_out = lse.data_ptr<acc_t>();
    at::parallel_for(0, n, 1024, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        lse_out[i] = h3fusion::lse_value(m[i], s[i]);
        lp_out[i] = tp[i] == ignore_index ? acc_t(0) : tl[i] - lse_out[i];
      }
    });
  });
  return {logp, lse};
}

std::tuple<Tensor, Tensor> linear_logprob_backward_cpu(const Tensor& grad_logp, const Tensor& grad_lse,
                                                       const Tensor& hidden, const Tensor& weight,
                                                       const Tensor& targets, const Tensor& lse,
                                                       int64_t ignore_index, std::array<bool, 2> output_mask) {
  lp::check_inputs(hidden, weight, targets);
  TORCH_CHECK(hidden.device().is_cpu(), "hidden must be a CPU tensor for the CPU kernel, got ", hidden.device());
  lp::check_row_vector(grad_logp, "grad_logp", hidden);
  lp::check_row_vector(grad_lse, "grad_lse", hidden);
  lp::check_row_vector(lse, "lse", hidden);
  const Tensor h = hidden.contiguous(), w = weight.contiguous();
  const Tensor t = targets.to(at::kLong).contiguous();
  const int64_t n = h.size(0);
  const auto acc = lp::acc_dtype(h);
  const Tensor gl = grad_logp.to(acc).contiguous();
  const Tensor gs = grad_lse.to(acc).contiguous();
  const Tensor ls = lse.to(acc).contiguous();

  std::tuple<Tensor, Tensor> grads;
  if (!output_mask[0] && !output_mask[1]) return grads;  // nothing asked for: both undefined
  AT_DISPATCH_FLOATING_TYPES(acc, "linear_logprob_backward_cpu", [&] {
    using acc_t = scalar_t;
    // Per row: g = grad_logp (0 on ignored rows, whose log-prob is the constant 0) and coef = grad_lse - g, so that
    // d logits = coef * p + g * onehot(t).
    Tensor g = at::empty({n}, gl.options()), coef = at::empty({n}, gl.options());
    acc_t* gp = g.data_ptr<acc_t>();
    acc_t* cp = coef.data_ptr<acc_t>();
    const acc_t* glp = gl.data_ptr<acc_t>();
    const acc_t* gsp = gs.data_ptr<acc_t>();
    const int64_t* tp = t.data_ptr<int64_t>();
    at::parallel_for(0, n, 1024, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        gp[i] = tp[i] == ignore_index ? acc_t(0) : glp[i];
        cp[i] = gsp[i] - gp[i];
      }
    });

    grads = lp::backward_chunks(h, w, acc, acc, output_mask, [&](Tensor& logits, int64_t r0, int64_t v0) -> Tensor {
      const int64_t r = logits.size(0), c = logits.size(1);
      acc_t* d = logits.data_ptr<acc_t>();
      const acc_t* lsp = ls.data_ptr<acc_t>();
      // In place: d = coef * exp(x - lse) + g * onehot(target).
      at::parallel_for(0, r, kRowGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t row = r0 + i;
          scale_exp_inplace(d + i * c, c, lsp[row], cp[row]);
          const int64_t tv = tp[row] - v0;
          if (tv >= 0 && tv < c) d[i * c + tv] += gp[row];
        }
      });
      return logits;
    });
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(h3fusion, CPU, m) {
  m.impl("linear_logprob_forward", &linear_logprob_forward_cpu);
  m.impl("linear_logprob_backward", &linear_logprob_backward_cpu);
}
