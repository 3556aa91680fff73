// CPU row passes of the expert FFN, shared by the moe_ffn kernels (moe_ffn.cpp) and the LoRA-expert kernels:
// the gated activation act(gate) * up (forward and backward, see h3fusion/activation.h for the math), the gather of
// token rows into expert order and the weighted accumulation of expert rows into tokens.
//
// fp32 and bf16 rows run on GCC vector-extension types of one register's width (16 floats with AVX-512, else 8;
// see Vec below), so that the selects of exp/sigmoid and the bf16 rounding vectorise whatever the compiler's
// auto-vectoriser decides; each row function is compiled for three ISA levels (the loader picks the best). fp64
// (tests, gradcheck) and fp16 run a scalar loop.
// Everything here has internal linkage (one copy per translation unit, as the ISA clones need).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <h3fusion/activation.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__x86_64__)
#include <emmintrin.h>  // SSE2 (streaming stores), part of every x86-64 ISA level
#endif

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define H3F_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define H3F_ISA_CLONES
#endif

namespace h3fusion::cpu {
namespace {

// ---- vector math --------------------------------------------------------------------------------------------
#define H3F_INLINE inline __attribute__((always_inline))
#define H3F_ROW_FN __attribute__((noinline)) H3F_ISA_CLONES

// The vector kernels are templates on their lane count L: a vector of L floats must fit the CPU's registers, or GCC
// lowers every operation through the stack. 16 lanes (one AVX-512 register) on CPUs with x86-64-v4; 8 (one AVX2
// register) on other x86-64 CPUs, where 16-lane code ran 3-8x slower than BLAS (measured on an AVX2-only EPYC: the
// v3 clone of small_nt spent 40% of its time storing vectors to the stack and reloading their halves); 4 without
// ISA clones. Every row function (H3F_ROW_FN) picks L at run time by wide_vectors(), the test GCC's clone resolver
// makes, so each clone runs the width it was built for. Results depend on L (the lanes a dot product sums in), so on
// the CPU, never on the thread count.
template <int L>
struct Vec {
  typedef float f __attribute__((vector_size(4 * L)));
  typedef int32_t i __attribute__((vector_size(4 * L)));
  typedef uint32_t u __attribute__((vector_size(4 * L)));
  typedef uint16_t h __attribute__((vector_size(2 * L)));
};
template <typename V>
constexpr int kLanesOf = int(sizeof(V) / sizeof(float));

constexpr int kWideLanes = 16;
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
constexpr int kNarrowLanes = 8;
#else
constexpr int kNarrowLanes = 4;
#endif

// H3FUSION_CPU_ISA=avx2 runs the kernels as on a CPU without AVX-512 (8-lane vectors, no bf16 dot products), so that
// tests on an AVX-512 machine cover the AVX2 paths too. Read once.
inline bool cpu_isa_capped_at_avx2() {
  static const bool capped = [] {
    const char* env = std::getenv("H3FUSION_CPU_ISA");
    if (env == nullptr || *env == '\0') return false;
    TORCH_CHECK(std::string(env) == "avx2", "H3FUSION_CPU_ISA must be 'avx2' or unset, got '", env, "'");
    return true;
  }();
  return capped;
}

H3F_INLINE bool wide_vectors() {
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
  static const bool wide = [] {
    if (cpu_isa_capped_at_avx2()) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4") > 0;
  }();
  return wide;
#else
  return false;
#endif
}

// The AVX-512 width, which bf16_tiles.h's VDPBF16PS kernels use throughout.
constexpr int64_t kLanes = kWideLanes;
// The 64-byte vector types never cross a call boundary of another translation unit: GCC's ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef Vec<kWideLanes>::f vfloat;
typedef Vec<kWideLanes>::i vint;
typedef Vec<kWideLanes>::u vuint;
typedef Vec<kWideLanes>::h vhalfword;

template <typename scalar_t>
constexpr bool kVectorRows = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

template <typename V = vfloat>
H3F_INLINE V splat(float v) {
  return V{} + v;
}

// exp(x) with x clamped to [-87, 88]: Cody-Waite reduction x = n ln2 + r, a degree-6 polynomial for e^r (Cephes
// coefficients), 2^n built in the exponent bits. Relative error about 1e-7.
template <typename V>
H3F_INLINE V vexp(V x) {
  using VI = typename Vec<kLanesOf<V>>::i;
  x = x < splat<V>(-87.0f) ? splat<V>(-87.0f) : x;
  x = x > splat<V>(88.0f) ? splat<V>(88.0f) : x;
  const V t = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln2) in the low mantissa bits
  const V n = t - 12582912.0f;
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI bits = (((VI)t) - 0x4B400000 + 127) << 23;
  return p * (V)bits;
}

template <typename V>
H3F_INLINE V vsigmoid(V g) {
  return 1.0f / (1.0f + vexp(-g));
}

// Phi(g), the standard normal CDF, from erfc(z) = t exp(-z^2 + poly(t)), t = 1 / (1 + z/2), z = |g| / sqrt(2)
// (Chebyshev fit with fractional error below 1.2e-7 for every z >= 0): the small tail is computed directly, so
// Phi keeps its relative accuracy for negative g instead of losing it to 1 - erf cancellation.
template <typename V>
H3F_INLINE V vnormcdf(V g) {
  const V z = (g < splat<V>(0.0f) ? -g : g) * float(kInvSqrt2);
  const V t = 1.0f / (1.0f + 0.5f * z);
  V p = splat<V>(0.17087277f);
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const V half_erfc = 0.5f * t * vexp(p - z * z);
  return g < splat<V>(0.0f) ? half_erfc : 1.0f - half_erfc;
}

// act(g) = g * P(g): P and P' for each activation (h3fusion/activation.h).
template <typename V>
H3F_INLINE V vgate_p(V g, Activation a) {
  switch (a) {
    case Activation::kGelu: return vnormcdf(g);
    case Activation::kGeluTanh:
      return vsigmoid(float(kGeluTanhScale) * (g + float(kGeluTanhCubic) * g * g * g));
    default: return vsigmoid(g);
  }
}
template <typename V>
H3F_INLINE V vgate_dp(V g, V P, Activation a) {
  switch (a) {
    case Activation::kGelu: return float(kInvSqrt2Pi) * vexp(-0.5f * g * g);
    case Activation::kGeluTanh:
      return P * (1.0f - P) * float(kGeluTanhScale) * (1.0f + float(3 * kGeluTanhCubic) * g * g);
    default: return P * (1.0f - P);
  }
}

// L floats from p (fp32, or bf16 widened).
template <int L = kWideLanes, typename scalar_t>
H3F_INLINE typename Vec<L>::f vload(const scalar_t* p) {
  typename Vec<L>::f v;
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    typename Vec<L>::h h;
    std::memcpy(&h, p, sizeof(h));
    v = (typename Vec<L>::f)(__builtin_convertvector(h, typename Vec<L>::u) << 16);
  }
  return v;
}

