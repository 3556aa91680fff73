// Online logsumexp arithmetic shared by the CPU and CUDA linear_logprob kernels (host and device inline).
//
// A running logsumexp is kept as a pair (m, s) meaning lse = m + log(s): m is the largest logit seen so far and
// s = sum_v exp(x_v - m). Two pairs merge exactly (up to rounding), so the vocabulary can be visited chunk by chunk
// and threads/warps can reduce pairs in a fixed tree (deterministic, no atomics).
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define H3F_HOST_DEVICE __host__ __device__
#else
#define H3F_HOST_DEVICE
#endif

namespace h3fusion {

H3F_HOST_DEVICE inline float lp_exp(float x) { return ::expf(x); }
H3F_HOST_DEVICE inline double lp_exp(double x) { return ::exp(x); }
H3F_HOST_DEVICE inline float lp_log(float x) { return ::logf(x); }
H3F_HOST_DEVICE inline double lp_log(double x) { return ::log(x); }

template <typename T>
H3F_HOST_DEVICE inline T lp_neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Merge the pair (m2, s2) into (m, s). An empty pair is (-inf, 0); merging two empty pairs stays empty instead of
// producing exp(-inf - -inf) = NaN.
template <typename T>
H3F_HOST_DEVICE inline void lse_merge(T& m, T& s, T m2, T s2) {
  const T mx = m > m2 ? m : m2;
  if (mx == lp_neg_inf<T>()) return;
  s = s * lp_exp(m - mx) + s2 * lp_exp(m2 - mx);
  m = mx;
}

// Add one logit x to the running pair: one exponential per element (the rescale happens only on a new maximum).
// x = -inf into an empty pair is skipped; a NaN x always reaches s.
template <typename T>
H3F_HOST_DEVICE inline void lse_add(T& m, T& s, T x) {
  if (x > m) {
    s = s * lp_exp(m - x) + T(1);
    m = x;
  } else if (m != lp_neg_inf<T>() || x != x) {
    s += lp_exp(x - m);
  }
}

// The finished logsumexp of a pair (-inf for an empty pair).
template <typename T>
H3F_HOST_DEVICE inline T lse_value(T m, T s) {
  return m + lp_log(s);
}

// d logit for one element of the softmax gradient, given p = exp(x - lse):
//   d = grad_logp * (1[v == t] - p) + grad_lse * p = coef * p + (v == t ? g : 0),
// with g = grad_logp (0 on ignored rows) and coef = grad_lse - g.
template <typename T>
H3F_HOST_DEVICE inline T softmax_grad(T x, T lse, T coef, T g, bool is_target) {
  const T d = coef * lp_exp(x - lse);
  return is_target ? d + g : d;
}

}  // namespace h3fusion
