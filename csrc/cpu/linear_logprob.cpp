// linear_logprob on the CPU: logp_n = h_n . W[t_n] - logsumexp_v(h_n . W[v]) without the [N, V] logits.
//
// The chunk loops and GEMMs are shared with CUDA (h3fusion/logprob_driver.h). Here the GEMMs run in the
// accumulation dtype (bf16/fp16 inputs are upcast one weight chunk at a time), the exponentials use ATen's
// vectorised kernels on the current block in place, and the per-row steps (target pick, running-max rescale,
// one-hot term) are at::parallel_for loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "h3fusion/checks.h"
#include "h3fusion/logprob_driver.h"
#include "h3fusion/logprob_math.h"

namespace {

using at::Tensor;
namespace lp = h3fusion::logprob;

constexpr int64_t kRowGrain = 256;

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
      // The block's row maxima, merged with the running maxima; the running sums are rescaled to the new maxima.
      Tensor block_max = std::get<0>(logits.max(1));
      acc_t* bm = block_max.data_ptr<acc_t>();
      at::parallel_for(0, r, kRowGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t row = r0 + i;
          const int64_t tv = tp[row] - v0;
          if (tv >= 0 && tv < c) tl[row] = lg[i * c + tv];  // 64-bit offset into the block
          const acc_t new_max = bm[i] > m[row] ? bm[i] : m[row];
          if (new_max != h3fusion::lp_neg_inf<acc_t>()) s[row] *= h3fusion::lp_exp(m[row] - new_max);
          m[row] = new_max;
          bm[i] = new_max;
        }
      });
      // exp(logits - max) in place (vectorised ATen kernels), then the row sums join the running sums.
      logits.sub_(block_max.unsqueeze(1)).exp_();
      const Tensor block_sum = logits.sum(1);
      const acc_t* bs = block_sum.data_ptr<acc_t>();
      at::parallel_for(0, r, kRowGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) s[r0 + i] += bs[i];
      });
    });

    acc_t* lp_out = logp.data_ptr<acc_t>();
    acc_t* lse_out = lse.data_ptr<acc_t>();
    at::parallel_for(0, n, kRowGrain, [&](int64_t b, int64_t e) {
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
                                                       int64_t ignore_index) {
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
    at::parallel_for(0, n, kRowGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        gp[i] = tp[i] == ignore_index ? acc_t(0) : glp[i];
        cp[i] = gsp[i] - gp[i];
      }
    });

    grads = lp::backward_chunks(h, w, acc, acc, [&](Tensor& logits, int64_t r0, int64_t v0) -> Tensor {
      const int64_t r = logits.size(0), c = logits.size(1);
      // p = exp(logits - lse) scaled by coef, in place (vectorised ATen kernels).
      logits.sub_(ls.narrow(0, r0, r).unsqueeze(1)).exp_().mul_(coef.narrow(0, r0, r).unsqueeze(1));
      acc_t* d = logits.data_ptr<acc_t>();
      at::parallel_for(0, r, kRowGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t tv = tp[r0 + i] - v0;
          if (tv >= 0 && tv < c) d[i * c + tv] += gp[r0 + i];
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
