// fp32 GEMMs of 9-48 rows on CPUs with 8-lane vectors (AVX2 + FMA, no AVX-512): the three forms of small_gemm.h
// (a.w^T, a.b, a^T.b) on one register tile of broadcast-times-vector FMAs.
//
// Why: at these sizes MKL spends about as long packing the weight as multiplying (T256 H512 F256 E64 k8: sgemm_scopy
// was 46% of its GEMM time), and small_gemm.h's dot-product tiles need AVX-512's 32 registers (with AVX2's 16 they
// hold half their accumulators, and MKL beat them). Here a tile of kTileRows broadcast scalars x 2 vectors (12
// accumulators, 2 vector loads, one broadcast register) keeps both FMA pipes busy with 8 loads per 12 FMAs and needs
// no horizontal sums. One [32, 512] x [512, 512]^T GEMM, the weights of 64 experts in turn (not in cache), single
// thread, on an AVX2 EPYC: MKL 407 us, this tile 235-240 us.
//
// The tile (mk_tile) computes acc[m][v] += s[m](i) * vec(i)[8v .. 8v + 8) over a reduction index i, where
//   a.w^T (nt): s[m] = weight row j + m, read in place; vec = a's rows packed lane-major ([K][16] per full block of
//               16 rows), so out is the tile transposed; the 0-15 rows past the last block take dot products instead;
//   a.b   (nn): s[m] = row r + m of a; vec = 16 columns of b's row i, from a packed panel of b;
//   a^T.b (tn): s[m] = column j + m of a, vec = 16 columns of b's row i (i runs over a's n rows), both packed.
// Operands other than a.w^T's weight are packed because their rows are often a power of two apart (2 KiB at 512
// columns): a strip read in place then falls into two of L1's 64 sets and is refetched from L2 on every pass.
// Each output element is one fp32 lane summing its reduction index in ascending order (a.b: per panel of kNnPanel
// rows, the panels added in order), so results depend on the shape only, never on the thread count.
#pragma once

#include "row_passes.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define H3F_HAVE_NARROW_TILES 1
#else
#define H3F_HAVE_NARROW_TILES 0
#endif

