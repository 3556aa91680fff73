// Device building blocks of the grouped expert GEMMs (included only by grouped_gemm_*.cu).
//
// One tile shape everywhere: a 128-thread block computes a 64 x 64 output tile, stepping the reduction 32 at a time.
// Operands are staged through shared memory as sA[m][kk] (BM x BK) and sB[n][kk] (BN x BK), both "reduction index
// contiguous", with zero fill for every out-of-range row, column or reduction index (M, N and K tails). The
// staging loops are plain element-wise loads with explicit bounds checks: simple and obviously correct rather
// than fast. The multiply is
//   * bf16 / fp16: nvcuda::wmma 16x16x16 fragments with fp32 accumulators, the 4 warps in a 2 x 2 grid, each warp
//     owning a 32 x 32 sub-tile (2 x 2 fragments);
//   * fp32: a SIMT loop (no TF32, so fp32 results are fp32-accurate), each thread owning an 8 x 4 sub-tile.
// Both write their accumulators to a shared fp32 tile sC[BM][BN] that the callers' epilogues read, so the
// epilogue code is the same for every dtype. Shared memory for operands and for sC is one buffer (the epilogue
// runs after the last barrier of the main loop).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "gated_activation.cuh"

namespace h3fusion::cuda::gemm {

constexpr int kBM = 64;        // output rows per block
constexpr int kBN = 64;        // output columns per block
constexpr int kBK = 32;        // reduction step
constexpr int kThreads = 128;  // 4 warps
constexpr int kLdc = kBN + 4;  // fp32 epilogue tile stride (a multiple of 4 floats, as wmma::store needs)

static_assert(kBM == 64 && kBN == 64 && kThreads == 128, "the warp and thread layouts below assume 64x64x128");
static_assert(kBK % 16 == 0, "WMMA steps the reduction 16 at a time");

// Staging stride (elements) of sA / sB rows: +8 keeps WMMA's 16-element alignment for 2-byte types;
// fp32 uses +1 so that the SIMT loop's column reads hit distinct banks.
template <typename T>
constexpr int staging_ld() {
  return std::is_same_v<T, float> ? kBK + 1 : kBK + 8;
}

// ---- element conversions (explicit intrinsics: no reliance on the CUDA_NO_HALF_* macros) ----------------------
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}


// ---- the multiply of one staged BK slice into the block's 64x64 accumulators -----------------------------------
// fp32: thread (tr = tid / 16, tc = tid % 16) owns rows tr + 8i (i < 8) and columns tc + 16j (j < 4).
struct SimtTile {
  float acc[8][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }

  __device__ __forceinline__ void step(const float* sA, const float* sB) {
    constexpr int ld = staging_ld<float>();
    const int tr = threadIdx.x / 16;
    const int tc = threadIdx.x % 16;
#pragma unroll 4
    for (int kk = 0; kk < kBK; ++kk) {
      float a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = sA[(tr + 8 * i) * ld + kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sB[(tc + 16 * j) * ld + kk];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* sC) const {
    const int tr = threadIdx.x / 16;
    const int tc = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sC[(tr + 8 * i) * kLdc + tc + 16 * j] = acc[i][j];
  }
};

// bf16 / fp16: warp w owns rows (w / 2) * 32 .. +32 and columns (w % 2) * 32 .. +32 as 2 x 2 16x16 fragments.
// sA is read as a row-major A (m, kk) and sB[n][kk] as a column-major B (kk, n), both with stride staging_ld<T>().
template <typename T>
struct WmmaTile {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ __forceinline__ void step(const T* sA, const T* sB) {
    namespace wmma = nvcuda::wmma;
    constexpr int ld = staging_ld<T>();
    const int warp = threadIdx.x / 32;
    const int wm = (warp / 2) * 32;
    const int wn = (warp % 2) * 32;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], sA + (wm + 16 * i) * ld + ks, ld);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], sB + (wn + 16 * j) * ld + ks, ld);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* sC) const {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32;
    const int wm = (warp / 2) * 32;
    const int wn = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(sC + (wm + 16 * i) * kLdc + wn + 16 * j, acc[i][j], kLdc, wmma::mem_row_major);
  }
};

