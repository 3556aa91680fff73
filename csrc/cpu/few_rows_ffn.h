// The expert FFN forward when every expert has at most kSmallGemmMaxRows rows (decode): work split by weight rows.
//
// Why: with so few rows each GEMM streams its expert's weights once, and costs about that whatever its row count. One
// group of experts per thread then balances by expert count: in the runner's T4 k2 E8 case 7 experts are active, 4 on
// one thread and 3 on the other, and the second thread waits a quarter of the call. Here the threads share out units
// of weight rows instead: phase 1 (expert, block of F columns): both halves of the gate/up GEMM for those columns
// and their activation; phase 2 (expert, block of H columns) of the down GEMM. Every unit costs about the same, so
// the threads finish together (A/B, T4 bf16 forward, medians of 300 interleaved calls: 6-12% faster).
// Results: every output element is one small_nt sum (small_gemm.h) whichever unit computes it, and activation blocks
// start at multiples of 16 columns, so the vector/scalar split of each row is the whole row's: the output is bitwise
// that of the expert-per-thread path, at any thread count.
#pragma once

#include "row_passes.h"
#include "small_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace h3fusion::cpu {
namespace {

// Columns per unit: a multiple of 16 (whole vectors at any width) and of kTileW; 64 rows of a 512-wide bf16 weight is
// 64 KiB streamed per GEMM, long enough to amortise a unit's start, short enough for tens of units per expert.
constexpr int64_t kFewRowsUnitCols = 64;

// x[T, H], w_gu[E, 2F, H], w_down[E, H, F] contiguous, scalar_t; sp/off the route plan (rows sorted by expert);
// h[R, 2F]: receives the pre-activation (the saved buffer), or scratch whose gate half takes the activation when
// `act` is null; act[R, F] (optional): the activation. Returns down_out[R, H]: each sorted row's expert output, not
// yet weighted (combine_rows does that).
template <typename scalar_t>
at::Tensor few_rows_ffn(const at::Tensor& x, const at::Tensor& w_gu, const at::Tensor& w_down, const int32_t* sp,
                        const int64_t* off, int64_t k, const at::Tensor& h, const at::Tensor& act,
                        Activation activation) {
  const int64_t E = w_gu.size(0), F = w_down.size(2), H = x.size(1), R = off[E];
  at::Tensor xs = at::empty({R, H}, x.options());
  gather_into(xs, x, sp, R, k);
  at::Tensor down_out = at::empty({R, H}, x.options());
  const scalar_t* xp = xs.const_data_ptr<scalar_t>();
  const scalar_t* gup = w_gu.const_data_ptr<scalar_t>();
  const scalar_t* dnp = w_down.const_data_ptr<scalar_t>();
  scalar_t* hp = h.mutable_data_ptr<scalar_t>();
  scalar_t* ap = act.defined() ? act.mutable_data_ptr<scalar_t>() : hp;  // activation rows: own buffer or gate half
  const int64_t lda = act.defined() ? F : 2 * F;
  scalar_t* op = down_out.mutable_data_ptr<scalar_t>();

  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] > off[e]) active.push_back(e);
  const int64_t n_active = static_cast<int64_t>(active.size());
  const int64_t blocks_f = (F + kFewRowsUnitCols - 1) / kFewRowsUnitCols;
  const int64_t blocks_h = (H + kFewRowsUnitCols - 1) / kFewRowsUnitCols;

  at::parallel_for(0, n_active * blocks_f, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t e = active[u / blocks_f], r0 = off[e], n = off[e + 1] - r0;
      const int64_t f0 = (u % blocks_f) * kFewRowsUnitCols, cols = std::min(kFewRowsUnitCols, F - f0);
      const scalar_t* w = gup + e * 2 * F * H;
      small_nt_pair(xp + r0 * H, H, n, w + f0 * H, w + (F + f0) * H, cols, H, hp + r0 * 2 * F + f0,
                    hp + r0 * 2 * F + F + f0, 2 * F);
      for (int64_t r = r0; r < r0 + n; ++r)
        gated_row(hp + r * 2 * F + f0, hp + r * 2 * F + F + f0, ap + r * lda + f0, cols, activation);
    }
  });
  at::parallel_for(0, n_active * blocks_h, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t e = active[u / blocks_h], r0 = off[e], n = off[e + 1] - r0;
      const int64_t c0 = (u % blocks_h) * kFewRowsUnitCols, cols = std::min(kFewRowsUnitCols, H - c0);
      // the unit's two halves as a pair (two weight streams), and an odd last column alone
      const scalar_t* w = dnp + e * H * F + c0 * F;
      const int64_t half = cols / 2;
      scalar_t* o = op + r0 * H + c0;
      if (half > 0) small_nt_pair(ap + r0 * lda, lda, n, w, w + half * F, half, F, o, o + half, H);
      if (cols % 2) small_nt(ap + r0 * lda, lda, n, w + (cols - 1) * F, 1, F, o + cols - 1, H);
    }
  });
  return down_out;
}

}  // namespace
}  // namespace h3fusion::cpu
