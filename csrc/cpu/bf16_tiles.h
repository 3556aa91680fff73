// bf16 GEMM tiles on the AVX-512 BF16 dot-product instruction (VDPBF16PS: 16 fp32 lanes, each adding the products
// of one pair of bf16 elements), for experts with a few dozen rows (small_gemm.h routes kSmallGemmMaxRows+1 ..
// kMidGemmMaxRows rows here when the CPU has the instruction). The three forms of small_gemm.h:
//
//   bf16_nt  out[n, M] = a[n, K] @ w[M, K]^T     a repacked K-pair-major (16 rows a vector), pairs of w broadcast;
//                                                  one transpose per 16 x 16 output block
//   bf16_nn  out[n, M] = a[n, K] @ b[K, M]        two rows of b interleaved on the fly (unpack), columns restored
//                                                  by one permute per tile at the store
//   bf16_tn  out[M, K] = a[n, M]^T @ b[n, K]      both operands repacked into row pairs first (O(n (M + K)), small
//                                                  next to the M*K output)
//
// Why: oneDNN's bf16 matmul is fast per FLOP but at 9-48 rows its per-call setup and the packing of the whole weight
// cost as much as the multiply (a T256 E64 k8 layer makes 64 * 5 such calls). These tiles read the weight in place.
// Accumulation is fp32 in a fixed order that depends on the shape only (pairs of K in ascending order), so results
// do not depend on the thread count. The instruction treats denormal inputs as zero; bf16 denormals (|x| < 1.2e-38)
// carry nothing a bf16 GEMM keeps.
#pragma once

#include "row_passes.h"

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#define H3F_HAVE_BF16_TILES 1
#include <immintrin.h>
#define H3F_BF16_TARGET target("avx512f,avx512bw,avx512vl,avx512bf16")
// Every helper that uses the intrinsics carries the target too: GCC inlines callees before their callers.
#define H3F_BF16_FN __attribute__((noinline, H3F_BF16_TARGET))
#define H3F_BF16_INLINE inline __attribute__((always_inline, H3F_BF16_TARGET))
#else
#define H3F_HAVE_BF16_TILES 0
#endif