namespace h3fusion::cpu {
namespace {

constexpr int kTileRows = 6;   // broadcast scalars per tile
constexpr int kTileLanes = 8;  // one AVX2 register of fp32
constexpr int kTileCols = 2 * kTileLanes;
using V8 = Vec<kTileLanes>::f;

// True on x86-64 CPUs with AVX2 and FMA (the ISA these tiles are written for; small_gemm_path takes them only where
// vectors are 8 lanes).
H3F_INLINE bool narrow_tiles_available() {
#if H3F_HAVE_NARROW_TILES
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") > 0 && __builtin_cpu_supports("fma") > 0;
  }();
  return ok;
#else
  return false;
#endif
}

// A thread's packing buffer of at least `size` floats. It only grows: resizing it to each GEMM's size zero-filled
// the growth on every call whose expert had more rows than the last (2% of a T256 E64 forward in "rep stos").
H3F_INLINE float* scratch(std::vector<float>& buf, int64_t size) {
  if (buf.size() < static_cast<size_t>(size)) buf.resize(static_cast<size_t>(size));
  return buf.data();
}

// Column strips of the vector operand: 16 columns while 16 fit in the first vec_cols, then one of 8 (vec_cols is a
// multiple of 8; the columns past it are a scalar tail).
H3F_INLINE int64_t strip_width(int64_t c, int64_t vec_cols) {
  return c + kTileCols <= vec_cols ? int64_t(kTileCols) : int64_t(kTileLanes);
}

// Where a tile prefetches: one cache line at pf + i * step_bytes for each reduction step i < count, into L1, or into
// L2 only for data needed only after the tile (l2_only).
struct Prefetch {
  const char* pf = nullptr;
  int64_t step_bytes = 0, count = 0;
  bool l2_only = false;
};

// Everything from here to the pop is compiled for AVX2 + FMA only (no ISA clones: small_gemm_path takes these kernels
// only on CPUs with both), lambdas included, which a target attribute on the kernels would not reach.
#if H3F_HAVE_NARROW_TILES
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

// The tile's sums, acc[m][c] = sum over i < steps of s[m][i * s_step] * vec[i * v_step + 8 c + (0 .. 8)] for m < MR,
// c < NV, are handed to put(m, c, acc[m][c]).
template <int MR, int NV, typename Put>
H3F_INLINE void mk_tile(const float* const* s, int64_t s_step, const float* __restrict__ vec, int64_t v_step,
                        int64_t steps, const Prefetch& p, const Put& put) {
  // Zeroed one register at a time: as an aggregate (`= {}`) GCC zeroed the array in memory with `rep stos` before
  // every tile of tile_nt (2% of its samples).
  V8 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NV; ++c) acc[m][c] = V8{};
  for (int64_t i = 0, si = 0, vi = 0; i < steps; ++i, si += s_step, vi += v_step) {
    if (i < p.count) {
      if (p.l2_only) {
        __builtin_prefetch(p.pf + i * p.step_bytes, 0, 1);
      } else {
        __builtin_prefetch(p.pf + i * p.step_bytes, 0, 3);
      }
    }
    V8 v[NV];
    for (int c = 0; c < NV; ++c) v[c] = vload<kTileLanes>(vec + vi + c * kTileLanes);
    for (int m = 0; m < MR; ++m) {
      const float x = s[m][si];
      const V8 b = {x, x, x, x, x, x, x, x};  // one vbroadcastss from memory (splat's V{} + x adds a zero first)
      for (int c = 0; c < NV; ++c) acc[m][c] += b * v[c];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NV; ++c) put(m, c, acc[m][c]);
}

// mk_tile with MR = mr (1 .. kTileRows) and NV = nv (1, 2).
template <typename Put>
H3F_INLINE void run_tile(int mr, int nv, const float* const* s, int64_t s_step, const float* vec, int64_t v_step,
                         int64_t steps, const Prefetch& p, const Put& put) {
#define H3F_TILE_CASE(MR)                                    \
  case MR:                                                   \
    if (nv == 2) {                                           \
      mk_tile<MR, 2>(s, s_step, vec, v_step, steps, p, put); \
    } else {                                                 \
      mk_tile<MR, 1>(s, s_step, vec, v_step, steps, p, put); \
    }                                                        \
    return;
  switch (mr) {
    H3F_TILE_CASE(6)
    H3F_TILE_CASE(5)
    H3F_TILE_CASE(4)
    H3F_TILE_CASE(3)
    H3F_TILE_CASE(2)
    H3F_TILE_CASE(1)
    default: return;
  }
#undef H3F_TILE_CASE
}

// s[m] = the sum of v[m]'s lanes for m < 6 (s[6], s[7] are scratch), by a fixed tree: pairs of lanes (hadd), pairs
// of pairs, then the two 128-bit halves.
H3F_INLINE void lane_sums6(const V8* v, float* s) {
#if H3F_HAVE_NARROW_TILES
  const __m256 h01 = _mm256_hadd_ps(__m256(v[0]), __m256(v[1]));
  const __m256 h23 = _mm256_hadd_ps(__m256(v[2]), __m256(v[3]));
  const __m256 h45 = _mm256_hadd_ps(__m256(v[4]), __m256(v[5]));
  const __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h45);
  _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(q0), _mm256_extractf128_ps(q0, 1)));
  _mm_storeu_ps(s + 4, _mm_add_ps(_mm256_castps256_ps128(q1), _mm256_extractf128_ps(q1, 1)));
#else  // never run (small_gemm_path takes these tiles on x86 only): the dot-product tiles' fold
  V8 f[kTileLanes];
  for (int m = 0; m < kTileLanes; ++m) f[m] = m < kTileRows ? v[m] : V8{};
  const V8 sums = fold_lanes(f);
  std::memcpy(s, &sums, sizeof(sums));
#endif
}

// out[r, m] = a[r, :] . wr[m][:] for r < NR, m < mb: dot products over K, 8 lanes a step, of NR rows of a (read in
// place) by kTileRows weight rows (wr holds kTileRows pointers; those past mb repeat a row, their sums dropped), then
// each row's accumulators summed (lane_sums6: the T256 forward below 3% faster than with fold_lanes' shuffles,
// whose cost a 32-step dot product at K 256 hardly amortises) and the scalar K tail added. At NR = 2: 12
// accumulators and 8 loads per 12 FMAs, like the broadcast tile, with no lanes to pad. The lines of p are prefetched
// spread evenly over the steps.
template <int NR>
H3F_INLINE void dot_rows_nt(const float* a, int64_t lda, const float* const* wr, int mb, int64_t K, const Prefetch& p,
                            float* out, int64_t ldo) {
  V8 acc[NR][kTileRows];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < kTileRows; ++m) acc[r][m] = V8{};
  const int64_t kv = K - K % kTileLanes;
  const int64_t per_step = p.count > 0 ? (p.count * kTileLanes + kv - 1) / std::max<int64_t>(kv, 1) : 0;
  int64_t line = 0;
  for (int64_t i = 0; i < kv; i += kTileLanes) {
    for (int64_t q = 0; q < per_step && line < p.count; ++q, ++line)
      __builtin_prefetch(p.pf + line * p.step_bytes, 0, 3);
    V8 x[NR];
    for (int r = 0; r < NR; ++r) x[r] = vload<kTileLanes>(a + r * lda + i);
    for (int m = 0; m < kTileRows; ++m) {
      const V8 wv = vload<kTileLanes>(wr[m] + i);
      for (int r = 0; r < NR; ++r) acc[r][m] += x[r] * wv;
    }
  }
  for (int r = 0; r < NR; ++r) {
    float sums[kTileLanes];
    lane_sums6(acc[r], sums);
    if (kv == K && mb == kTileRows) {
      std::memcpy(out + r * ldo, sums, kTileRows * sizeof(float));
      continue;
    }
    for (int m = 0; m < mb; ++m) {
      float t = sums[m];
      for (int64_t i = kv; i < K; ++i) t += a[r * lda + i] * wr[m][i];
      out[r * ldo + m] = t;
    }
  }
}

