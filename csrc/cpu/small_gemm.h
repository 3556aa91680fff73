// GEMMs with a handful of rows on one side, for experts that got few tokens (decode, or many experts): the three
// forms the expert FFN needs, in fp32 and bf16, each streaming the weight (or the weight gradient) once with fp32
// accumulation and one rounding per output.
//
//   linear_into     out[n, M] = a[n, K] @ w[M, K]^T     forward projections          (dot-product form)
//   matmul_into     out[n, M] = a[n, K] @ b[K, M]        U = dY W_down, dX = dH W_gu  (row-axpy form)
//   matmul_tn_into  out[M, K] = a[n, M]^T @ b[n, K]      weight gradients             (outer-product form)
//
// Why: BLAS (MKL, oneDNN for bf16) packs the whole weight matrix before it multiplies (and scales the output by
// beta = 0 first), which for 1-8 rows costs several times streaming the weight once, plus a fixed cost per call that a
// decode step with 64 experts pays hundreds of times; at 9-48 rows packing still costs about as much as multiplying.
// Up to kSmallGemmMaxRows rows the memory-bound kernels below run (fp32, bf16); up to kMidGemmMaxRows, fp32 tiles
// (mid_nt, mid_nn, mid_tn where the CPU has AVX-512, narrow_tiles.h's broadcast tiles where it has AVX2 only) and
// bf16 VDPBF16PS tiles (bf16_tiles.h, where the CPU has them). Above that, for fp16/fp64, or for strided layouts,
// each function calls at::mm_out (bf16 widened to fp32 on CPUs without bf16 dot products), except fp32 linear_into on
// AVX2-only and AMD CPUs, whose larger GEMMs run on the narrow tile with the threads splitting the weight (large_nt).
// The choice depends on the shape and the CPU only, never on the thread count, so results are bitwise the same at any
// number of threads. The other kernels are single-threaded: they run inside a thread's group of experts, or on
// experts too small for threads to pay. The vector-extension kernels are compiled for three ISA levels and run at the CPU's vector width (row_passes.h:
// Vec); narrow_tiles.h's for AVX2 + FMA only.
#pragma once

#include "bf16_tiles.h"
#include "narrow_tiles.h"
#include "row_passes.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <cstdint>
#include <vector>