// The bytes vstore writes for L floats: the vector itself (fp32), or L bf16 rounded to nearest even with NaN kept NaN
// (c10::BFloat16's rounding).
template <typename scalar_t, typename V>
H3F_INLINE auto vstore_bytes(V v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return v;
  } else {
    using VU = typename Vec<kLanesOf<V>>::u;
    const VU u = (VU)v;
    const VU rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const VU bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? VU{} + 0x7FC0u : rounded;
    return __builtin_convertvector(bits, typename Vec<kLanesOf<V>>::h);
  }
}
template <typename scalar_t, typename V>
H3F_INLINE void vstore(scalar_t* p, V v) {
  const auto bytes = vstore_bytes<scalar_t>(v);
  std::memcpy(p, &bytes, sizeof(bytes));
}

// vstore with non-temporal stores, for an output written once and not read again soon (a weight gradient): the lines
// bypass the cache and are not first read in, as a plain store's are, so writing memory-bound output moves half the
// bytes. 16-byte SSE2 stores, which every x86-64 ISA level (so every clone) has; the write-combining buffers still
// fill whole lines, since each row is written front to back. p must be 16-byte aligned; end with stream_fence().
template <typename scalar_t, typename V>
H3F_INLINE void vstore_stream(scalar_t* p, V v) {
  const auto bytes = vstore_bytes<scalar_t>(v);
#if defined(__x86_64__)
  if constexpr (sizeof(bytes) % 16 == 0) {
    for (size_t i = 0; i < sizeof(bytes); i += 16) {
      __m128i chunk;
      std::memcpy(&chunk, reinterpret_cast<const char*>(&bytes) + i, 16);
      _mm_stream_si128(reinterpret_cast<__m128i*>(reinterpret_cast<char*>(p) + i), chunk);
    }
    return;
  }
#endif
  std::memcpy(p, &bytes, sizeof(bytes));
}
// vstore_stream where `stream` (the caller checked its alignment), else vstore: the store of the weight-gradient
// kernels (small_gemm.h, bf16_tiles.h), whose output goes out non-temporal where that paid.
template <typename scalar_t, typename V>
H3F_INLINE void vstore_out(scalar_t* p, V v, bool stream) {
  if (stream) {
    vstore_stream(p, v);
  } else {
    vstore(p, v);
  }
}

