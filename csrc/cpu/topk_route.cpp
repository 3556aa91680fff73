// CPU top-k routing: softmax over E in fp32 (fp64 for fp64 logits), top-k with ties to the lower expert index,
// weights sorted by descending probability, optional renormalisation over the k kept; and its backward.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <h3fusion/op_checks.h>

#include <atomic>
#include <cmath>
#include <vector>

namespace h3fusion::cpu {
namespace {

// One token's softmax into `p` (length E); returns false when a logit is not finite.
template <typename scalar_t, typename acc_t>
bool softmax_row(const scalar_t* z, int64_t E, acc_t* p) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < E; ++e) {
    const acc_t v = static_cast<acc_t>(z[e]);
    if (!std::isfinite(v)) return false;
    m = v > m ? v : m;
  }
  acc_t s = 0;
  for (int64_t e = 0; e < E; ++e) {
    p[e] = std::exp(static_cast<acc_t>(z[e]) - m);
    s += p[e];
  }
  const acc_t inv = acc_t(1) / s;
  for (int64_t e = 0; e < E; ++e) p[e] *= inv;
  return true;
}

// The k largest of `z` (compared as acc_t, exact), ties to the lower index, in descending order. Comparing logits
// rather than rounded probabilities keeps the order independent of how exp() rounds.
template <typename scalar_t, typename acc_t>
void topk_row(const scalar_t* z, int64_t E, int64_t k, int32_t* idx) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    acc_t best_v = 0;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= (idx[i] == e);
      if (taken) continue;
      const acc_t v = static_cast<acc_t>(z[e]);
      if (best < 0 || v > best_v) {  // strict '>' keeps the lower index on ties
        best = e;
        best_v = v;
      }
    }
    idx[j] = static_cast<int32_t>(best);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_route(const at::Tensor& logits_in, int64_t k, bool renormalize) {
  check_topk_route_args(logits_in, k);
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  const at::Tensor logits = logits_in.contiguous();
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(acc_dtype));
  at::Tensor experts = at::empty({T, k}, logits.options().dtype(at::kInt));
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "h3fusion_topk_route_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    acc_t* w = weights.mutable_data_ptr<acc_t>();
    int32_t* ids = experts.mutable_data_ptr<int32_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> p(E);
      for (int64_t t = begin; t < end; ++t) {
        if (!softmax_row(z + t * E, E, p.data())) {
          finite.store(false, std::memory_order_relaxed);
          return;
        }
        int32_t* row_ids = ids + t * k;
        topk_row<scalar_t, acc_t>(z + t * E, E, k, row_ids);
        acc_t s = 0;
        for (int64_t j = 0; j < k; ++j) s += p[row_ids[j]];
        const acc_t scale = renormalize ? acc_t(1) / s : acc_t(1);
        for (int64_t j = 0; j < k; ++j) w[t * k + j] = p[row_ids[j]] * scale;
      }
    });
  });
  TORCH_CHECK(finite.load(), "logits must be finite (router logits contain NaN or Inf)");
  return {weights, experts};
}

// With p = softmax(z) and S = sum_j p[e_j]: w_j = p[e_j] / S when renormalising, so
//   dL/dp[e_j] = (g_j - sum_i g_i w_i) / S   (renormalize)   or   g_j   (otherwise),
//   dL/dz_e    = p_e (dL/dp_e - sum_f p_f dL/dp_f), with dL/dp zero off the chosen experts.
at::Tensor topk_route_backward(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                               const at::Tensor& experts_in, bool renormalize) {
  check_topk_route_backward_args(grad_weights_in, logits_in, experts_in);
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  const int64_t k = experts_in.size(1);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor experts = experts_in.contiguous();
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gw = grad_weights_in.to(acc_dtype).contiguous();
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  std::atomic<bool> ok{true};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "h3fusion_topk_route_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const acc_t* g = gw.const_data_ptr<acc_t>();
    const int32_t* ids = experts.const_data_ptr<int32_t>();
    scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> p(E), dp(k);
      for (int64_t t = begin; t < end; ++t) {
        const int32_t* row_ids = ids + t * k;
        bool valid = softmax_row(z + t * E, E, p.data());
        for (int64_t j = 0; j < k; ++j) valid &= row_ids[j] >= 0 && row_ids[j] < E;
        if (!valid) {
          ok.store(false, std::memory_order_relaxed);
          return;
        }
        const acc_t* gt = g + t * k;
        if (renormalize) {
          acc_t s = 0, gdotw = 0;
          for (int64_t j = 0; j < k; ++j) s += p[row_ids[j]];
          for (int64_t j = 0; j < k; ++j) gdotw += gt[j] * (p[row_ids[j]] / s);
          for (int64_t j = 0; j < k; ++j) dp[j] = (gt[j] - gdotw) / s;
        } else {
          for (int64_t j = 0; j < k; ++j) dp[j] = gt[j];
        }
        acc_t dot = 0;
        for (int64_t j = 0; j < k; ++j) dot += dp[j] * p[row_ids[j]];
        scalar_t* o = out + t * E;
        for (int64_t e = 0; e < E; ++e) o[e] = static_cast<scalar_t>(-p[e] * dot);
        // A repeated expert id (not produced by topk_route) would still get the sum of its slots' gradients.
        for (int64_t j = 0; j < k; ++j) {
          const int32_t e = row_ids[j];
          acc_t acc = 0;
          bool first = true;
          for (int64_t i = 0; i < k; ++i) {
            if (row_ids[i] != e) continue;
            if (i < j) first = false;
            acc += dp[i];
          }
          if (first) o[e] = static_cast<scalar_t>(p[e] * (acc - dot));
        }
      }
    });
  });
  TORCH_CHECK(ok.load(), "logits must be finite and experts must lie in [0, logits.shape[1])");
  return grad_logits;
}

}  // namespace
}  // namespace h3fusion::cpu

TORCH_LIBRARY_IMPL(h3fusion, CPU, m) {
  m.impl("topk_route", &h3fusion::cpu::topk_route);
  m.impl("topk_route_backward", &h3fusion::cpu::topk_route_backward);
}