namespace h3fusion::cpu {
namespace {

constexpr int64_t kSmallGemmMaxRows = 8;
// Up to this many rows the tiles beat BLAS (T256 E64 k8, 32 rows an expert, 2 threads, A/B medians: fp32 forward
// 21 -> 15 ms with mid_nt; fp32 fwd+bwd 60.5 -> 43.4 ms with mid_tn and mid_nn; bf16 fwd+bwd with the VDPBF16PS
// tiles instead of oneDNN 41 -> 28 ms, then 26 -> 23 ms with bf16_tiles.h's packed-rows a.w^T and permute repacks).
// At 64 rows and K 1024 MKL is as fast or faster.
constexpr int64_t kMidGemmMaxRows = 48;

// ---- dot-product form: out[r, j] = a[r, :] . w[j, :] --------------------------------------------------------------
// Tiles of NB rows of a against 4 rows of w, 4*NB accumulator vectors (at most L: half the register file), so every
// vector loaded feeds NB or 4 FMAs, and even a single row of a keeps 4 independent FMA chains in flight (one chain
// per output waited on the FMA latency: at decode sizes on AVX2 a third of small_nt's samples sat on that wait).
// Weight rows are outermost: a tile of 4 weight rows stays in L1 while every row block of a passes it, and the 4
// weight streams are prefetched. Few rows (<= kSmallGemmMaxRows; memory-bound; those stream_dot_takes leaves to the
// tiles) run at the CPU's width; 9-48 rows (fp32, AVX-512 CPUs; compute-bound) at 16 lanes. Lane l
// of an accumulator sums the elements i = l (mod L); the accumulators are folded into one vector (lane q =
// accumulator q) by a tree of shuffles that adds lanes in a fixed order (lane l + L/2 into l, then + L/4, ..., + 1),
// and the scalar tail over K comes last.
constexpr int kTileW = 4;

// out[r, m] for r < NB, m < mb (<= 4) of the tile at a, w; rows of w past mb repeat row mb - 1 (their sums are
// dropped), so the tail tile needs no other code path.
template <int NB, int L, typename scalar_t>
H3F_INLINE void dot_tile(const scalar_t* __restrict__ a, int64_t lda, const scalar_t* __restrict__ w, int64_t mb,
                         int64_t K, scalar_t* out, int64_t ldo) {
  static_assert(NB * kTileW <= L);
  using V = typename Vec<L>::f;
  const scalar_t* wr[kTileW];
  for (int m = 0; m < kTileW; ++m) wr[m] = w + std::min<int64_t>(m, mb - 1) * K;
  V acc[L] = {};
  int64_t i = 0;
  for (; i + L <= K; i += L) {
    V av[NB];
    for (int r = 0; r < NB; ++r) av[r] = vload<L>(a + r * lda + i);
    for (int m = 0; m < kTileW; ++m) {
      __builtin_prefetch(reinterpret_cast<const char*>(wr[m] + i) + kPrefetchBytes, 0, 0);
      const V wv = vload<L>(wr[m] + i);
      for (int r = 0; r < NB; ++r) acc[r * kTileW + m] += av[r] * wv;
    }
  }
  const V sums = fold_lanes(acc);
  float s[L];
  std::memcpy(s, &sums, sizeof(s));
  for (int r = 0; r < NB; ++r)
    for (int m = 0; m < mb; ++m) {
      float sum = s[r * kTileW + m];
      for (int64_t t = i; t < K; ++t) sum += float(a[r * lda + t]) * float(wr[m][t]);
      out[r * ldo + m] = scalar_t(sum);
    }
}

template <int L, typename scalar_t>
H3F_INLINE void dot_tiles(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* w, int64_t M, int64_t K,
                          scalar_t* out, int64_t ldo) {
  constexpr int kRows = L / kTileW;  // 4 at 16 lanes, 2 at 8, 1 at 4
  for (int64_t j = 0; j < M; j += kTileW) {
    const scalar_t* wj = w + j * K;
    const int64_t mb = std::min<int64_t>(kTileW, M - j);
    int64_t r = 0;
    for (; r + kRows <= n; r += kRows) dot_tile<kRows, L>(a + r * lda, lda, wj, mb, K, out + r * ldo + j, ldo);
    if constexpr (kRows >= 4)
      for (; r + 2 <= n; r += 2) dot_tile<2, L>(a + r * lda, lda, wj, mb, K, out + r * ldo + j, ldo);
    for (; r < n; ++r) dot_tile<1, L>(a + r * lda, lda, wj, mb, K, out + r * ldo + j, ldo);
  }
}

// bf16 at decode sizes on narrow vectors (AVX2): the rows of a are widened to fp32 once, then each weight row is read
// front to back, widened once and multiplied into every row of a (from L1), one prefetch per cache line. The tiles
// above widen each weight vector once per block of kRows rows of a (2 at 8 lanes) and each vector of a once per tile
// of 4 weight rows, and at 8 lanes that widening, not the memory, set their speed. Measured in a C++ harness
// (few_rows_ffn on 7 experts' cold bf16 weights, H512 F1408, 2 threads, AVX2 EPYC, medians of 200-300 interleaved
// calls): 1 row an expert 3.06 -> 2.29-2.44 ms, 2 rows 3.23-3.68 -> 2.69-2.92 ms, 6 rows 8.2-10.1 -> 4.5-6.1 ms;
// then the folded row sums and the prefetch into L2 below, 1 row an expert: 2.02-2.11 -> 1.85-1.94 ms (3 rounds of
// 400). fp32 (nothing to widen) measured the same either way with one stream; with 16 lanes both dtypes stream their
// fewest rows too (stream_dot_takes says where, and the measurements).
// Each row of w ends as one vector per row of a; every L of them are folded together (fold_lanes: a fixed tree), so an
// output's sum has the same order at any thread count, and a row costs no horizontal sum of its own.
//
// out[s][r, j] = a[r, :] . w[s][j, :] for NB rows of a (fp32, widened) against M consecutive rows (stride K) of each
// of S weights, read in lockstep: S streams in flight per thread, which this machine's memory rewards (a plain read of
// 30 MB split into 4 streams per thread ran at torch.sum's rate, 15-20% above one stream; the T4 forward with gate
// and up, and two halves of down, read as pairs: 2.53-2.84 -> 2.11-2.35 ms in the harness above). Every output is
// summed the same way whatever S: lanes of line-vector q go to accumulator q % NA, the accumulators add in order.
template <int NB, int S, int L, typename scalar_t>
H3F_INLINE void stream_dot_rows(const float* __restrict__ a, int64_t lda, const scalar_t* const* w, int64_t M,
                                int64_t K, scalar_t* const* out, int64_t ldo) {
  using V = typename Vec<L>::f;
  constexpr int64_t kLine = 64 / sizeof(scalar_t);  // elements of one cache line of w
  constexpr int kLineVecs = int(kLine / L);
  // FMA chains per row of a: a single row needs several to keep the FMA latency off the memory's path; with more rows
  // their own chains do, and the accumulators (NB * NA <= 8 a stream) leave registers for the weight vectors.
  constexpr int NA = NB == 1 ? 4 : NB <= 4 ? 2 : 1;
  constexpr int kStepVecs = kLineVecs > NA ? kLineVecs : NA;  // whole lines, whole rounds of the accumulators
  constexpr int64_t kStep = kStepVecs * L;
  const int64_t k_lines = K - K % kStep, k_vecs = K - K % L;
  for (int64_t j0 = 0; j0 < M; j0 += L) {
    const int64_t rows = std::min<int64_t>(L, M - j0);
    V row_sums[S][NB][L] = {};  // [s][r][j - j0]: the lanes of out[s][r, j]
    for (int64_t jj = 0; jj < rows; ++jj) {
      const scalar_t* wj[S];
      for (int st = 0; st < S; ++st) wj[st] = w[st] + (j0 + jj) * K;
      V acc[S][NB][NA] = {};
      int64_t i = 0;
      for (; i < k_lines; i += kStep)
        for (int st = 0; st < S; ++st) {
          // into L2 as well as L1 (locality 2, not the tiles' non-temporal 0): 6-9% faster in the harness above
          for (int64_t l = 0; l < kStep; l += kLine)
            __builtin_prefetch(reinterpret_cast<const char*>(wj[st] + i + l) + kPrefetchBytes, 0, 2);
          for (int q = 0; q < kStepVecs; ++q) {
            const V wv = vload<L>(wj[st] + i + q * L);
            for (int r = 0; r < NB; ++r) acc[st][r][q % NA] += vload<L>(a + r * lda + i + q * L) * wv;
          }
        }
      for (; i < k_vecs; i += L)
        for (int st = 0; st < S; ++st) {
          const V wv = vload<L>(wj[st] + i);
          for (int r = 0; r < NB; ++r) acc[st][r][0] += vload<L>(a + r * lda + i) * wv;
        }
      for (int st = 0; st < S; ++st)
        for (int r = 0; r < NB; ++r) {
          V v = acc[st][r][0];
          for (int c = 1; c < NA; ++c) v += acc[st][r][c];
          row_sums[st][r][jj] = v;
        }
    }
    for (int st = 0; st < S; ++st)
      for (int r = 0; r < NB; ++r) {
        const V sums = fold_lanes(row_sums[st][r]);
        float sv[L];
        std::memcpy(sv, &sums, sizeof(sv));
        for (int64_t jj = 0; jj < rows; ++jj) {
          const scalar_t* wj = w[st] + (j0 + jj) * K;
          float sum = sv[jj];
          for (int64_t t = k_vecs; t < K; ++t) sum += a[r * lda + t] * float(wj[t]);
          out[st][r * ldo + j0 + jj] = scalar_t(sum);
        }
      }
  }
}

// out[s][n, M] = a[n, K] @ w[s][M, K]^T for s < S (1 or 2), fp32 sums rounded once to scalar_t, for the n that
// stream_dot_takes; each w[s]'s rows are consecutive (stride K). Pairs run in lockstep up to 2 rows of a (more would
// spill the accumulators), one weight after the other above.
template <int L, int S, typename scalar_t>
H3F_INLINE void stream_dot(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* const* w, int64_t M,
                           int64_t K, scalar_t* const* out, int64_t ldo) {
  // The widened rows of a: n * K floats a thread (at most 8 rows), kept between calls so a decode step allocates none.
  static thread_local std::vector<float> widened;
  if (widened.size() < static_cast<size_t>(n * K)) widened.resize(n * K);
  float* af = widened.data();
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < K; ++i) af[r * K + i] = float(a[r * lda + i]);
  if constexpr (S == 2) {
    if (n == 1) return stream_dot_rows<1, 2, L>(af, K, w, M, K, out, ldo);
    if (n == 2) return stream_dot_rows<2, 2, L>(af, K, w, M, K, out, ldo);
  }
  for (int st = 0; st < S; ++st) {
    const scalar_t* const ws[1] = {w[st]};
    scalar_t* const os[1] = {out[st]};
    switch (n) {
      case 1: stream_dot_rows<1, 1, L>(af, K, ws, M, K, os, ldo); break;
      case 2: stream_dot_rows<2, 1, L>(af, K, ws, M, K, os, ldo); break;
      case 3: stream_dot_rows<3, 1, L>(af, K, ws, M, K, os, ldo); break;
      case 4: stream_dot_rows<4, 1, L>(af, K, ws, M, K, os, ldo); break;
      case 5: stream_dot_rows<5, 1, L>(af, K, ws, M, K, os, ldo); break;
      case 6: stream_dot_rows<6, 1, L>(af, K, ws, M, K, os, ldo); break;
      case 7: stream_dot_rows<7, 1, L>(af, K, ws, M, K, os, ldo); break;
      case 8: stream_dot_rows<8, 1, L>(af, K, ws, M, K, os, ldo); break;
      default: TORCH_INTERNAL_ASSERT(false, "stream_dot takes 1-", kSmallGemmMaxRows, " rows, got ", n);
    }
  }
}
static_assert(kSmallGemmMaxRows == 8, "stream_dot's cases cover 1-8 rows");

// Which (dtype, rows) take stream_dot. Narrow vectors: bf16 1-8 rows; fp32 (nothing to widen) 1-2 rows, where its
// pairs beat the tiles (harness, T4 k2 E8 forward: 2.53-2.63 -> 2.28-2.39 ms; 2 rows an expert 2.72 -> 2.22 ms);
// with 4-6 rows one stream ran 7-9% behind the tiles, so they keep them. 16-lane vectors (AVX-512; Zen 4 EPYC, 2
// threads, few_rows_ffn forward at H512 F1408 E8 k2 with n rows an expert, medians of 300 calls, two rounds): bf16
// 1-3 rows 1.12 -> 0.95, 1.88 -> 1.21, 2.13-2.45 -> 1.46-1.56 ms, while at 4 and 8 rows the 4-row tile (one widened
// weight vector feeds 4 rows) stayed 5-9% ahead; fp32 1-6 rows 3.1-3.5 -> 2.2-2.5 ms (1 row), 3.5-3.7 -> 1.8-2.5
// (4), 3.5-4.0 -> 3.3-3.5 (6), 8 rows either way. small_nt and small_nt_pair choose alike, so a pair has the bits
// of two single calls; the choice depends on the CPU and n only.
template <typename scalar_t>
H3F_INLINE bool stream_dot_takes(int64_t n) {
  if (n < 1) return false;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return n <= (wide_vectors() ? 3 : kSmallGemmMaxRows);
  if constexpr (std::is_same_v<scalar_t, float>) return n <= (wide_vectors() ? 6 : 2);
  return false;
}

// stream_dot at the CPU's width (row_passes.h: wide_vectors).
template <int S, typename scalar_t>
H3F_INLINE void stream_dot_any(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* const* w, int64_t M,
                               int64_t K, scalar_t* const* out, int64_t ldo) {
  if (wide_vectors()) return stream_dot<kWideLanes, S>(a, lda, n, w, M, K, out, ldo);
  stream_dot<kNarrowLanes, S>(a, lda, n, w, M, K, out, ldo);
}

template <typename scalar_t>
H3F_ROW_FN void small_nt(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* w, int64_t M, int64_t K,
                         scalar_t* out, int64_t ldo) {
  if (stream_dot_takes<scalar_t>(n)) {
    const scalar_t* const ws[1] = {w};
    scalar_t* const os[1] = {out};
    return stream_dot_any<1>(a, lda, n, ws, M, K, os, ldo);
  }
  H3F_BY_LANES(dot_tiles, (a, lda, n, w, M, K, out, ldo), scalar_t);
}

// small_nt twice, out0 = a @ w0^T and out1 = a @ w1^T (M rows each): the same bits, with the two weights read in
// lockstep where that pays (stream_dot).
template <typename scalar_t>
H3F_ROW_FN void small_nt_pair(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* w0, const scalar_t* w1,
                              int64_t M, int64_t K, scalar_t* out0, scalar_t* out1, int64_t ldo) {
  if (stream_dot_takes<scalar_t>(n)) {
    const scalar_t* const ws[2] = {w0, w1};
    scalar_t* const os[2] = {out0, out1};
    return stream_dot_any<2>(a, lda, n, ws, M, K, os, ldo);
  }
  small_nt(a, lda, n, w0, M, K, out0, ldo);
  small_nt(a, lda, n, w1, M, K, out1, ldo);
}

H3F_ROW_FN void mid_nt(const float* a, int64_t lda, int64_t n, const float* w, int64_t M, int64_t K, float* out,
                       int64_t ldo) {
  dot_tiles<kWideLanes>(a, lda, n, w, M, K, out, ldo);  // AVX-512 CPUs only (small_gemm_path)
}

// ---- row-axpy form: out[r, :] = sum_i a[r, i] * b[i, :] --------------------------------------------------------
// A block of NC vectors of output columns for all NB rows stays in registers while b's rows stream past; every
// output element sums i in ascending order. The block walks down b's rows, so each row of b is read in runs of
// NC vectors: fewer rows leave registers for wider runs (8 vectors of 16 lanes: 256-512 contiguous bytes), and the
// runs of the row kStripPrefetchRows ahead are prefetched. Blocks hold at most 16 accumulators with AVX-512 (half its
// registers) and 8 with narrower vectors.
template <int NB, int L>
constexpr int kAxpyBlock = std::max(1, (NB <= 2 ? 8 : NB <= 4 ? 4 : 2) * L / kWideLanes);

template <int NB, int NC, int L, typename scalar_t>
H3F_INLINE void axpy_block(const scalar_t* __restrict__ a, int64_t lda, const scalar_t* __restrict__ b, int64_t ldb,
                           int64_t K, scalar_t* out, int64_t ldo) {
  using V = typename Vec<L>::f;
  constexpr int64_t kLineElems = 64 / sizeof(scalar_t);
  V acc[NB][NC] = {};
  for (int64_t i = 0; i < K; ++i) {
    const scalar_t* ahead = b + (i + kStripPrefetchRows) * ldb;
    for (int64_t e = 0; e < NC * L; e += kLineElems) __builtin_prefetch(ahead + e, 0, 3);
    V bv[NC];
    for (int c = 0; c < NC; ++c) bv[c] = vload<L>(b + i * ldb + c * L);
    for (int r = 0; r < NB; ++r) {
      const float s = float(a[r * lda + i]);
      for (int c = 0; c < NC; ++c) acc[r][c] += s * bv[c];
    }
  }
  for (int r = 0; r < NB; ++r)
    for (int c = 0; c < NC; ++c) vstore(out + r * ldo + c * L, acc[r][c]);
}

template <int NB, int L, typename scalar_t>
H3F_INLINE void axpy_rows(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, int64_t K, int64_t M,
                          scalar_t* out, int64_t ldo) {
  constexpr int NC = kAxpyBlock<NB, L>;
  int64_t j = 0;
  for (; j + NC * L <= M; j += NC * L) axpy_block<NB, NC, L>(a, lda, b + j, ldb, K, out + j, ldo);
  for (; j + L <= M; j += L) axpy_block<NB, 1, L>(a, lda, b + j, ldb, K, out + j, ldo);
  for (; j < M; ++j)
    for (int r = 0; r < NB; ++r) {
      float sum = 0.0f;
      for (int64_t i = 0; i < K; ++i) sum += float(a[r * lda + i]) * float(b[i * ldb + j]);
      out[r * ldo + j] = scalar_t(sum);
    }
}

// One or two rows (decode): b is read row after row in runs of kStreamCols columns, the fp32 sums of the run kept in
// L1 (at most 2 x 8 KiB), so each run of b is contiguous (a page of bf16) and the prefetchers follow it. Each output
// element still sums i in ascending order: the same bits as axpy_rows.
constexpr int64_t kStreamCols = 2048;

template <int NB, int L, typename scalar_t>
H3F_INLINE void axpy_stream(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, int64_t K, int64_t M,
                            scalar_t* out, int64_t ldo) {
  using V = typename Vec<L>::f;
  alignas(64) float acc[NB][kStreamCols];
  for (int64_t j0 = 0; j0 < M; j0 += kStreamCols) {
    const int64_t cols = std::min<int64_t>(kStreamCols, M - j0), vec_cols = cols - cols % L;
    for (int r = 0; r < NB; ++r) std::fill(acc[r], acc[r] + cols, 0.0f);
    for (int64_t i = 0; i < K; ++i) {
      const scalar_t* bi = b + i * ldb + j0;
      float s[NB];
      for (int r = 0; r < NB; ++r) s[r] = float(a[r * lda + i]);
      for (int64_t c = 0; c < vec_cols; c += L) {
        const V bv = vload<L>(bi + c);
        for (int r = 0; r < NB; ++r) {
          V v;
          std::memcpy(&v, acc[r] + c, sizeof(v));
          v += s[r] * bv;
          std::memcpy(acc[r] + c, &v, sizeof(v));
        }
      }
      for (int64_t c = vec_cols; c < cols; ++c)
        for (int r = 0; r < NB; ++r) acc[r][c] += s[r] * float(bi[c]);
    }
    for (int r = 0; r < NB; ++r) {
      int64_t c = 0;
      for (; c < vec_cols; c += L) {
        V v;
        std::memcpy(&v, acc[r] + c, sizeof(v));
        vstore(out + r * ldo + j0 + c, v);
      }
      for (; c < cols; ++c) out[r * ldo + j0 + c] = scalar_t(acc[r][c]);
    }
  }
}

template <int L, typename scalar_t>
H3F_INLINE void small_nn_l(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* b, int64_t ldb, int64_t K,
                           int64_t M, scalar_t* out, int64_t ldo) {
  // Up to 8 rows in one pass over b.
  switch (n) {
    case 8: return axpy_rows<8, L>(a, lda, b, ldb, K, M, out, ldo);
    case 7: return axpy_rows<7, L>(a, lda, b, ldb, K, M, out, ldo);
    case 6: return axpy_rows<6, L>(a, lda, b, ldb, K, M, out, ldo);
    case 5: return axpy_rows<5, L>(a, lda, b, ldb, K, M, out, ldo);
    case 4: return axpy_rows<4, L>(a, lda, b, ldb, K, M, out, ldo);
    case 3: return axpy_rows<3, L>(a, lda, b, ldb, K, M, out, ldo);
    case 2: return axpy_stream<2, L>(a, lda, b, ldb, K, M, out, ldo);
    case 1: return axpy_stream<1, L>(a, lda, b, ldb, K, M, out, ldo);
    default: return;
  }
}
template <typename scalar_t>
H3F_ROW_FN void small_nn(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* b, int64_t ldb, int64_t K,
                         int64_t M, scalar_t* out, int64_t ldo) {
  H3F_BY_LANES(small_nn_l, (a, lda, n, b, ldb, K, M, out, ldo), scalar_t);
}

// More rows (fp32, up to kMidGemmMaxRows, AVX-512 CPUs): axpy_block tiles of 4 rows x 4 vectors (64 columns), 16
// accumulators, strips outermost so that b's strip stays in L2 for the next row tile. No packing of b and no beta
// pass over the output, which BLAS spends as much time on as multiplying at these sizes.

template <int NC, int L>
H3F_INLINE void nn_strip(const float* a, int64_t lda, int64_t n, const float* b, int64_t ldb, int64_t K, float* out,
                         int64_t ldo) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) axpy_block<4, NC, L>(a + r * lda, lda, b, ldb, K, out + r * ldo, ldo);
  for (; r + 2 <= n; r += 2) axpy_block<2, NC, L>(a + r * lda, lda, b, ldb, K, out + r * ldo, ldo);
  for (; r < n; ++r) axpy_block<1, NC, L>(a + r * lda, lda, b, ldb, K, out + r * ldo, ldo);
}