// Orders the streamed stores before whatever follows (another thread reading the output).
H3F_INLINE void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Prefetch distances of the GEMM kernels (small_gemm.h, bf16_tiles.h's row-axpy form; its packed-rows form fetches the
// strip after next instead). A weight read as one long stream: hardware prefetchers stop at 4 KiB page edges, so the
// dot-product kernels ask for the line 8 KiB ahead. A strip walked down the rows of b (a page every row or two, which
// the prefetchers do not follow): the row 12 ahead, measured 20-25% faster than 4 on a T4 E8 bf16 backward (24: no
// better). Hints only: past the end of a tensor they are dropped.
constexpr int64_t kPrefetchBytes = 8192;
constexpr int64_t kStripPrefetchRows = 12;

// Folds the L accumulators v[0..L-1] (of small_gemm.h's dot-product tiles) so that lane q of the result is the sum
// of v[q]'s lanes: each level adds the lanes of pairs of vectors S apart (S = L/2, ..., 1), halving the vectors.
// Lanes of (x, y) taken pairwise at level S: lo(q) = 2S (q / S) + q % S, and lo(q) + S.
template <int L, int S>
constexpr std::array<int32_t, L> fold_index() {
  std::array<int32_t, L> lo{};
  for (int q = 0; q < L; ++q) lo[q] = 2 * S * (q / S) + q % S;
  return lo;
}

template <int S, typename V>
H3F_INLINE V fold_from(V* v) {
  using VI = typename Vec<kLanesOf<V>>::i;
  static constexpr std::array<int32_t, kLanesOf<V>> kIndex = fold_index<kLanesOf<V>, S>();  // a constant vector
  VI lo;
  std::memcpy(&lo, kIndex.data(), sizeof(lo));
  for (int q = 0; q < S; ++q)
    v[q] = __builtin_shuffle(v[2 * q], v[2 * q + 1], lo) + __builtin_shuffle(v[2 * q], v[2 * q + 1], lo + S);
  if constexpr (S == 1) {
    return v[0];
  } else {
    return fold_from<S / 2>(v);
  }
}

template <typename V>
H3F_INLINE V fold_lanes(V* v) {
  return fold_from<kLanesOf<V> / 2>(v);
}

// Rounds to scalar_t and back (what a stored and reloaded value is).
template <typename scalar_t, typename V>
H3F_INLINE V vround(V v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return v;
  } else {
    scalar_t tmp[kLanesOf<V>];
    vstore(tmp, v);
    return vload<kLanesOf<V>>(tmp);
  }
}

// Scalar twins for the tails and for fp64/fp16.
inline float sigmoid(float g) {
  const float x = std::fmin(std::fmax(-g, -87.0f), 88.0f);
  return 1.0f / (1.0f + std::exp(x));
}
inline double sigmoid(double g) { return 1.0 / (1.0 + std::exp(-g)); }