namespace h3fusion::cpu {
namespace {

// Whether the CPU has bf16 dot products (AVX512_BF16; every AMX CPU has them too), which BLAS's bf16 GEMMs (oneDNN)
// are built on. Without them oneDNN widens the elements inside its inner loop: on an AVX2-only EPYC a bf16 mm ran
// at 15-19 GFLOP/s on 2 threads where fp32 sgemm ran at 100-145, so widening both operands first and running sgemm
// took 0.11-0.14x the time ([256-4096, 512] x [512, 2816]).
H3F_INLINE bool cpu_has_bf16_dot() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool ok = [] {
    if (cpu_isa_capped_at_avx2()) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return ok;
#else
  return true;  // other CPUs keep BLAS's bf16 path (not measured)
#endif
}

// Whether this CPU runs VDPBF16PS (checked once; `H3FUSION_BF16_TILES=0` turns the tiles off for A/B runs).
H3F_INLINE bool bf16_tiles_available() {
#if H3F_HAVE_BF16_TILES
  static const bool ok = [] {
    const char* env = std::getenv("H3FUSION_BF16_TILES");
    if (env != nullptr && std::string(env) == "0") return false;
    return cpu_has_bf16_dot() && __builtin_cpu_supports("avx512bw") != 0;  // cpu_has_bf16_dot ran __builtin_cpu_init
  }();
  return ok;
#else
  return false;
#endif
}

#if H3F_HAVE_BF16_TILES

using bf16_bits = uint16_t;

// Stores the first `count` (<= 16) lanes of v as bf16 (vstore's rounding).
H3F_INLINE void store_bf16(bf16_bits* p, vfloat v, int64_t count) {
  if (count >= kLanes) {
    vstore(reinterpret_cast<c10::BFloat16*>(p), v);
    return;
  }
  c10::BFloat16 tmp[kLanes];
  vstore(tmp, v);
  std::memcpy(p, tmp, count * sizeof(bf16_bits));
}

// The first `count` of 32 lanes (none for count <= 0: the second 32-column half of a narrow strip).
H3F_BF16_INLINE __mmask32 mask32(int64_t count) {
  return count <= 0 ? __mmask32{0} : count >= 32 ? ~__mmask32{0} : (__mmask32{1} << count) - 1;
}

// The packed-rows form takes up to 48 rows a block (3 vectors of 16 lanes) against strips of 8 weight rows (24
// accumulators).
constexpr int64_t kPackedMaxRows = 48;
constexpr int kPackedStripRows = 8;

H3F_BF16_INLINE vfloat dp(vfloat acc, __m512i x, __m512i y) {
  return (vfloat)_mm512_dpbf16_ps((__m512)acc, (__m512bh)x, (__m512bh)y);
}

// ---- packed-rows form (a . w^T) -------------------------------------------------------------------------------------
// All n (<= 48) rows of a are repacked K-pair-major into NV = ceil(n / 16) vectors a pair, ap[p][r] = (a[r, 2p],
// a[r, 2p + 1]) (rows past n and an odd K's last partner zero), so NV loads hold a pair of every row; the matching
// pair of each of 8 weight rows is broadcast against them. Accumulator (m, v) then holds out[16 v + lane, j + m], and a
// 16 x 16 transpose per vector puts rows back at the store.
// Why this shape (measured on the 2-core Zen 4 runner, VDPBF16PS peak 3.47 per ns and core):
//  - It replaces a dot form (a row of a against a row of w, 32 K a step), which folds 16 lanes into each output
//    (~3 shuffles per output, 20-40% of the multiply at K = 256-512) and stores scalars.
//  - In a standalone loop with the weight in L2, 8 weight rows x 2-3 vectors ran at 95-100% of peak (8 broadcasts +
//    NV loads per 8 NV products), 8 x 1 at 78%, 16 x 1 at 48% (rows 1 KB apart share 4 L1 sets).
//  - In a layer the weights stream from L3 or memory, and rows of ~16 lines are too short for the hardware
//    prefetchers: with 32 MB of weights the loop ran at 2.0 per ns prefetching 4 lines ahead in the row, 2.9 fetching
//    the strip after next (below).
//  - Against the dot form in moe_ffn, bf16 forward, 2 threads (E64 k8 H512 F256): T256 (32 rows an expert) 9.0 ->
//    7.4 ms, T128 (16) 5.7-6.4 -> 5.1-5.6 ms, T80 (10) 6.6-9.0 -> 5.4-6.9 ms; the dot form for the rows past a
//    multiple of 16 was slower than padding them at every split tried (rest >= 8, >= 12).

// Transposes the 16 x 16 matrix whose row i is v[i] (any 32-bit lanes; the shuffles move bits only).
H3F_BF16_INLINE void transpose16(vfloat* v) {
#pragma GCC unroll 4
  for (int d = 8; d >= 1; d /= 2) {
    // Swap the off-diagonal d x d blocks of every 2d x 2d block: rows i, i + d exchange lanes across the d boundary.
    vint lo, hi;
    for (int l = 0; l < kLanes; ++l) {
      lo[l] = (l & d) == 0 ? l : kLanes + l - d;
      hi[l] = (l & d) == 0 ? l + d : kLanes + l;
    }
#pragma GCC unroll 16
    for (int i = 0; i < kLanes; ++i) {
      if ((i & d) != 0) continue;
      const vfloat x = v[i], y = v[i + d];
      v[i] = __builtin_shuffle(x, y, lo);
      v[i + d] = __builtin_shuffle(x, y, hi);
    }
  }
}

// ap[p][16 * nv] (p < (K + 1) / 2) from n <= 16 * nv rows of a.
H3F_BF16_INLINE void pack_row_pairs(const bf16_bits* a, int64_t lda, int64_t n, int64_t K, int nv, uint32_t* ap) {
  const int64_t pairs = (K + 1) / 2, stride = kLanes * nv;
  for (int v = 0; v < nv; ++v) {
    const int64_t rows = std::min<int64_t>(kLanes, n - kLanes * v);
    const bf16_bits* av = a + kLanes * v * lda;
    for (int64_t p0 = 0; p0 < pairs; p0 += kLanes) {
      const __mmask32 mk = mask32(K - 2 * p0);
      vfloat t[kLanes];
#pragma GCC unroll 16
      for (int i = 0; i < kLanes; ++i)
        t[i] = i < rows ? (vfloat)_mm512_maskz_loadu_epi16(mk, av + i * lda + 2 * p0) : vfloat{};
      transpose16(t);
      const int64_t np = std::min<int64_t>(kLanes, pairs - p0);
#pragma GCC unroll 16
      for (int q = 0; q < kLanes; ++q)
        if (q < np) std::memcpy(ap + (p0 + q) * stride + kLanes * v, &t[q], sizeof(vfloat));
    }
  }
}

// tile[m][16 v + r] = sum_p ap[p][16 v + r] . w[m, 2p..2p+1] for the strip's weight rows m at stride ldw; tile rows
// are kPackedMaxRows floats apart.
template <int NV>
H3F_BF16_INLINE void nt_packed_strip(const uint32_t* __restrict__ ap, const bf16_bits* __restrict__ w, int64_t ldw,
                                     int64_t K, float* tile) {
  constexpr int kRows = kPackedStripRows;
  vfloat acc[kRows * NV];
#pragma GCC unroll 24
  for (int q = 0; q < kRows * NV; ++q) acc[q] = vfloat{};
  const int64_t whole = K / 2;  // pairs inside every weight row; an odd K's last element is read alone below
  for (int64_t p0 = 0; p0 < whole; p0 += kLanes) {
    // Rows are short (K * 2 bytes, ~16 lines) and read 8 at a time, too short for the hardware prefetchers to
    // train on: each 16-pair step fetches the matching line of every row of the strip after next.
#pragma GCC unroll 8
    for (int m = 0; m < kRows; ++m) __builtin_prefetch(w + (2 * kRows + m) * ldw + 2 * p0, 0, 3);
    const int64_t stop = std::min<int64_t>(whole, p0 + kLanes);
    for (int64_t p = p0; p < stop; ++p) {
      __m512i av[NV];
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) av[v] = _mm512_loadu_si512(ap + (p * NV + v) * kLanes);
#pragma GCC unroll 8
      for (int m = 0; m < kRows; ++m) {
        int32_t pair;
        std::memcpy(&pair, w + m * ldw + 2 * p, sizeof(pair));
        const __m512i b = _mm512_set1_epi32(pair);
#pragma GCC unroll 3
        for (int v = 0; v < NV; ++v) acc[m * NV + v] = dp(acc[m * NV + v], b, av[v]);
      }
    }
  }
  if (K % 2 != 0) {
    __m512i av[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) av[v] = _mm512_loadu_si512(ap + (whole * NV + v) * kLanes);
#pragma GCC unroll 8
    for (int m = 0; m < kRows; ++m) {
      const __m512i b = _mm512_set1_epi32(int32_t(w[m * ldw + K - 1]));
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[m * NV + v] = dp(acc[m * NV + v], b, av[v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < kRows; ++m)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) std::memcpy(tile + m * kPackedMaxRows + kLanes * v, &acc[m * NV + v], sizeof(vfloat));
}

H3F_BF16_FN void bf16_nt(const bf16_bits* a, int64_t lda, int64_t n, const bf16_bits* w, int64_t M, int64_t K,
                         bf16_bits* out, int64_t ldo) {
  thread_local std::vector<uint32_t> ap;
  thread_local std::vector<bf16_bits> tail;  // the last M % 16 weight rows, then zero rows up to 16
  const int64_t whole = M / kLanes * kLanes;
  if (whole < M) {
    tail.assign(kLanes * K, 0);
    std::memcpy(tail.data(), w + whole * K, (M - whole) * K * sizeof(bf16_bits));
  }
  const bf16_bits* const tail_rows = tail.data();
  for (int64_t r0 = 0; r0 < n; r0 += kPackedMaxRows) {  // one block unless a caller passes more than 48 rows
    const int64_t rows = std::min<int64_t>(kPackedMaxRows, n - r0);
    const int nv = int((rows + kLanes - 1) / kLanes);
    ap.resize((K + 1) / 2 * kLanes * nv);
    uint32_t* const apd = ap.data();  // thread_local storage is looked up by a call: once here
    pack_row_pairs(a + r0 * lda, lda, rows, K, nv, apd);
    alignas(64) float tile[kLanes * kPackedMaxRows];  // [16 weight rows][48 rows of a]
    for (int64_t j = 0; j < M; j += kLanes) {
      const bf16_bits* wj = j < whole ? w + j * K : tail_rows;
      for (int h = 0; h < kLanes / kPackedStripRows; ++h) {
        const bf16_bits* ws = wj + kPackedStripRows * h * K;
        float* th = tile + kPackedStripRows * h * kPackedMaxRows;
        if (nv == 1) nt_packed_strip<1>(apd, ws, K, K, th);
        else if (nv == 2) nt_packed_strip<2>(apd, ws, K, K, th);
        else nt_packed_strip<3>(apd, ws, K, K, th);
      }
      const int64_t mb = std::min<int64_t>(kLanes, M - j);
      for (int v = 0; v < nv; ++v) {
        vfloat t[kLanes];
#pragma GCC unroll 16
        for (int m = 0; m < kLanes; ++m) std::memcpy(&t[m], tile + m * kPackedMaxRows + kLanes * v, sizeof(vfloat));
        transpose16(t);  // t[r] = out[r0 + 16 v + r, j .. j + 15]
#pragma GCC unroll 16
        for (int r = 0; r < kLanes; ++r)
          if (kLanes * v + r < rows) store_bf16(out + (r0 + kLanes * v + r) * ldo + j, t[r], mb);
      }
    }
  }
}

// ---- row-axpy form --------------------------------------------------------------------------------------------------
// NB rows of a against a strip of 64 columns of b. Rows i and i + 1 of b are interleaved by unpacklo/hi_epi16, which
// work within 128-bit lanes: lane q of the `lo` product holds column 8 (q / 4) + q % 4, of `hi` that column + 4.
// At the store, cols0 / cols1 gather columns 0-15 / 16-31 back from (lo, hi) (indices >= 16 select hi). The strip
// walks down b's rows with the row kStripPrefetchRows ahead prefetched.
template <int NB>
H3F_BF16_INLINE void nn_tile(const bf16_bits* __restrict__ a, int64_t lda, const bf16_bits* __restrict__ b,
                             int64_t ldb, int64_t K, int64_t cols, bf16_bits* out, int64_t ldo) {
  static const bf16_bits kZeroRow[64] = {};  // the partner of an odd last row of b
  const __mmask32 mk[2] = {mask32(cols), mask32(cols - 32)};
  vfloat acc[NB][4];
  for (int r = 0; r < NB; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = vfloat{};
  for (int64_t i = 0; i < K; i += 2) {
    const bool pair = i + 1 < K;
    const bf16_bits* row0 = b + i * ldb;
    const bf16_bits* row1 = pair ? row0 + ldb : kZeroRow;
    for (int64_t ahead = i + kStripPrefetchRows; ahead < i + kStripPrefetchRows + 2; ++ahead) {
      __builtin_prefetch(b + ahead * ldb, 0, 3);
      __builtin_prefetch(b + ahead * ldb + 32, 0, 3);
    }
    __m512i lo[2], hi[2];
    for (int g = 0; g < 2; ++g) {
      const __m512i r0 = _mm512_maskz_loadu_epi16(mk[g], row0 + 32 * g);
      const __m512i r1 = _mm512_maskz_loadu_epi16(mk[g], row1 + 32 * g);
      lo[g] = _mm512_unpacklo_epi16(r0, r1);
      hi[g] = _mm512_unpackhi_epi16(r0, r1);
    }
    for (int r = 0; r < NB; ++r) {
      int32_t apair = a[r * lda + i];
      if (pair) std::memcpy(&apair, a + r * lda + i, sizeof(apair));
      const __m512i bc = _mm512_set1_epi32(apair);
      for (int g = 0; g < 2; ++g) {
        acc[r][2 * g] = dp(acc[r][2 * g], bc, lo[g]);
        acc[r][2 * g + 1] = dp(acc[r][2 * g + 1], bc, hi[g]);
      }
    }
  }
  // Back to column order in a plain array first: the stores below branch on the tile's width, and an accumulator
  // indexed from a loop GCC does not unroll would make it keep all of them in memory through the main loop.
  const __m512i cols0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i cols1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  vfloat res[NB][4];
#pragma GCC unroll 16
  for (int r = 0; r < NB; ++r)
#pragma GCC unroll 2
    for (int g = 0; g < 2; ++g) {
      const __m512 l = (__m512)acc[r][2 * g], h = (__m512)acc[r][2 * g + 1];
      res[r][2 * g] = (vfloat)_mm512_permutex2var_ps(l, cols0, h);
      res[r][2 * g + 1] = (vfloat)_mm512_permutex2var_ps(l, cols1, h);
    }
  for (int r = 0; r < NB; ++r)
    for (int q = 0; q < 4 && 16 * q < cols; ++q) store_bf16(out + r * ldo + 16 * q, res[r][q], cols - 16 * q);
}

H3F_BF16_FN void bf16_nn(const bf16_bits* a, int64_t lda, int64_t n, const bf16_bits* b, int64_t ldb, int64_t K,
                         int64_t M, bf16_bits* out, int64_t ldo) {
  // Column strips outermost: a strip of b (64 columns x K rows) stays in L2 while every row block of a passes it.
  for (int64_t j = 0; j < M; j += 64) {
    const int64_t cols = std::min<int64_t>(64, M - j);
    int64_t r = 0;
    for (; r + 4 <= n; r += 4) nn_tile<4>(a + r * lda, lda, b + j, ldb, K, cols, out + r * ldo + j, ldo);
    for (; r + 2 <= n; r += 2) nn_tile<2>(a + r * lda, lda, b + j, ldb, K, cols, out + r * ldo + j, ldo);
    for (; r < n; ++r) nn_tile<1>(a + r * lda, lda, b + j, ldb, K, cols, out + r * ldo + j, ldo);
  }
}

// ---- outer-product form ---------------------------------------------------------------------------------------------
// out[j, c] = sum_r a[r, j] b[r, c]: the reduction runs over the n rows, so both operands are first repacked into row
// pairs (an odd last row pairs with zero): bp[p][2c + s] = b[2p + s][c] and ap[p][j] = (a[2p][j], a[2p + 1][j]), one
// two-source permute per 16 columns. Tiles of 4 output rows x 64 columns then read bp (n/2 x 64 pairs, L1) and write
// the output once; with `stream` (small_gemm.h: matmul_tn_into), whole tiles with non-temporal stores (T256 H512 F256
// E64 k8 bf16 fwd+bwd, Zen 4 EPYC, 2 threads, medians of 41 and 61 calls interleaved in one process: 19.85 -> 18.91
// and 20.30 -> 19.15 ms).

// dst[2c + s] = (s ? r1 : r0)[c] for c < cols; r1 == nullptr stands for a row of zeros.
H3F_BF16_INLINE void interleave_rows(const bf16_bits* r0, const bf16_bits* r1, int64_t cols, bf16_bits* dst) {
  __m512i first, second;  // lanes 2c, 2c + 1 <- element c of r0, r1 (sources >= 32 select r1)
  {
    alignas(64) int16_t f[32], g[32];
    for (int q = 0; q < 32; ++q) {
      f[q] = int16_t(q / 2 + (q % 2) * 32);
      g[q] = int16_t(16 + q / 2 + (q % 2) * 32);
    }
    first = _mm512_load_si512(f);
    second = _mm512_load_si512(g);
  }
  for (int64_t c = 0; c < cols; c += 32) {
    const __mmask32 mk = mask32(cols - c);
    const __m512i x = _mm512_maskz_loadu_epi16(mk, r0 + c);
    const __m512i y = r1 != nullptr ? _mm512_maskz_loadu_epi16(mk, r1 + c) : _mm512_setzero_si512();
    const int64_t left = 2 * (cols - c);
    _mm512_mask_storeu_epi16(dst + 2 * c, mask32(left), _mm512_permutex2var_epi16(x, first, y));
    _mm512_mask_storeu_epi16(dst + 2 * c + 32, mask32(left - 32), _mm512_permutex2var_epi16(x, second, y));
  }
}

H3F_BF16_FN void bf16_tn(const bf16_bits* a, int64_t lda, int64_t n, const bf16_bits* b, int64_t ldb, int64_t M,
                         int64_t K, bf16_bits* out, int64_t ldo, bool stream) {
  const int64_t pairs = (n + 1) / 2;
  thread_local std::vector<bf16_bits> bp;
  thread_local std::vector<uint32_t> ap;
  bp.resize(pairs * 2 * K);
  ap.resize(pairs * M);
  bf16_bits* const bpd = bp.data();  // thread_local storage is looked up by a call: once here, not in the loops
  uint32_t* const apd = ap.data();
  for (int64_t p = 0; p < pairs; ++p) {
    const bool odd_last = 2 * p + 1 == n;
    interleave_rows(b + 2 * p * ldb, odd_last ? nullptr : b + (2 * p + 1) * ldb, K, bpd + p * 2 * K);
    interleave_rows(a + 2 * p * lda, odd_last ? nullptr : a + (2 * p + 1) * lda, M,
                    reinterpret_cast<bf16_bits*>(apd + p * M));
  }
  constexpr int kRows = 4, kVecs = 4;
  for (int64_t j = 0; j < M; j += kRows) {
    const int64_t mb = std::min<int64_t>(kRows, M - j);
    int64_t col[kRows];  // rows past M repeat the last one; their sums are dropped
    for (int m = 0; m < kRows; ++m) col[m] = std::min<int64_t>(j + m, M - 1);
    for (int64_t c = 0; c < K; c += kVecs * kLanes) {
      __mmask16 mk[kVecs];
      for (int v = 0; v < kVecs; ++v) {
        const int64_t left = K - c - v * kLanes;
        mk[v] = left >= kLanes ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
      }
      const bf16_bits* bc0 = bpd + c * 2;
      vfloat acc[kRows * kVecs];
#pragma GCC unroll 16
      for (int q = 0; q < kRows * kVecs; ++q) acc[q] = vfloat{};
      for (int64_t p = 0; p < pairs; ++p) {
        __m512i bv[kVecs];
#pragma GCC unroll 4
        for (int v = 0; v < kVecs; ++v) bv[v] = _mm512_maskz_loadu_epi32(mk[v], bc0 + p * K * 2 + v * 2 * kLanes);
        const uint32_t* arow = apd + p * M;
#pragma GCC unroll 4
        for (int m = 0; m < kRows; ++m) {
          const __m512i bc = _mm512_set1_epi32(int32_t(arow[col[m]]));
#pragma GCC unroll 4
          for (int v = 0; v < kVecs; ++v) acc[m * kVecs + v] = dp(acc[m * kVecs + v], bc, bv[v]);
        }
      }
      if (mb == kRows && c + kVecs * kLanes <= K) {  // a whole tile: stored from the registers
#pragma GCC unroll 16
        for (int q = 0; q < kRows * kVecs; ++q)
          vstore_out(reinterpret_cast<c10::BFloat16*>(out + (j + q / kVecs) * ldo + c + (q % kVecs) * kLanes), acc[q],
                     stream);
        continue;
      }
      float res[kRows * kVecs][kLanes];
#pragma GCC unroll 16
      for (int q = 0; q < kRows * kVecs; ++q) std::memcpy(res[q], &acc[q], sizeof(res[q]));
      for (int m = 0; m < mb; ++m)
        for (int v = 0; v < kVecs && c + v * kLanes < K; ++v) {
          vfloat x;
          std::memcpy(&x, res[m * kVecs + v], sizeof(x));
          store_bf16(out + (j + m) * ldo + c + v * kLanes, x, K - c - v * kLanes);
        }
    }
  }
  if (stream) stream_fence();
}

#endif  // H3F_HAVE_BF16_TILES

}  // namespace
}  // namespace h3fusion::cpu