H3F_ROW_FN void mid_nn(const float* a, int64_t lda, int64_t n, const float* b, int64_t ldb, int64_t K, int64_t M,
                       float* out, int64_t ldo) {
  constexpr int L = kWideLanes;  // AVX-512 CPUs only (small_gemm_path)
  int64_t j = 0;
  for (; j + 4 * L <= M; j += 4 * L) nn_strip<4, L>(a, lda, n, b + j, ldb, K, out + j, ldo);
  for (; j + L <= M; j += L) nn_strip<1, L>(a, lda, n, b + j, ldb, K, out + j, ldo);
  for (; j < M; ++j)
    for (int64_t r = 0; r < n; ++r) {
      float sum = 0.0f;
      for (int64_t i = 0; i < K; ++i) sum += a[r * lda + i] * b[i * ldb + j];
      out[r * ldo + j] = sum;
    }
}

// ---- outer-product form: out[j, :] = sum_r a[r, j] * b[r, :] -----------------------------------------------------
// The n rows of b stay in L1 while the output (a weight gradient) is written once, row by row; every element sums r
// in ascending order. Writing the output is all the memory traffic there is, so with `stream` (the output is the
// gradient itself, 16-byte aligned rows) it goes out with non-temporal stores, which do not read each line first:
// T4 H512 F1408 E8 k2 fwd+bwd, 2 threads, AVX2, medians of 21 interleaved calls: fp32 9.58 -> 8.55 ms, bf16
// 7.72 -> 7.10 ms; T16 H512 F256 E64 k8 fp32 17.2 -> 15.1 ms.
template <int L, typename scalar_t>
H3F_INLINE void small_tn_l(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* b, int64_t ldb, int64_t M,
                           int64_t K, scalar_t* out, int64_t ldo, bool stream) {
  float s[kSmallGemmMaxRows];
  for (int64_t j = 0; j < M; ++j) {
    for (int64_t r = 0; r < n; ++r) s[r] = float(a[r * lda + j]);
    scalar_t* oj = out + j * ldo;
    int64_t c = 0;
    for (; c + L <= K; c += L) {
      typename Vec<L>::f acc{};
      for (int64_t r = 0; r < n; ++r) acc += s[r] * vload<L>(b + r * ldb + c);
      vstore_out(oj + c, acc, stream);
    }
    for (; c < K; ++c) {
      float sum = 0.0f;
      for (int64_t r = 0; r < n; ++r) sum += s[r] * float(b[r * ldb + c]);
      oj[c] = scalar_t(sum);
    }
  }
  if (stream) stream_fence();
}
template <typename scalar_t>
H3F_ROW_FN void small_tn(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* b, int64_t ldb, int64_t M,
                         int64_t K, scalar_t* out, int64_t ldo, bool stream) {
  H3F_BY_LANES(small_tn_l, (a, lda, n, b, ldb, M, K, out, ldo, stream), scalar_t);
}