// out[n, M] = a[n, K] @ w[M, K]^T: a's full blocks of 16 rows on the broadcast tile, the 0-15 rows after them on
// dot_rows_nt, which pads nothing. Padded to 8 or 16 lanes, the rows of T256 H512 F256 E64 k8's experts (32 +- 6
// each) put about a tenth of the tile's FMAs on padding; with the tail on dot products that fp32 forward went 12.07
// -> 11.52 ms (medians of 101 interleaved calls, 2 threads, AVX2 EPYC), then to 11.1-11.5 ms with lane_sums6. Every
// row on dot products took 16.2 ms: they run well below the broadcast tile, so they only take the rows it would pad.
__attribute__((noinline)) void tile_nt(const float* a, int64_t lda, int64_t n, const float* w, int64_t M, int64_t K,
                                      float* out, int64_t ldo) {
  // a's full blocks packed lane-major, [K][16] each: the block of rows from r0 on starts at pack + r0 * K
  const int64_t n16 = n - n % kTileCols;
  thread_local std::vector<float> pack_buf;
  float* const pack = scratch(pack_buf, n16 * K);
  for (int64_t r0 = 0; r0 < n16; r0 += kTileCols) {
    float* blk = pack + r0 * K;
    for (int64_t i = 0; i < K; ++i)
      for (int64_t c = 0; c < kTileCols; ++c) blk[i * kTileCols + c] = a[(r0 + c) * lda + i];
  }
  for (int64_t j = 0; j < M; j += kTileRows) {
    const int mb = static_cast<int>(std::min<int64_t>(kTileRows, M - j));
    const float* wr[kTileRows];
    for (int m = 0; m < kTileRows; ++m) wr[m] = w + (j + std::min(m, mb - 1)) * K;
    // the next tile's weight rows, contiguous, prefetched by the first block: a line every other step covers them (6
    // K floats in 3 K / 8 lines), or by the first rows on dot_rows_nt when there is no block
    const int64_t next_rows = std::clamp<int64_t>(M - j - kTileRows, 0, kTileRows);
    const char* next_w = reinterpret_cast<const char*>(w + std::min(j + kTileRows, M) * K);
    for (int64_t r0 = 0; r0 < n16; r0 += kTileCols) {
      // the tile is out's block transposed: lane l of acc[m][c] is out[r0 + 8 c + l, j + m]
      const Prefetch pf = r0 == 0 ? Prefetch{next_w, 32, next_rows * K / 8} : Prefetch{};
      run_tile(mb, 2, wr, 1, pack + r0 * K, kTileCols, K, pf, [&](int m, int c, V8 v) {
        for (int l = 0; l < kTileLanes; ++l) out[(r0 + c * kTileLanes + l) * ldo + j + m] = v[l];
      });
    }
    const Prefetch tail_pf = n16 == 0 ? Prefetch{next_w, 64, next_rows * K / 16} : Prefetch{};
    int64_t r = n16;
    for (; r + 2 <= n; r += 2)
      dot_rows_nt<2>(a + r * lda, lda, wr, mb, K, r == n16 ? tail_pf : Prefetch{}, out + r * ldo + j, ldo);
    if (r < n) dot_rows_nt<1>(a + r * lda, lda, wr, mb, K, r == n16 ? tail_pf : Prefetch{}, out + r * ldo + j, ldo);
  }
}