template <typename acc_t>
inline acc_t gate_p(acc_t g, Activation a) {
  switch (a) {
    case Activation::kGelu: return acc_t(0.5) * std::erfc(-g * acc_t(kInvSqrt2));
    case Activation::kGeluTanh: return sigmoid(acc_t(kGeluTanhScale) * (g + acc_t(kGeluTanhCubic) * g * g * g));
    default: return sigmoid(g);
  }
}
template <typename acc_t>
inline acc_t gate_dp(acc_t g, acc_t P, Activation a) {
  switch (a) {
    case Activation::kGelu: return acc_t(kInvSqrt2Pi) * std::exp(acc_t(-0.5) * g * g);
    case Activation::kGeluTanh:
      return P * (acc_t(1) - P) * acc_t(kGeluTanhScale) * (acc_t(1) + acc_t(3 * kGeluTanhCubic) * g * g);
    default: return P * (acc_t(1) - P);
  }
}

template <typename scalar_t>
H3F_INLINE at::opmath_type<scalar_t> load(scalar_t v) {
  return static_cast<at::opmath_type<scalar_t>>(v);
}
template <typename scalar_t>
H3F_INLINE scalar_t store(at::opmath_type<scalar_t> v) {
  return static_cast<scalar_t>(v);
}

// ---- gated activation rows ----------------------------------------------------------------------------------
// Each row function runs its body at the lane count of the CPU (wide_vectors(): every clone runs its own width).
// H3F_BY_LANES(fn, (args...), template args after L...) calls fn<L, ...>(args...). Direct calls, so that the
// always-inline bodies are inlined into (and compiled for) each clone; a call through a function pointer was not.
#define H3F_BY_LANES(fn, args, ...)                       \
  do {                                                    \
    if (wide_vectors()) {                                 \
      fn<kWideLanes __VA_OPT__(, ) __VA_ARGS__> args;     \
    } else {                                              \
      fn<kNarrowLanes __VA_OPT__(, ) __VA_ARGS__> args;   \
    }                                                     \
  } while (0)

// out[f] = act(g[f]) * u[f] for one row (out may be gate: then the activation overwrites the gate half in place;
// every element is read before it is written).
template <int L, typename scalar_t>
H3F_INLINE void gated_row_l(const scalar_t* gate, const scalar_t* up, scalar_t* out, int64_t F, Activation act) {
  using V = typename Vec<L>::f;
  int64_t f = 0;
  if constexpr (kVectorRows<scalar_t>) {
    for (; f + L <= F; f += L) {
      const V g = vload<L>(gate + f);
      vstore(out + f, g * vgate_p(g, act) * vload<L>(up + f));
    }
  }
  for (; f < F; ++f) {
    const auto g = load(gate[f]);
    out[f] = store<scalar_t>(g * gate_p(g, act) * load(up[f]));
  }
}
template <typename scalar_t>
H3F_ROW_FN void gated_row(const scalar_t* gate, const scalar_t* up, scalar_t* out, int64_t F, Activation act) {
  H3F_BY_LANES(gated_row_l, (gate, up, out, F, act), scalar_t);
}