// More rows (fp32, up to kMidGemmMaxRows, AVX-512 CPUs): tiles of 4 output rows x NV vectors of columns, 4*NV
// accumulators, each row of b's strip loaded once per tile and fed to 4 FMAs. The output is written once: BLAS at
// these sizes first scales the whole output by beta = 0 and packs b (measured: mscale + scopy were a third of MKL's
// time in a T256 E64 fp32 backward). Every element sums r in ascending order, as small_tn. With `stream`, as in
// small_tn, the tiles go out with non-temporal stores: T256 H512 F256 E64 k8 fp32 fwd+bwd (100 MB of weight
// gradients a call), Zen 4 EPYC, 2 threads, medians of 41 calls interleaved in one process: 39.7 -> 34.9 ms (AVX2's
// tile_tn keeps ordinary stores, which won on Zen 1: narrow_tiles.h).
template <int NV, int L>
H3F_INLINE void tn_tile(const float* const* ar, int64_t lda, int64_t n, const float* __restrict__ b, int64_t ldb,
                        int64_t mb, float* out, int64_t ldo, bool stream) {
  using V = typename Vec<L>::f;
  V acc[kTileW][NV] = {};
  for (int64_t r = 0; r < n; ++r) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload<L>(b + r * ldb + v * L);
    for (int m = 0; m < kTileW; ++m) {
      const float s = ar[m][r * lda];
      for (int v = 0; v < NV; ++v) acc[m][v] += s * bv[v];
    }
  }
  for (int m = 0; m < kTileW; ++m)
    if (m < mb)
      for (int v = 0; v < NV; ++v) vstore_out(out + m * ldo + v * L, acc[m][v], stream);
}