template <typename T>
using Tile = std::conditional_t<std::is_same_v<T, float>, SimtTile, WmmaTile<T>>;

// Bytes of the one shared buffer: `n_b` staged B operands (2 for the fused gate/up GEMM) or `n_b` fp32 output
// tiles, whichever is larger. WMMA needs 32-byte aligned fragment pointers: every offset used is a multiple of it.
template <typename T>
constexpr int smem_bytes(int n_b) {
  const int staging = (kBM + n_b * kBN) * staging_ld<T>() * static_cast<int>(sizeof(T));
  const int epilogue = n_b * kBM * kLdc * static_cast<int>(sizeof(float));
  return staging > epilogue ? staging : epilogue;
}
static_assert(smem_bytes<float>(2) <= 48 * 1024 && smem_bytes<__half>(2) <= 48 * 1024, "static smem limit");
static_assert((kBM * staging_ld<__half>() * 2) % 32 == 0 && (kBM * kLdc * 4) % 32 == 0, "wmma pointer alignment");

// ---- the row-grouped GEMM (forward projections and the data gradients) ----------------------------------------
// out[r, n] = sum_i A[src(r), i] * B_e(i, n) for r in the rows of expert e; B_e is w + e * b_expert_stride and is
// stored [N, K] (kNK: a per-expert nn.Linear weight, out = A W^T) or [K, N] (!kNK: out = A W).
// kDual (kNK only): the fused gate/up projection; the grid covers n in [0, N) with N = F, the block computes both
// the gate column n (weight row n) and the up column (weight row N + n), writes both to h[R, 2N] and
// act[r, n] = act(gate) * up (from the values rounded to T, so that backward recomputes the same bits).
template <typename T>
struct RowGemmArgs {
  const T* a;                  // [a_num_rows, K]
  const int32_t* a_rows;       // nullable: src(r) = a_rows[r] / a_row_div, else src(r) = r
  int64_t a_row_div;           // k for token rows read through sorted_pairs
  int64_t a_num_rows;          // bounds check of src(r) (memory safety even for a bad plan)
  const T* b;                  // [E, ...] expert weights
  int64_t b_expert_stride;     // elements between experts
  const int64_t* offsets;      // [E+1]
  const int64_t* tile_starts;  // [E+1]
  int64_t num_experts;
  int64_t rows;                // R
  int64_t n;                   // N (F for kDual)
  int64_t k;                   // K
  void* out;                   // [R, N] of OutT (!kDual)
  T* h;                        // [R, 2N] (kDual)
  T* act;                      // [R, N] (kDual)
  Activation activation;       // the gate's activation (kDual)
};