// Backward of one row, with h = [g | u] the saved pre-activation, U = grad_y row @ W_down[e] and w the routing weight:
//   a = act(g) u;  grad_w = U . a;  dA = w U;  du = dA act(g);  dg = dA u act'(g),  act'(g) = P + g P' (act = g P).
// `ua` holds U on entry (when kDH or kGW) and the activation a on return (when kWriteA): read and written at the same
// index, so one buffer serves both. a is rounded to scalar_t before the dot product, as grad_down sees it. The dot
// product sums in L fixed lanes, then a fixed tree: the same order every run.
template <int L, typename scalar_t, bool kDH, bool kGW, bool kWriteA>
H3F_INLINE void gated_backward_row_l(const scalar_t* __restrict__ hr, scalar_t* ua, scalar_t* __restrict__ dr,
                                     at::opmath_type<scalar_t> w, at::opmath_type<scalar_t>* grad_w, int64_t F,
                                     Activation act) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<L>::f;
  acc_t dot = 0;
  int64_t f = 0;
  if constexpr (kVectorRows<scalar_t>) {
    V vdot{};
    for (; f + L <= F; f += L) {
      const V g = vload<L>(hr + f), u = vload<L>(hr + F + f);
      const V P = vgate_p(g, act), gp = g * P;
      const V a = vround<scalar_t>(gp * u);
      V U{};
      if constexpr (kDH || kGW) U = vload<L>(ua + f);
      if constexpr (kGW) vdot += U * a;
      if constexpr (kDH) {
        const V dA = w * U;
        vstore(dr + f, dA * u * (P + g * vgate_dp(g, P, act)));
        vstore(dr + F + f, dA * gp);
      }
      if constexpr (kWriteA) vstore(ua + f, a);
    }
    if constexpr (kGW) {
      float lanes[L];
      std::memcpy(lanes, &vdot, sizeof(lanes));
      for (int64_t half = L / 2; half >= 1; half /= 2)
        for (int64_t l = 0; l < half; ++l) lanes[l] += lanes[l + half];
      dot = lanes[0];
    }
  }
  for (; f < F; ++f) {
    const acc_t g = load(hr[f]), u = load(hr[F + f]);
    const acc_t P = gate_p(g, act), gp = g * P;
    const acc_t a = load(store<scalar_t>(gp * u));
    acc_t U = 0;
    if constexpr (kDH || kGW) U = load(ua[f]);
    if constexpr (kGW) dot += U * a;
    if constexpr (kDH) {
      const acc_t dA = w * U;
      dr[f] = store<scalar_t>(dA * u * (P + g * gate_dp(g, P, act)));
      dr[F + f] = store<scalar_t>(dA * gp);
    }
    if constexpr (kWriteA) ua[f] = store<scalar_t>(a);
  }
  if constexpr (kGW) *grad_w = dot;
}
template <typename scalar_t, bool kDH, bool kGW, bool kWriteA>
H3F_ROW_FN void gated_backward_row(const scalar_t* __restrict__ hr, scalar_t* ua, scalar_t* __restrict__ dr,
                                   at::opmath_type<scalar_t> w, at::opmath_type<scalar_t>* grad_w, int64_t F,
                                   Activation act) {
  H3F_BY_LANES(gated_backward_row_l, (hr, ua, dr, w, grad_w, F, act), scalar_t, kDH, kGW, kWriteA);
}

// g[i] *= w, rounded once.
template <int L, typename scalar_t>
H3F_INLINE void scale_row_l(scalar_t* __restrict__ g, at::opmath_type<scalar_t> w, int64_t n) {
  int64_t i = 0;
  if constexpr (kVectorRows<scalar_t>)
    for (; i + L <= n; i += L) vstore(g + i, w * vload<L>(g + i));
  for (; i < n; ++i) g[i] = store<scalar_t>(w * load(g[i]));
}
template <typename scalar_t>
H3F_ROW_FN void scale_row(scalar_t* __restrict__ g, at::opmath_type<scalar_t> w, int64_t n) {
  H3F_BY_LANES(scale_row_l, (g, w, n), scalar_t);
}

// dst[i] += w * src[i] in the accumulation dtype.
template <int L, typename scalar_t, typename acc_t>
H3F_INLINE void accumulate_row_l(acc_t* __restrict__ dst, const scalar_t* __restrict__ src, acc_t w, int64_t n) {
  int64_t i = 0;
  if constexpr (kVectorRows<scalar_t>) {
    for (; i + L <= n; i += L) {
      typename Vec<L>::f d;
      std::memcpy(&d, dst + i, sizeof(d));
      d += w * vload<L>(src + i);
      std::memcpy(dst + i, &d, sizeof(d));
    }
  }
  for (; i < n; ++i) dst[i] += w * load(src[i]);
}
template <typename scalar_t, typename acc_t>
H3F_ROW_FN void accumulate_row(acc_t* __restrict__ dst, const scalar_t* __restrict__ src, acc_t w, int64_t n) {
  H3F_BY_LANES(accumulate_row_l, (dst, src, w, n), scalar_t, acc_t);
}

// out[r, :] = act(h[r, :F]) * h[r, F:] for n rows of h[n, 2F]; out == h writes the activation over the gate half.
template <typename scalar_t>
void gated_rows(scalar_t* h, scalar_t* out, int64_t ld_out, int64_t n, int64_t F, Activation act) {
  at::parallel_for(0, n, std::max<int64_t>(1, 8192 / std::max<int64_t>(F, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      scalar_t* hr = h + r * 2 * F;
      gated_row(hr, hr + F, out == h ? hr : out + r * ld_out, F, act);
    }
  });
}