H3F_ROW_FN void mid_tn(const float* a, int64_t lda, int64_t n, const float* b, int64_t ldb, int64_t M, int64_t K,
                       float* out, int64_t ldo, bool stream) {
  constexpr int L = kWideLanes, kVecs = 4;  // AVX-512 CPUs only (small_gemm_path)
  for (int64_t j = 0; j < M; j += kTileW) {
    const int64_t mb = std::min<int64_t>(kTileW, M - j);
    const float* ar[kTileW];  // rows past mb repeat row mb - 1; their sums are not stored
    for (int m = 0; m < kTileW; ++m) ar[m] = a + j + std::min<int64_t>(m, mb - 1);
    float* oj = out + j * ldo;
    int64_t c = 0;
    for (; c + kVecs * L <= K; c += kVecs * L) tn_tile<kVecs, L>(ar, lda, n, b + c, ldb, mb, oj + c, ldo, stream);
    for (; c + L <= K; c += L) tn_tile<1, L>(ar, lda, n, b + c, ldb, mb, oj + c, ldo, stream);
    for (; c < K; ++c)
      for (int64_t m = 0; m < mb; ++m) {
        float sum = 0.0f;
        for (int64_t r = 0; r < n; ++r) sum += ar[m][r * lda] * b[r * ldb + c];
        oj[m * ldo + c] = sum;
      }
  }
  if (stream) stream_fence();
}

