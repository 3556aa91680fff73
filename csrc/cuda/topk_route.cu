// CUDA kernels of topk_route and topk_route_backward.
//
// Design: one warp per token, 4 tokens per 128-thread block. Lane l handles experts l, l+32, l+64, ... so any E
// works (E > 32 just loops). Softmax in fp32 (fp64 for fp64 logits): max-subtracted, sum of exponentials by a
// fixed per-lane order plus a fixed xor butterfly, so results are bitwise reproducible run to run.
// Top-k is k rounds of a warp arg-max over the total order "higher probability first, then lower expert index"
// (the order of torch.sort(probs, descending=True, stable=True) in reference/routing.py). Round j only considers
// experts strictly after round j-1's pick in that order, so no "already chosen" mask is needed and any k <= E
// works with O(1) state; probabilities are recomputed from the logits in every round (the same bits every time).
// Exact ties (equal probabilities, e.g. equal bf16 logits) go to the lower expert index, as in the reference.
//
// Limits: cost is O((k + 2) * E) per token, which is fine for router sizes (E in the tens to hundreds, small k).
// Non-finite logits are NOT checked on CUDA (checking would need a device->host sync); a NaN probability is
// ordered below every finite one, so the k picked experts are always k distinct ids in [0, E) (memory safe for
// the ops downstream) but their weights are NaN. Nothing checks them on the host either (the CPU op raises).
// No host-device synchronisation; everything runs on the current stream (CUDA-graph capturable).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <tuple>

#include "arg_checks.h"
#include "cuda_utils.cuh"

namespace h3fusion::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * kWarpSize;

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }

// Per-token softmax statistics: the row maximum m and s = sum_e exp(z_e - m), identical in every lane.
template <typename scalar_t, typename acc>
__device__ __forceinline__ void softmax_stats(const scalar_t* row, int64_t E, int lane, acc* m_out, acc* s_out) {
  acc m = -INFINITY;
  for (int64_t e = lane; e < E; e += kWarpSize) {
    const acc v = load_as<acc>(row + e);
    m = v > m ? v : m;  // a NaN logit never becomes the maximum
  }
  m = warp_max(m);
  acc s = 0;
  for (int64_t e = lane; e < E; e += kWarpSize) s += acc_exp(load_as<acc>(row + e) - m);
  *m_out = m;
  *s_out = warp_sum(s);
}

template <typename scalar_t, typename acc>
__device__ __forceinline__ acc prob(const scalar_t* row, int64_t e, acc m, acc s) {
  return acc_exp(load_as<acc>(row + e) - m) / s;
}

// The selection key of a probability: itself, or -1 (below every real probability) for NaN.
template <typename acc>
__device__ __forceinline__ acc order_key(acc p) {
  return p != p ? acc(-1) : p;
}

// Whether (ka, ia) comes before (kb, ib) in "higher key first, then lower index".
template <typename acc>
__device__ __forceinline__ bool comes_before(acc ka, int ia, acc kb, int ib) {
  return ka > kb || (ka == kb && ia < ib);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    topk_route_kernel(const scalar_t* __restrict__ logits, int64_t T, int64_t E, int64_t k, bool renormalize,
                      acc_t<scalar_t>* __restrict__ weights, int32_t* __restrict__ experts) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (t >= T) return;  // t is the same for the whole warp, so the warp stays converged
  const scalar_t* row = logits + t * E;
  acc* w_row = weights + t * k;
  int32_t* e_row = experts + t * k;

  acc m, s;
  softmax_stats(row, E, lane, &m, &s);

  // prev = the previous round's pick; round j considers only experts that come strictly after it.
  acc prev_key = INFINITY;
  int prev_idx = -1;
  acc kept_sum = 0;  // sum of the kept probabilities in pick order (identical in every lane)
  for (int64_t j = 0; j < k; ++j) {
    acc best_key = -INFINITY;  // below every key (keys are in [-1, 1])
    int best_idx = INT_MAX;
    for (int64_t e = lane; e < E; e += kWarpSize) {
      const acc key = order_key(prob(row, e, m, s));
      const int idx = static_cast<int>(e);
      if (comes_before(prev_key, prev_idx, key, idx) && comes_before(key, idx, best_key, best_idx)) {
        best_key = key;
        best_idx = idx;
      }
    }
    // Warp arg-max over a strict total order: associative and commutative, so every lane ends with the same pick.
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
      const acc o_key = __shfl_xor_sync(kFullMask, best_key, off);
      const int o_idx = __shfl_xor_sync(kFullMask, best_idx, off);
      if (comes_before(o_key, o_idx, best_key, best_idx)) {
        best_key = o_key;
        best_idx = o_idx;
      }
    }
    best_key = __shfl_sync(kFullMask, best_key, 0);
    best_idx = __shfl_sync(kFullMask, best_idx, 0);
    // k <= E guarantees an eligible expert exists in every round, so best_idx is in [0, E); the guard only keeps
    // memory safety obvious.
    const int64_t pick = best_idx < E ? best_idx : 0;
    const acc p = prob(row, pick, m, s);
    kept_sum += p;
    if (lane == 0) {
      w_row[j] = p;
      e_row[j] = static_cast<int32_t>(pick);
    }
    prev_key = best_key;
    prev_idx = best_idx;
  }
  if (renormalize && lane == 0) {
    for (int64_t j = 0; j < k; ++j) w_row[j] = w_row[j] / kept_sum;  // lane 0 wrote these itself
  }
}