// out[n, M] = a[n, K] @ b[K, M]. b is copied in panels of kNnPanel rows (read row after row, as the hardware
// prefetcher likes) to [strip][row][16] blocks, so that a strip (8 KiB) stays in L1 while every row tile of a passes
// it. Read in place, a strip of a weight whose rows are a power of two apart (2 KiB at F 512) falls into two of L1's
// 64 sets, and perf put 30% of the kernel's samples on its loads. The panels' sums add into out in order.
// Consecutive strips start kNnStripPad floats (one cache line) further apart than their size: unpadded, they were a
// power of two apart (8 KiB at 128 rows), so the copy's 32 stores of one row of b (M 512) all fell into one L1 set and
// each missed (T256 H512 F256 E64 k8 fp32 fwd+bwd with frozen experts, 2 threads, AVX2 EPYC, medians of 61
// interleaved calls: 28.67 -> 27.80 ms; with expert gradients 42.26 -> 41.06 ms).
constexpr int64_t kNnPanel = 128;
constexpr int64_t kNnStripPad = 16;

__attribute__((noinline)) void tile_nn(const float* a, int64_t lda, int64_t n, const float* b, int64_t ldb, int64_t K,
                                      int64_t M, float* out, int64_t ldo) {
  const int64_t vec_cols = M - M % kTileLanes;
  thread_local std::vector<float> panel_buf;
  float* const panel = scratch(panel_buf, kNnPanel * vec_cols + (vec_cols / kTileCols + 1) * kNnStripPad);
  // the strip at column j of a panel of kn rows
  auto strip = [&](int64_t j, int64_t kn) { return panel + j * kn + j / kTileCols * kNnStripPad; };
  // a's rows split evenly over the fewest tiles of at most 6 (32 rows: 5, 5, 6, 5, 5, 6): a last tile of 1-2 rows
  // has too few accumulators to cover the FMA latency (one [32, 512] x [512, 512] GEMM, 64 experts' weights in turn,
  // one thread, AVX2 EPYC, best of 30: 14.85 -> 14.31 ms)
  const int64_t row_tiles = (n + kTileRows - 1) / kTileRows;
  for (int64_t k0 = 0; k0 < K; k0 += kNnPanel) {
    const int64_t kn = std::min(kNnPanel, K - k0);
    // Row i of the panel goes to row i of every strip: of the full strips (16 columns, strip s at s * full_step),
    // then of the 8-column one after them, if any. Written with the strips' stride hoisted: computing each strip's
    // start in the loop (strip_width, strip) made the copy 10% of this kernel's samples (T256 H512 F256 E64 k8
    // fp32 frozen fwd+bwd).
    const int64_t full = vec_cols / kTileCols, full_step = kTileCols * kn + kNnStripPad;
    float* const narrow = strip(full * kTileCols, kn);
    for (int64_t i = 0; i < kn; ++i) {
      const float* bi = b + (k0 + i) * ldb;
      float* dst = panel + i * kTileCols;
      for (int64_t s = 0; s < full; ++s, bi += kTileCols, dst += full_step) {
        vstore(dst, vload<kTileLanes>(bi));
        vstore(dst + kTileLanes, vload<kTileLanes>(bi + kTileLanes));
      }
      if (full * kTileCols < vec_cols) vstore(narrow + i * kTileLanes, vload<kTileLanes>(bi));
    }
    // The next panel's rows are prefetched while this one is multiplied, a slice of their lines by each tile (read
    // only when the copy above reaches them, they stalled it: 30% of the kernel's samples).
    const int64_t next_rows = std::min(kNnPanel, K - k0 - kn);
    const int64_t tiles = (vec_cols + kTileCols - 1) / kTileCols * row_tiles;
    // (no tiles when M < 8: all columns are the scalar tail)
    const int64_t lines_per_tile =
        tiles > 0 ? (next_rows * ldb * int64_t(sizeof(float)) / 64 + tiles - 1) / tiles : 0;
    const int64_t lines = next_rows > 0 ? std::min(lines_per_tile, kn) : 0;
    const char* next = reinterpret_cast<const char*>(b + (k0 + kn) * ldb);
    int64_t tile = 0;
    for (int64_t j = 0; j < vec_cols; j += strip_width(j, vec_cols)) {
      const int64_t cols = strip_width(j, vec_cols);
      for (int64_t t = 0; t < row_tiles; ++t, ++tile) {
        const int64_t r = n * t / row_tiles;  // tile t: rows [r, n * (t + 1) / row_tiles)
        const int mb = static_cast<int>(n * (t + 1) / row_tiles - r);
        const float* ar[kTileRows];
        for (int m = 0; m < mb; ++m) ar[m] = a + (r + m) * lda + k0;
        const Prefetch pf{next + tile * lines_per_tile * 64, 64, lines, /*l2_only=*/true};
        run_tile(mb, static_cast<int>(cols / kTileLanes), ar, 1, strip(j, kn), cols, kn, pf,
                 [&](int m, int c, V8 v) {
                   float* dst = out + (r + m) * ldo + j + c * kTileLanes;
                   if (k0 > 0) v += vload<kTileLanes>(dst);
                   std::memcpy(dst, &v, sizeof(v));
                 });
      }
    }
  }
  for (int64_t j = vec_cols; j < M; ++j)
    for (int64_t r = 0; r < n; ++r) {
      float sum = 0.0f;
      for (int64_t i = 0; i < K; ++i) sum += a[r * lda + i] * b[i * ldb + j];
      out[r * ldo + j] = sum;
    }
}