// True when our kernels may take this GEMM: at most kMidGemmMaxRows rows, fp32 or bf16, unit stride along the inner
// dimension of every operand (rows may be strided, as the activation written over the gate half of the
// pre-activation is).
H3F_INLINE bool small_gemm_applies(int64_t rows, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto dt = a.scalar_type();
  return rows <= kMidGemmMaxRows && (dt == at::kFloat || dt == at::kBFloat16) && b.scalar_type() == dt &&
         out.scalar_type() == dt && a.stride(1) == 1 && b.stride(1) == 1 && out.stride(1) == 1;
}

// Which kernels take a GEMM, the same ladder for all three forms: few rows (either dtype), fp32 tiles where the CPU
// has AVX-512 (dot-product tiles) or AVX2 (narrow_tiles.h: the dot-product tiles hold half their accumulators in
// AVX2's 16 registers, and MKL beat them), bf16 tiles where it has VDPBF16PS, else BLAS. Decided by the shape and the
// CPU only.
enum class SmallGemm { kBlas, kFewRows, kTilesFp32, kTilesFp32Narrow, kTilesBf16 };

H3F_INLINE SmallGemm small_gemm_path(int64_t rows, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!small_gemm_applies(rows, out, a, b)) return SmallGemm::kBlas;
  if (rows <= kSmallGemmMaxRows) return SmallGemm::kFewRows;
  if (a.scalar_type() == at::kFloat) {
    if (wide_vectors()) return SmallGemm::kTilesFp32;
    return narrow_tiles_available() ? SmallGemm::kTilesFp32Narrow : SmallGemm::kBlas;
  }
  return bf16_tiles_available() ? SmallGemm::kTilesBf16 : SmallGemm::kBlas;
}

// bf16 GEMMs above the few-rows kernels (which widen as they load) on CPUs without bf16 dot products: both operands
// widened to fp32 once, the fp32 path (tiles or sgemm), the output rounded to bf16 once, as a bf16 GEMM rounds its
// fp32 sums. Decided by the shape and the CPU only.
H3F_INLINE bool bf16_widened(at::ScalarType dtype) { return dtype == at::kBFloat16 && !cpu_has_bf16_dot(); }
H3F_INLINE bool widen_bf16_gemm(int64_t rows, const at::Tensor& a) {
  return rows > kSmallGemmMaxRows && bf16_widened(a.scalar_type());
}

template <typename Gemm>
void widened_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const Gemm& gemm) {
  at::Tensor out32 = at::empty(out.sizes(), out.options().dtype(at::kFloat));
  gemm(out32, a.to(at::kFloat), b.to(at::kFloat));
  const_cast<at::Tensor&>(out).copy_(out32);
}

// The forward projections (linear_into) widen the weight kWidenedChunkRows rows at a time, each chunk's output columns
// a GEMM of their own: the fp32 copies then stay small beside the forward's scratch (a whole widened [2F, H] weight
// was 6 MB at H512 F1408, and a forward without autograd peaked at twice the eager loop's memory).
constexpr int64_t kWidenedChunkRows = 128;

template <typename Gemm>
void widened_linear(const at::Tensor& out, const at::Tensor& a, const at::Tensor& w, const Gemm& gemm) {
  const at::Tensor a32 = a.to(at::kFloat);
  for (int64_t j = 0; j < w.size(0); j += kWidenedChunkRows) {
    const int64_t m = std::min(kWidenedChunkRows, w.size(0) - j);
    at::Tensor out32 = at::empty({a.size(0), m}, out.options().dtype(at::kFloat));
    gemm(out32, a32, w.narrow(0, j, m).to(at::kFloat));
    out.narrow(1, j, m).copy_(out32);
  }
}