// The expert of a tile: the largest e with tile_starts[e] <= tile (skips experts whose tile count is 0).
__device__ __forceinline__ int64_t expert_of_tile(const int64_t* tile_starts, int64_t num_experts, int64_t tile) {
  int64_t lo = 0, hi = num_experts - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tile_starts[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename T, typename OutT, bool kNK, bool kDual>
__global__ void __launch_bounds__(kThreads) row_gemm_kernel(const RowGemmArgs<T> p) {
  static_assert(kNK || !kDual, "the fused gate/up GEMM reads an nn.Linear-layout weight");
  constexpr int ld = staging_ld<T>();
  constexpr int n_b = kDual ? 2 : 1;
  __shared__ __align__(128) unsigned char smem[smem_bytes<T>(n_b)];
  __shared__ int64_t s_src[kBM];

  const int64_t tile = blockIdx.x;  // the grid is an upper bound on the tile count: extra blocks leave
  if (tile >= p.tile_starts[p.num_experts]) return;
  const int64_t e = expert_of_tile(p.tile_starts, p.num_experts, tile);
  const int64_t e_begin = p.offsets[e];
  const int64_t e_end = p.offsets[e + 1] < p.rows ? p.offsets[e + 1] : p.rows;
  const int64_t m0 = e_begin + (tile - p.tile_starts[e]) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int tid = threadIdx.x;

  for (int i = tid; i < kBM; i += kThreads) {
    const int64_t r = m0 + i;
    int64_t src = -1;
    if (r >= 0 && r < e_end) {
      // a negative index must not round to row 0 by the division: test it before dividing
      src = p.a_rows != nullptr ? static_cast<int64_t>(p.a_rows[r]) : r;
      src = src < 0 ? -1 : src / (p.a_rows != nullptr ? p.a_row_div : 1);
      if (src >= p.a_num_rows) src = -1;
    }
    s_src[i] = src;
  }
  __syncthreads();

  T* sA = reinterpret_cast<T*>(smem);
  T* sB = sA + kBM * ld;
  T* sB2 = sB + kBN * ld;  // up rows (kDual only)
  const T* b_e = p.b + e * p.b_expert_stride;
  const T zero = from_f32<T>(0.0f);

  Tile<T> acc0, acc1;
  acc0.zero();
  if constexpr (kDual) acc1.zero();

  for (int64_t k0 = 0; k0 < p.k; k0 += kBK) {
    for (int idx = tid; idx < kBM * kBK; idx += kThreads) {
      const int m = idx / kBK, kk = idx % kBK;
      const int64_t src = s_src[m];
      const int64_t kg = k0 + kk;
      sA[m * ld + kk] = (src >= 0 && kg < p.k) ? p.a[src * p.k + kg] : zero;
    }
    if constexpr (kNK) {
      for (int idx = tid; idx < kBN * kBK; idx += kThreads) {
        const int n = idx / kBK, kk = idx % kBK;
        const int64_t col = n0 + n, kg = k0 + kk;
        const bool ok = col < p.n && kg < p.k;
        sB[n * ld + kk] = ok ? b_e[col * p.k + kg] : zero;
        if constexpr (kDual) sB2[n * ld + kk] = ok ? b_e[(p.n + col) * p.k + kg] : zero;
      }
    } else {
      for (int idx = tid; idx < kBN * kBK; idx += kThreads) {
        const int kk = idx / kBN, n = idx % kBN;  // consecutive threads read consecutive columns
        const int64_t col = n0 + n, kg = k0 + kk;
        sB[n * ld + kk] = (col < p.n && kg < p.k) ? b_e[kg * p.n + col] : zero;
      }
    }
    __syncthreads();
    acc0.step(sA, sB);
    if constexpr (kDual) acc1.step(sA, sB2);
    __syncthreads();  // the next staging (or the epilogue's sC) overwrites sA/sB
  }

  float* sC = reinterpret_cast<float*>(smem);
  float* sC2 = sC + kBM * kLdc;
  acc0.store(sC);
  if constexpr (kDual) acc1.store(sC2);
  __syncthreads();

  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int m = idx / kBN, n = idx % kBN;
    const int64_t r = m0 + m, col = n0 + n;
    if (r < 0 || r >= e_end || col >= p.n) continue;
    if constexpr (kDual) {
      const T g = from_f32<T>(sC[m * kLdc + n]);
      const T u = from_f32<T>(sC2[m * kLdc + n]);
      p.h[r * 2 * p.n + col] = g;
      p.h[r * 2 * p.n + p.n + col] = u;
      p.act[r * p.n + col] = from_f32<T>(gated_act_f32(to_f32(g), p.activation) * to_f32(u));
    } else {
      static_cast<OutT*>(p.out)[r * p.n + col] = from_f32<OutT>(sC[m * kLdc + n]);
    }
  }
}

// ---- host helpers --------------------------------------------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the CUDA element type of `s`; fp64 and others get an error naming `what`.
template <typename F>
void dispatch_gemm_dtype(at::ScalarType s, const char* what, F&& f) {
  switch (s) {
    case at::kFloat:
      f(TypeTag<float>{});
      break;
    case at::kHalf:
      f(TypeTag<__half>{});
      break;
    case at::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK(false, what, " has dtype ", s,
                  ", which the CUDA grouped GEMM does not support (float32, bfloat16, float16; float64 runs on the "
                  "CPU only)");
  }
}

// Number of blocks along x for a row-grouped GEMM over `rows` rows and `num_experts` experts: an upper bound on
// sum_e ceil(count_e / kBM), which is at most ceil(rows / kBM) + num_experts - 1.
inline int64_t row_tiles_upper_bound(int64_t rows, int64_t num_experts) {
  return (rows + kBM - 1) / kBM + num_experts;
}

}  // namespace h3fusion::cuda::gemm
