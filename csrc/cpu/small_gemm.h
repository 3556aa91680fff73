// GEMMs with a handful of rows on one side, for experts that got few tokens (decode, or many experts): the three
// forms the expert FFN needs, in fp32 and bf16, each streaming the weight (or the weight gradient) once with fp32
// accumulation and one rounding per output.
//
//   linear_into     out[n, M] = a[n, K] @ w[M, K]^T     forward projections          (dot-product form)
//   matmul_into     out[n, M] = a[n, K] @ b[K, M]        U = dY W_down, dX = dH W_gu  (row-axpy form)
//   matmul_tn_into  out[M, K] = a[n, M]^T @ b[n, K]      weight gradients             (outer-product form)
//
// Why: BLAS (MKL, oneDNN for bf16) packs the whole weight matrix before it multiplies, which for 1-8 rows costs
// several times streaming the weight once, plus a fixed cost per call that a decode step with 64 experts pays
// hundreds of times. Above kSmallGemmMaxRows rows (or for fp16/fp64, or strided layouts) each function calls
// at::mm_out. The choice depends on the shape only, never on the thread count, so results are bitwise the same at any
// number of threads. The kernels are single-threaded: they run inside a thread's group of experts, or on experts
// too small for threads to pay. Each kernel is compiled for three ISA levels (row_passes.h); every lane does the same
// operations, so the result does not depend on the level.
#pragma once

#include "row_passes.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