// out[M, K] = a[n, M]^T @ b[n, K] (a weight gradient: n is the expert's rows). Tiles of 6 output rows walk their
// rows left to right, so the output is written once, in order, with ordinary stores. Non-temporal stores, which skip
// reading each line first, lost here: 64 [32, 512]^T x [32, 512] GEMMs into 64 experts' outputs (64 MiB), AVX2 EPYC,
// best of 7: 2 threads 9.9 ms streamed against 7.2-8.3 ms ordinary, 1 thread 18.0-19.1 against 14.0-14.7 ms; in the
// op, T256 H512 F256 E64 k8 fp32 fwd+bwd, medians of 41 and 61 interleaved calls: 46.65 -> 43.86 and 47.12 -> 45.52
// ms. (The few-rows tn kernel, small_gemm.h, writes a row at a time and keeps them.)
__attribute__((noinline)) void tile_tn(const float* a, int64_t lda, int64_t n, const float* b, int64_t ldb, int64_t M,
                                      int64_t K, float* out, int64_t ldo) {
  // Both operands packed first (their rows, too, are often a power of two apart): a as [M / 6][n][6] blocks, the 6
  // columns of one tile's broadcasts row after row, and b as contiguous [n][16] strips (then one [n][8] strip), in
  // column order. a's blocks are copied 6 floats at a time; a scalar transpose of a to [M][n] took 9% of the kernel
  // (T256 H512 F256 E64 k8 fwd+bwd, 2 threads, medians of 41 interleaved calls: 42.9 ms before, 41.2 ms after).
  thread_local std::vector<float> a_buf, b_buf;
  const int64_t a_blocks = (M + kTileRows - 1) / kTileRows;
  float* const a_pack = scratch(a_buf, a_blocks * kTileRows * n);
  float* const b_pack = scratch(b_buf, K * n);
  const int64_t whole = M - M % kTileRows;
  for (int64_t r = 0; r < n; ++r) {
    const float* ar = a + r * lda;
    for (int64_t j = 0; j < whole; j += kTileRows)
      std::memcpy(a_pack + j * n + r * kTileRows, ar + j, sizeof(float) * kTileRows);  // a constant size: 2 moves
    for (int64_t m = whole; m < M; ++m) a_pack[whole * n + r * kTileRows + m - whole] = ar[m];
  }
  const int64_t vec_cols = K - K % kTileLanes;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < vec_cols; c += strip_width(c, vec_cols)) {
      const int64_t cols = strip_width(c, vec_cols);
      for (int64_t v = 0; v < cols; v += kTileLanes)
        vstore(b_pack + c * n + r * cols + v, vload<kTileLanes>(b + r * ldb + c + v));
    }
  for (int64_t j = 0; j < M; j += kTileRows) {
    const int mb = static_cast<int>(std::min<int64_t>(kTileRows, M - j));
    // column j + m of a at step r: a_pack[j * n + r * 6 + m]
    const float* ac[kTileRows];
    for (int m = 0; m < mb; ++m) ac[m] = a_pack + j * n + m;
    for (int64_t c = 0; c < vec_cols; c += strip_width(c, vec_cols)) {
      const int64_t cols = strip_width(c, vec_cols);
      run_tile(mb, static_cast<int>(cols / kTileLanes), ac, kTileRows, b_pack + c * n, cols, n, Prefetch{},
               [&](int m, int v, V8 acc) { std::memcpy(out + (j + m) * ldo + c + v * kTileLanes, &acc, sizeof(acc)); });
    }
    for (int64_t c = vec_cols; c < K; ++c)
      for (int m = 0; m < mb; ++m) {
        float sum = 0.0f;
        for (int64_t r = 0; r < n; ++r) sum += ac[m][r * kTileRows] * b[r * ldb + c];
        out[(j + m) * ldo + c] = sum;
      }
  }
}

#if H3F_HAVE_NARROW_TILES
#pragma GCC pop_options
#endif

}  // namespace
}  // namespace h3fusion::cpu