// The backward row pass over the n rows of one expert (pointers at its first row): rows r of the expert are pairs
// sp[r] with routing weight w_pair[sp[r]]; grad_w_pair[sp[r]] gets the dot product; gy rows are scaled by w in place
// when `scale_gy` (for grad_down).
template <typename scalar_t, bool kDH, bool kGW, bool kWriteA>
void gated_backward_rows(const scalar_t* h, scalar_t* ua, scalar_t* dh, const int32_t* sp,
                         const at::opmath_type<scalar_t>* w_pair, at::opmath_type<scalar_t>* grad_w_pair,
                         scalar_t* gy, bool scale_gy, int64_t n, int64_t F, int64_t H, Activation act) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(F, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t p = sp[r];
      const acc_t w = w_pair[p];
      gated_backward_row<scalar_t, kDH, kGW, kWriteA>(h + r * 2 * F, ua + r * F, kDH ? dh + r * 2 * F : nullptr, w,
                                                      kGW ? grad_w_pair + p : nullptr, F, act);
      if (scale_gy) scale_row(gy + r * H, w, H);
    }
  });
}

// gated_backward_rows with the three flags chosen at run time: dh (write dH), gw (routing-weight dots), write_a
// (leave the activation in ua for grad_down).
template <typename scalar_t>
void gated_backward_dispatch(bool dh, bool gw, bool write_a, const scalar_t* h, scalar_t* ua, scalar_t* dhp,
                             const int32_t* sp, const at::opmath_type<scalar_t>* w_pair,
                             at::opmath_type<scalar_t>* grad_w_pair, scalar_t* gy, bool scale_gy, int64_t n,
                             int64_t F, int64_t H, Activation act) {
#define H3F_BWD(DH, GW, WA) \
  return gated_backward_rows<scalar_t, DH, GW, WA>(h, ua, dhp, sp, w_pair, grad_w_pair, gy, scale_gy, n, F, H, act)
  if (dh) {
    if (gw) {
      if (write_a) H3F_BWD(true, true, true);
      H3F_BWD(true, true, false);
    }
    if (write_a) H3F_BWD(true, false, true);
    H3F_BWD(true, false, false);
  }
  if (gw) {
    if (write_a) H3F_BWD(false, true, true);
    H3F_BWD(false, true, false);
  }
  H3F_BWD(false, false, true);  // only the activation (grad_down alone)
#undef H3F_BWD
}

// dst[i] = x[sp[i] / k] for n rows (dst contiguous [n, H]).
[[maybe_unused]]  // not every includer gathers this way
void gather_into(const at::Tensor& dst, const at::Tensor& x, const int32_t* sp, int64_t n, int64_t k) {
  const int64_t row_bytes = x.size(1) * x.element_size();
  const auto* src = static_cast<const char*>(x.const_data_ptr());
  auto* out = static_cast<char*>(dst.mutable_data_ptr());
  // A chunk copies at least 1 MiB: an expert block's gather is one memcpy loop, not a parallel region to wait on.
  at::parallel_for(0, n, std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(row_bytes, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::memcpy(out + i * row_bytes, src + (sp[i] / k) * row_bytes, row_bytes);
  });
}

// acc[t, :] += w_pair[p] * o[i, :] for the n rows i of a block, p = sp[i], t = p / k. Split by columns over threads
// (a token may hold two rows of one expert), so every element is summed in expert order: deterministic.
template <typename scalar_t, typename acc_t>
void accumulate_rows(acc_t* acc, const scalar_t* o, const int32_t* sp, const acc_t* w_pair, int64_t n, int64_t k,
                     int64_t H) {
  // A chunk sums at least 2^18 elements (a parallel region costs more than that on a busy machine).
  at::parallel_for(0, H, std::max<int64_t>(64, (int64_t(1) << 18) / std::max<int64_t>(n, 1)), [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = sp[i];
      accumulate_row<scalar_t, acc_t>(acc + (p / k) * H + c0, o + i * H + c0, w_pair[p], c1 - c0);
    }
  });
}

}  // namespace
}  // namespace h3fusion::cpu
