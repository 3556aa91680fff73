// Small device helpers shared by the CUDA kernels (routing, permutation, and whoever else wants them).
//
// Everything here is header-only, has no state, and is deterministic: warp reductions use a fixed xor
// butterfly (every lane ends with the bitwise-same value because IEEE addition is commutative, and we still
// broadcast lane 0's value so that no caller depends on that argument), block scans are on integers only.
#pragma once

#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace h3fusion::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ceil(a / b) for non-negative a and positive b, in 64 bits (grid sizes, chunk counts).
C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Accumulation type: fp64 for fp64 inputs, fp32 for everything else (fp32, bf16, fp16).
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

// Load any supported element type as its accumulation type, and store back (round to nearest).
template <typename acc, typename scalar_t>
__device__ __forceinline__ acc load_as(const scalar_t* p) {
  return static_cast<acc>(*p);
}
template <typename scalar_t, typename acc>
__device__ __forceinline__ void store_from(scalar_t* p, acc v) {
  *p = static_cast<scalar_t>(v);
}

// Warp-wide max / sum of one value per lane; the whole warp must call it (all 32 lanes active).
// The result is broadcast from lane 0, so all lanes hold exactly the same bits.
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(kFullMask, v, off);
    v = o > v ? o : v;
  }
  return __shfl_sync(kFullMask, v, 0);
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return __shfl_sync(kFullMask, v, 0);
}

// Exclusive prefix sum of one int64 per thread over the whole block, in thread order; *total gets the sum of
// all values. Integers only, so the result does not depend on the order of additions.
// Requirements: blockDim.x is a multiple of 32 and at most 1024; every thread of the block calls it (it contains
// __syncthreads). Safe to call repeatedly in a loop (it ends with a barrier before its scratch is reused).
__device__ inline int64_t block_exclusive_sum(int64_t v, int64_t* total) {
  __shared__ int64_t warp_sums[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  int64_t x = v;  // inclusive scan within the warp
#pragma unroll
  for (int off = 1; off < kWarpSize; off <<= 1) {
    const int64_t y = __shfl_up_sync(kFullMask, x, off);
    if (lane >= off) x += y;
  }
  if (lane == kWarpSize - 1) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {  // inclusive scan of the per-warp totals
    int64_t w = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < kWarpSize; off <<= 1) {
      const int64_t y = __shfl_up_sync(kFullMask, w, off);
      if (lane >= off) w += y;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  const int64_t before_warp = warp == 0 ? 0 : warp_sums[warp - 1];
  *total = warp_sums[nwarps - 1];
  const int64_t excl = before_warp + (x - v);
  __syncthreads();  // every thread has read warp_sums before a next call overwrites it
  return excl;
}

}  // namespace h3fusion::cuda