namespace h3fusion::cpu {
namespace {

constexpr int64_t kSmallGemmMaxRows = 8;
// Weights are one long stream; hardware prefetchers stop at 4 KiB page edges, so the dot-product kernel asks for the
// line 8 KiB ahead (a hint: past the end of the tensor it is simply dropped).
constexpr int64_t kPrefetchBytes = 8192;

// Sum of the 16 lanes as a fixed pairwise tree (the same order every call).
H3F_INLINE float hsum(vfloat v) {
  float t[kLanes];
  std::memcpy(t, &v, sizeof(v));
  for (int64_t half = kLanes / 2; half >= 1; half /= 2)
    for (int64_t l = 0; l < half; ++l) t[l] += t[l + half];
  return t[0];
}

// ---- dot-product form: out[r, j] = a[r, :] . w[j, :] --------------------------------------------------------------
// NB rows of a against one weight row: lane l sums the elements i = l (mod 16), then the lanes are added in a fixed
// tree, then the scalar tail.
template <int NB, typename scalar_t>
H3F_INLINE void dot_rows(const scalar_t* __restrict__ a, int64_t lda, const scalar_t* __restrict__ wj, int64_t K,
                         scalar_t* out, int64_t ldo) {
  vfloat acc[NB] = {};
  int64_t i = 0;
  for (; i + kLanes <= K; i += kLanes) {
    __builtin_prefetch(reinterpret_cast<const char*>(wj + i) + kPrefetchBytes, 0, 0);
    const vfloat wv = vload(wj + i);
    for (int r = 0; r < NB; ++r) acc[r] += wv * vload(a + r * lda + i);
  }
  for (int r = 0; r < NB; ++r) {
    float sum = hsum(acc[r]);
    for (int64_t t = i; t < K; ++t) sum += float(wj[t]) * float(a[r * lda + t]);
    out[r * ldo] = scalar_t(sum);
  }
}

template <typename scalar_t>
H3F_ROW_FN void small_nt(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* w, int64_t M, int64_t K,
                         scalar_t* out, int64_t ldo) {
  for (int64_t j = 0; j < M; ++j) {
    const scalar_t* wj = w + j * K;
    int64_t r = 0;
    for (; r + 4 <= n; r += 4) dot_rows<4>(a + r * lda, lda, wj, K, out + r * ldo + j, ldo);
    switch (n - r) {
      case 3: dot_rows<3>(a + r * lda, lda, wj, K, out + r * ldo + j, ldo); break;
      case 2: dot_rows<2>(a + r * lda, lda, wj, K, out + r * ldo + j, ldo); break;
      case 1: dot_rows<1>(a + r * lda, lda, wj, K, out + r * ldo + j, ldo); break;
      default: break;
    }
  }
}

// ---- row-axpy form: out[r, :] = sum_i a[r, i] * b[i, :] --------------------------------------------------------
// A block of NC vectors of output columns for all NB rows stays in registers while b's rows stream past; every
// output element sums i in ascending order.
template <int NB, int NC, typename scalar_t>
H3F_INLINE void axpy_block(const scalar_t* __restrict__ a, int64_t lda, const scalar_t* __restrict__ b, int64_t ldb,
                           int64_t K, scalar_t* out, int64_t ldo) {
  vfloat acc[NB][NC] = {};
  for (int64_t i = 0; i < K; ++i) {
    vfloat bv[NC];
    for (int c = 0; c < NC; ++c) bv[c] = vload(b + i * ldb + c * kLanes);
    for (int r = 0; r < NB; ++r) {
      const float s = float(a[r * lda + i]);
      for (int c = 0; c < NC; ++c) acc[r][c] += s * bv[c];
    }
  }
  for (int r = 0; r < NB; ++r)
    for (int c = 0; c < NC; ++c) vstore(out + r * ldo + c * kLanes, acc[r][c]);
}

template <int NB, typename scalar_t>
H3F_INLINE void axpy_rows(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, int64_t K, int64_t M,
                          scalar_t* out, int64_t ldo) {
  int64_t j = 0;
  for (; j + 2 * kLanes <= M; j += 2 * kLanes) axpy_block<NB, 2>(a, lda, b + j, ldb, K, out + j, ldo);
  for (; j + kLanes <= M; j += kLanes) axpy_block<NB, 1>(a, lda, b + j, ldb, K, out + j, ldo);
  for (; j < M; ++j)
    for (int r = 0; r < NB; ++r) {
      float sum = 0.0f;
      for (int64_t i = 0; i < K; ++i) sum += float(a[r * lda + i]) * float(b[i * ldb + j]);
      out[r * ldo + j] = scalar_t(sum);
    }
}

template <typename scalar_t>
H3F_ROW_FN void small_nn(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* b, int64_t ldb, int64_t K,
                         int64_t M, scalar_t* out, int64_t ldo) {
  // Up to 8 rows in one pass over b (16 accumulator vectors: the register file of AVX-512).
  switch (n) {
    case 8: return axpy_rows<8>(a, lda, b, ldb, K, M, out, ldo);
    case 7: return axpy_rows<7>(a, lda, b, ldb, K, M, out, ldo);
    case 6: return axpy_rows<6>(a, lda, b, ldb, K, M, out, ldo);
    case 5: return axpy_rows<5>(a, lda, b, ldb, K, M, out, ldo);
    case 4: return axpy_rows<4>(a, lda, b, ldb, K, M, out, ldo);
    case 3: return axpy_rows<3>(a, lda, b, ldb, K, M, out, ldo);
    case 2: return axpy_rows<2>(a, lda, b, ldb, K, M, out, ldo);
    case 1: return axpy_rows<1>(a, lda, b, ldb, K, M, out, ldo);
    default: return;
  }
}

// ---- outer-product form: out[j, :] = sum_r a[r, j] * b[r, :] -----------------------------------------------------
// The n rows of b stay in L1 while the output (a weight gradient) is written once, row by row; every element sums r
// in ascending order.
template <typename scalar_t>
H3F_ROW_FN void small_tn(const scalar_t* a, int64_t lda, int64_t n, const scalar_t* b, int64_t ldb, int64_t M,
                         int64_t K, scalar_t* out, int64_t ldo) {
  float s[kSmallGemmMaxRows];
  for (int64_t j = 0; j < M; ++j) {
    for (int64_t r = 0; r < n; ++r) s[r] = float(a[r * lda + j]);
    scalar_t* oj = out + j * ldo;
    int64_t c = 0;
    for (; c + kLanes <= K; c += kLanes) {
      vfloat acc{};
      for (int64_t r = 0; r < n; ++r) acc += s[r] * vload(b + r * ldb + c);
      vstore(oj + c, acc);
    }
    for (; c < K; ++c) {
      float sum = 0.0f;
      for (int64_t r = 0; r < n; ++r) sum += s[r] * float(b[r * ldb + c]);
      oj[c] = scalar_t(sum);
    }
  }
}

// True when the small kernels take this GEMM: few rows, fp32 or bf16, unit stride along the inner dimension of every
// operand (rows may be strided, as the activation written over the gate half of the pre-activation is).
H3F_INLINE bool small_gemm_applies(int64_t rows, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto dt = a.scalar_type();
  return rows <= kSmallGemmMaxRows && (dt == at::kFloat || dt == at::kBFloat16) && b.scalar_type() == dt &&
         out.scalar_type() == dt && a.stride(1) == 1 && b.stride(1) == 1 && out.stride(1) == 1;
}

// fn(scalar_t{}) for fp32 or bf16 (the dtypes small_gemm_applies admits).
template <typename Fn>
H3F_INLINE void dispatch_small(at::ScalarType dt, const Fn& fn) {
  if (dt == at::kFloat) {
    fn(float{});
  } else {
    fn(c10::BFloat16{});
  }
}

// out[n, M] = a[n, K] @ w[M, K]^T, written into a view.
[[maybe_unused]] void linear_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& w) {
  if (small_gemm_applies(a.size(0), out, a, w)) {
    dispatch_small(a.scalar_type(), [&](auto zero) {
      using scalar_t = decltype(zero);
      small_nt(a.const_data_ptr<scalar_t>(), a.stride(0), a.size(0), w.const_data_ptr<scalar_t>(), w.size(0),
               w.size(1), out.mutable_data_ptr<scalar_t>(), out.stride(0));
    });
    return;
  }
  at::mm_out(const_cast<at::Tensor&>(out), a, w.t());
}

// out[n, M] = a[n, K] @ b[K, M], written into a view.
[[maybe_unused]] void matmul_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (small_gemm_applies(a.size(0), out, a, b)) {
    dispatch_small(a.scalar_type(), [&](auto zero) {
      using scalar_t = decltype(zero);
      small_nn(a.const_data_ptr<scalar_t>(), a.stride(0), a.size(0), b.const_data_ptr<scalar_t>(), b.stride(0),
               b.size(0), b.size(1), out.mutable_data_ptr<scalar_t>(), out.stride(0));
    });
    return;
  }
  at::mm_out(const_cast<at::Tensor&>(out), a, b);
}

// out[M, K] = a[n, M]^T @ b[n, K], written into a view (a weight gradient: n is the expert's rows).
[[maybe_unused]] void matmul_tn_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (small_gemm_applies(a.size(0), out, a, b)) {
    dispatch_small(a.scalar_type(), [&](auto zero) {
      using scalar_t = decltype(zero);
      small_tn(a.const_data_ptr<scalar_t>(), a.stride(0), a.size(0), b.const_data_ptr<scalar_t>(), b.stride(0),
               a.size(1), b.size(1), out.mutable_data_ptr<scalar_t>(), out.stride(0));
    });
    return;
  }
  at::mm_out(const_cast<at::Tensor&>(out), a.t(), b);
}

}  // namespace
}  // namespace h3fusion::cpu