// Gradient of the routing weights with respect to the logits, one warp per token.
//
// Derivation. p = softmax(z), dp_a/dz_i = p_a (delta_ai - p_i). Let g_j = dL/dw_j and G_i = sum_{j: e_j = i} g_j.
//  * renormalize=false: w_j = p_{e_j}, so
//      dL/dz_i = sum_j g_j p_{e_j} (delta_{e_j,i} - p_i) = p_i G_i - p_i sum_j g_j p_{e_j} = p_i (G_i - c),
//      with c = sum_j g_j w_j. Every expert gets a gradient (through the softmax normaliser).
//  * renormalize=true: w_j = p_{e_j} / S with S = sum_l p_{e_l}. The full normaliser cancels:
//      w_j = exp(z_{e_j}) / sum_l exp(z_{e_l}), a softmax over the kept logits only, so
//      dw_j/dz_i = w_j (delta_{e_j,i} - [i kept] w(i)), where w(i) = p_i / S is the renormalised weight of i, and
//      dL/dz_i = [i kept] w(i) (G_i - c), with c = sum_j g_j w_j. Experts that were not kept get exactly 0.
//  Both cases: dL/dz_i = q_i (G_i - c), c = sum_j g_j q_{e_j}, q = p (or p / S), zeroed for non-kept i when
//  renormalising. Expert ids outside [0, E) (invalid input) are ignored rather than read out of bounds.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    topk_route_backward_kernel(const acc_t<scalar_t>* __restrict__ grad_weights, const scalar_t* __restrict__ logits,
                               const int32_t* __restrict__ experts, int64_t T, int64_t E, int64_t k,
                               bool renormalize, scalar_t* __restrict__ grad_logits) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (t >= T) return;
  const scalar_t* row = logits + t * E;
  const acc* g_row = grad_weights + t * k;
  const int32_t* e_row = experts + t * k;
  scalar_t* out = grad_logits + t * E;

  acc m, s;
  softmax_stats(row, E, lane, &m, &s);

  acc S = 1;
  if (renormalize) {
    acc part = 0;
    for (int64_t j = lane; j < k; j += kWarpSize) {
      const int64_t e = e_row[j];
      if (e >= 0 && e < E) part += prob(row, e, m, s);
    }
    S = warp_sum(part);
  }
  acc c_part = 0;
  for (int64_t j = lane; j < k; j += kWarpSize) {
    const int64_t e = e_row[j];
    if (e >= 0 && e < E) c_part += g_row[j] * (prob(row, e, m, s) / S);
  }
  const acc c = warp_sum(c_part);

  for (int64_t i = lane; i < E; i += kWarpSize) {
    acc G = 0;
    bool kept = false;
    for (int64_t j = 0; j < k; ++j) {  // j in order: G is summed in a fixed order
      if (e_row[j] == i) {
        G += g_row[j];
        kept = true;
      }
    }
    const acc q = prob(row, i, m, s) / S;
    const acc d = (renormalize && !kept) ? acc(0) : q * (G - c);
    store_from(out + i, d);
  }
}

at::ScalarType acc_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> topk_route_cuda(const at::Tensor& logits, int64_t k, bool renormalize) {
  check_topk_route(logits, k);
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor weights = at::empty({T, k}, x.options().dtype(acc_dtype(x.scalar_type())));
  at::Tensor experts = at::empty({T, k}, x.options().dtype(at::kInt));
  if (T == 0) return {weights, experts};

  const int64_t blocks = ceil_div(T, kWarpsPerBlock);
  TORCH_CHECK(blocks <= INT_MAX, "logits has too many rows (", T, ") for one launch");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_route_cuda", [&] {
    topk_route_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), T, E, k, renormalize, weights.mutable_data_ptr<acc_t<scalar_t>>(),
        experts.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, experts};
}

at::Tensor topk_route_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& logits,
                                    const at::Tensor& experts, bool renormalize) {
  check_topk_route_backward(grad_weights, logits, experts);
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  const int64_t k = experts.size(1);

  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor ex = experts.contiguous();
  const at::Tensor g = grad_weights.to(acc_dtype(x.scalar_type())).contiguous();
  at::Tensor grad_logits = at::empty({T, E}, x.options());
  if (T == 0) return grad_logits;

  const int64_t blocks = ceil_div(T, kWarpsPerBlock);
  TORCH_CHECK(blocks <= INT_MAX, "logits has too many rows (", T, ") for one launch");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_route_backward_cuda", [&] {
    topk_route_backward_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        g.const_data_ptr<acc_t<scalar_t>>(), x.const_data_ptr<scalar_t>(), ex.const_data_ptr<int32_t>(), T, E, k,
        renormalize, grad_logits.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logits;
}

}  // namespace
}  // namespace h3fusion::cuda

TORCH_LIBRARY_IMPL(h3fusion, CUDA, m) {
  m.impl("topk_route", &h3fusion::cuda::topk_route_cuda);
  m.impl("topk_route_backward", &h3fusion::cuda::topk_route_backward_cuda);
}