// Each GEMM these kernels take shows in the profiler as one "h3fusion::small_gemm" event, as a BLAS one shows as
// aten::mm (tests count GEMMs that way to check that unneeded gradients cost none).
#define H3F_RECORD_SMALL_GEMM() RECORD_FUNCTION("h3fusion::small_gemm", c10::ArrayRef<const c10::IValue>{})

// fn(scalar_t{}) for fp32 or bf16 (the dtypes small_gemm_applies admits).
template <typename Fn>
H3F_INLINE void dispatch_small(at::ScalarType dt, const Fn& fn) {
  if (dt == at::kFloat) {
    fn(float{});
  } else {
    fn(c10::BFloat16{});
  }
}

#if H3F_HAVE_BF16_TILES
H3F_INLINE const bf16_bits* bits(const at::Tensor& t) {
  return reinterpret_cast<const bf16_bits*>(t.const_data_ptr<c10::BFloat16>());
}
H3F_INLINE bf16_bits* mutable_bits(const at::Tensor& t) {
  return reinterpret_cast<bf16_bits*>(t.mutable_data_ptr<c10::BFloat16>());
}
#define H3F_BF16_TILES_CALL(call) call
#else  // small_gemm_path never picks the bf16 tiles without them
#define H3F_BF16_TILES_CALL(call) TORCH_INTERNAL_ASSERT(false, "bf16 tiles are not built")
#endif

// fp32 a.w^T above kMidGemmMaxRows rows on AVX2 CPUs (the few-large-experts forward: 512-1024 rows an expert at E8
// k2), and on AMD CPUs with AVX-512 (large_nt_cpu), runs on the narrow tile too, which beats MKL's sgemm there: one
// thread, [512, 512] x [2816, 512]^T 36.4 against 32.5 GFLOP/s, [512, 1408] x [512, 1408]^T 36.7 against 35.1,
// [1024, 1024] x [5632, 1024]^T 37.0 against 33.6 (AVX2 EPYC, medians of 5-9). The threads split w's rows (whole tiles of kTileRows), so each reads only its
// share of the weight and none waits on another; each walks a's rows kLargeNtChunkRows at a time, whose lane-major
// copy (tile_nt) then stays in L2. Every output element is one lane's sum in K order whichever thread computes it,
// and the row chunks are fixed, so the result depends on the shape only.
constexpr int64_t kLargeNtChunkRows = 128;

// Which CPUs: those without AVX-512, and AMD CPUs with it, where MKL's sgemm ran no faster than on AVX2 and the narrow
// tile won too (Zen 4 EPYC, 2 threads, A/B interleaved in one process, medians: T2048 H512 F1408 E8 k2 fp32 forward
// 111.1 -> 101.7 ms, T4096 H1024 F2816 821.7 -> 771.4 ms; transformers' eager loop 119.7 and 838.1 ms). On other
// AVX-512 CPUs MKL's 16-lane kernels keep these GEMMs (not measured against the 8-lane tile).
H3F_INLINE bool large_nt_cpu() {
#if H3F_HAVE_NARROW_TILES
  static const bool ok = [] {
    if (!narrow_tiles_available()) return false;
    if (!wide_vectors()) return true;
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") > 0;
  }();
  return ok;
#else
  return false;
#endif
}

H3F_INLINE bool large_nt_takes(int64_t rows, const at::Tensor& out, const at::Tensor& a, const at::Tensor& w) {
  return rows > kMidGemmMaxRows && a.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
         out.scalar_type() == at::kFloat && a.stride(1) == 1 && out.stride(1) == 1 && w.stride(1) == 1 &&
         w.stride(0) == w.size(1) && large_nt_cpu();
}

void large_nt(const float* a, int64_t lda, int64_t n, const float* w, int64_t M, int64_t K, float* out, int64_t ldo) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    const int64_t m0 = t0 * kTileRows, m1 = std::min(M, t1 * kTileRows);
    for (int64_t r = 0; r < n; r += kLargeNtChunkRows)
      tile_nt(a + r * lda, lda, std::min(kLargeNtChunkRows, n - r), w + m0 * K, m1 - m0, K, out + r * ldo + m0, ldo);
  });
}

// out[n, M] = a[n, K] @ w[M, K]^T, written into a view. `large_tiles`: rows above kMidGemmMaxRows may take large_nt
// (false for the 128-row weight chunks of a widened bf16 GEMM, where it lost to sgemm: T2048 H512 F1408 E8 k2 bf16
// forward, 3 interleaved processes of 15 calls each, 334-338 against 302-310 ms).
[[maybe_unused]] void linear_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& w,
                                  bool large_tiles = true) {
  const int64_t n = a.size(0), M = w.size(0), K = w.size(1);
  if (widen_bf16_gemm(n, a)) {
    return widened_linear(out, a, w, [](const at::Tensor& o, const at::Tensor& x, const at::Tensor& y) {
      linear_into(o, x, y, /*large_tiles=*/false);
    });
  }
  if (large_tiles && large_nt_takes(n, out, a, w)) {
    H3F_RECORD_SMALL_GEMM();
    large_nt(a.const_data_ptr<float>(), a.stride(0), n, w.const_data_ptr<float>(), M, K, out.mutable_data_ptr<float>(),
             out.stride(0));
    return;
  }
  const SmallGemm path = w.stride(0) == K ? small_gemm_path(n, out, a, w) : SmallGemm::kBlas;
  if (path == SmallGemm::kBlas) {
    at::mm_out(const_cast<at::Tensor&>(out), a, w.t());
    return;
  }
  H3F_RECORD_SMALL_GEMM();
  if (path == SmallGemm::kFewRows) {
    dispatch_small(a.scalar_type(), [&](auto zero) {
      using scalar_t = decltype(zero);
      small_nt(a.const_data_ptr<scalar_t>(), a.stride(0), n, w.const_data_ptr<scalar_t>(), M, K,
               out.mutable_data_ptr<scalar_t>(), out.stride(0));
    });
  } else if (path == SmallGemm::kTilesFp32Narrow) {
    tile_nt(a.const_data_ptr<float>(), a.stride(0), n, w.const_data_ptr<float>(), M, K, out.mutable_data_ptr<float>(),
            out.stride(0));
  } else if (path == SmallGemm::kTilesFp32) {
    mid_nt(a.const_data_ptr<float>(), a.stride(0), n, w.const_data_ptr<float>(), M, K, out.mutable_data_ptr<float>(),
           out.stride(0));
  } else {
    H3F_BF16_TILES_CALL(bf16_nt(bits(a), a.stride(0), n, bits(w), M, K, mutable_bits(out), out.stride(0)));
  }
}

// out[n, M] = a[n, K] @ b[K, M], written into a view.
[[maybe_unused]] void matmul_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const int64_t n = a.size(0), K = b.size(0), M = b.size(1);
  if (widen_bf16_gemm(n, a)) return widened_gemm(out, a, b, matmul_into);
  const SmallGemm path = small_gemm_path(n, out, a, b);
  if (path == SmallGemm::kBlas) {
    at::mm_out(const_cast<at::Tensor&>(out), a, b);
    return;
  }
  H3F_RECORD_SMALL_GEMM();
  if (path == SmallGemm::kFewRows) {
    dispatch_small(a.scalar_type(), [&](auto zero) {
      using scalar_t = decltype(zero);
      small_nn(a.const_data_ptr<scalar_t>(), a.stride(0), n, b.const_data_ptr<scalar_t>(), b.stride(0), K, M,
               out.mutable_data_ptr<scalar_t>(), out.stride(0));
    });
  } else if (path == SmallGemm::kTilesFp32Narrow) {
    tile_nn(a.const_data_ptr<float>(), a.stride(0), n, b.const_data_ptr<float>(), b.stride(0), K, M,
            out.mutable_data_ptr<float>(), out.stride(0));
  } else if (path == SmallGemm::kTilesFp32) {
    mid_nn(a.const_data_ptr<float>(), a.stride(0), n, b.const_data_ptr<float>(), b.stride(0), K, M,
           out.mutable_data_ptr<float>(), out.stride(0));
  } else {
    H3F_BF16_TILES_CALL(bf16_nn(bits(a), a.stride(0), n, bits(b), b.stride(0), K, M, mutable_bits(out), out.stride(0)));
  }
}

// out[M, K] = a[n, M]^T @ b[n, K], written into a view (a weight gradient: n is the expert's rows).
// `final_output`: out is the gradient itself, not read again soon (the few-rows kernel then writes it with
// non-temporal stores); false for the fp32 scratch of a widened bf16 GEMM, which is read back at once.
[[maybe_unused]] void matmul_tn_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                     bool final_output = true) {
  const int64_t n = a.size(0), M = a.size(1), K = b.size(1);
  if (widen_bf16_gemm(n, a)) {
    return widened_gemm(out, a, b, [](const at::Tensor& o, const at::Tensor& x, const at::Tensor& y) {
      matmul_tn_into(o, x, y, /*final_output=*/false);
    });
  }
  const SmallGemm path = small_gemm_path(n, out, a, b);
  if (path == SmallGemm::kBlas) {
    at::mm_out(const_cast<at::Tensor&>(out), a.t(), b);
    return;
  }
  H3F_RECORD_SMALL_GEMM();
  // non-temporal stores need 16-byte aligned rows
  const bool stream = final_output && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 &&
                      (out.stride(0) * int64_t(out.element_size())) % 16 == 0;
  if (path == SmallGemm::kFewRows) {
    dispatch_small(a.scalar_type(), [&](auto zero) {
      using scalar_t = decltype(zero);
      small_tn(a.const_data_ptr<scalar_t>(), a.stride(0), n, b.const_data_ptr<scalar_t>(), b.stride(0), M, K,
               out.mutable_data_ptr<scalar_t>(), out.stride(0), stream);
    });
  } else if (path == SmallGemm::kTilesFp32Narrow) {
    tile_tn(a.const_data_ptr<float>(), a.stride(0), n, b.const_data_ptr<float>(), b.stride(0), M, K,
            out.mutable_data_ptr<float>(), out.stride(0));
  } else if (path == SmallGemm::kTilesFp32) {
    mid_tn(a.const_data_ptr<float>(), a.stride(0), n, b.const_data_ptr<float>(), b.stride(0), M, K,
           out.mutable_data_ptr<float>(), out.stride(0), stream);
  } else {
    H3F_BF16_TILES_CALL(
        bf16_tn(bits(a), a.stride(0), n, bits(b), b.stride(0), M, K, mutable_bits(out), out.stride(0), stream));
  }
}

// Zeroes a weight gradient (an expert that got no rows), with non-temporal stores where it is contiguous and 16-byte
// aligned: like matmul_tn_into's, the lines are not read in first and do not evict the weights still to be streamed.
[[maybe_unused]] void zero_gradient(const at::Tensor& grad) {
  char* p = static_cast<char*>(grad.data_ptr());
  const int64_t bytes = grad.numel() * int64_t(grad.element_size());
#if defined(__x86_64__)
  if (grad.is_contiguous() && reinterpret_cast<uintptr_t>(p) % 16 == 0) {
    const __m128i zero = _mm_setzero_si128();
    int64_t i = 0;
    for (; i + 16 <= bytes; i += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(p + i), zero);
    std::memset(p + i, 0, bytes - i);
    stream_fence();
    return;
  }
#endif
  (void)p;
  (void)bytes;
  grad.zero_();
}

}  // namespace
}  // namespace h3fusion::cpu
