// The "torch" GEMM backend of the CUDA moe_ffn (declared in moe_ffn_torch_gemm.h, chosen in moe_gemm_backend.cpp).
//
// Design: the same chain as moe_ffn.cu with at::_grouped_mm (torch's CUTLASS grouped GEMM on sm_90/sm_100) for the
// GEMMs. Group ends = expert_offsets[1:] as int32 (a device-side cast, so nothing is read on the host). R = T*k rows
// in expert order; xs, gys = x, grad_y gathered into that order (moe_plan.cu's gather_rows).
//   forward:  h = grouped(xs [R,H] x gate_up[e]^T)                       2-D x 3-D (gate_up viewed [E,H,2F])
//             act = act(h[:, :F]) * h[:, F:]                              gated_act_forward_kernel
//             o = grouped(act [R,F] x down[e]^T); y = combine_rows(o, w)  2-D x 3-D
//   backward: U = grouped(gys [R,H] x down[e]) [R,F]                      dgrad of the down projection
//             gated_act_backward_kernel: grad_w[p] = U[r].act[r], dH = act'(h) (w U), act_w = w act (recomputed)
//             grad_down[e] = gys_e^T act_w_e      [E,H,F]                 2-D x 2-D, K = the expert's rows
//             grad_gate_up[e] = dH_e^T xs_e       [E,2F,H]                2-D x 2-D
//             dX = grouped(dH [R,2F] x gate_up[e]) [R,H]; grad_x = combine_rows(dX, 1)
// The 2-D x 2-D (weight-gradient) calls pass A transposed (column-major) and B row-major: the one layout for which
// torch's grouped GEMM accepts empty groups and puts no alignment condition on the group sizes (GroupMMCommon.cuh).
// It is the layout torch's own _grouped_mm backward uses. An expert without rows is then zeroed by
// zero_empty_experts_kernel, not left to what CUTLASS writes for a K = 0 problem.
// Numerics: bf16 operands, fp32 accumulation inside each GEMM, outputs rounded to bf16 (at::_grouped_mm's output
// dtype is its input dtype), so U is rounded to bf16 where our own kernels keep it in fp32; the routing weight
// scales act (act_w) instead of grad_y for grad_down. Determinism: torch's grouped GEMM splits no reduction across
// blocks (no split-K, no atomics) and every kernel here has a fixed order, so results are bitwise reproducible.
// Known limits: rows of invalid expert ids (the route plan's tail bucket) are not computed, as in our own
// kernels; outputs of the 2-D x 3-D calls for those rows are whatever at::_grouped_mm left there.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "cuda_utils.cuh"
#include "grouped_gemm_core.cuh"
#include "launchers.cuh"
#include "moe_ffn_torch_gemm.h"
#include "moe_gemm_backend.h"

#if H3FUSION_HAS_GROUPED_MM
#include <ATen/ops/_grouped_mm.h>
#endif

namespace h3fusion::cuda {
namespace {

constexpr int kEltThreads = 256;  // element-wise kernels
constexpr int kRowThreads = 128;  // one block per row (SwiGLU backward)
constexpr int kRowWarps = kRowThreads / kWarpSize;

// 16 bytes of T: the unit every kernel here loads and stores (row strides are multiples of 16 bytes).
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
}
template <typename T>
__device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {
  *reinterpret_cast<Vec16<T>*>(p) = v;
}

// act[r, f] = act(h[r, f]) * h[r, F + f] from the stored (rounded) h, as our own GEMM epilogue computes it.
template <typename T>
__global__ void __launch_bounds__(kEltThreads) gated_act_forward_kernel(const T* __restrict__ h, int64_t rows,
                                                                        int64_t F, T* __restrict__ act,
                                                                        Activation activation) {
  constexpr int V = Vec16<T>::kN;
  const int64_t vecs_per_row = F / V;
  const int64_t n = rows * vecs_per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / vecs_per_row;
    const int64_t c = (i % vecs_per_row) * V;
    const Vec16<T> g = load16(h + r * 2 * F + c);
    const Vec16<T> u = load16(h + r * 2 * F + F + c);
    Vec16<T> a;
#pragma unroll
    for (int j = 0; j < V; ++j)
      a.v[j] = gemm::from_f32<T>(gemm::gated_act_f32(gemm::to_f32(g.v[j]), activation) * gemm::to_f32(u.v[j]));
    store16(act + r * F + c, a);
  }
}

template <typename T>
struct GatedActBackwardArgs {
  const T* u_grad;             // [R, F] = W_down^T grad_y per row; nullable (then dh and grad_w must be null)
  const T* h;                  // [R, 2F] pre-activation
  const float* weights;        // [R] fp32 routing weights, by pair
  const int32_t* sorted_pairs; // [R]
  int64_t rows;
  int64_t F;
  T* dh;                       // [R, 2F] or null
  T* act_w;                    // [R, F] = w * act, or null
  float* grad_w;               // [R] by pair, or null
  Activation activation;
};

// One block per row r, pair p = sorted_pairs[r], w = weights[p], a = act recomputed from h (rounded to T):
//   grad_w[p] = sum_f U[r,f] a[r,f];  dh[r,f] = w U u act'(g), dh[r,F+f] = w U act(g);  act_w[r,f] = w a[r,f].
template <typename T>
__global__ void __launch_bounds__(kRowThreads) gated_act_backward_kernel(const GatedActBackwardArgs<T> p) {
  constexpr int V = Vec16<T>::kN;
  __shared__ float s_warp[kRowWarps];
  const int64_t r = blockIdx.x;
  const int64_t F = p.F;
  const int64_t pair = p.sorted_pairs[r];
  const bool pair_ok = pair >= 0 && pair < p.rows;
  const float w = pair_ok ? p.weights[pair] : 0.0f;
  const T* h_r = p.h + r * 2 * F;
  float part = 0.0f;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < F; c += static_cast<int64_t>(kRowThreads) * V) {
    const Vec16<T> g = load16(h_r + c);
    const Vec16<T> up = load16(h_r + F + c);
    Vec16<T> ug{}, dg{}, du{}, aw{};
    if (p.u_grad != nullptr) ug = load16(p.u_grad + r * F + c);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float gf = gemm::to_f32(g.v[j]);
      const float uf = gemm::to_f32(up.v[j]);
      // the forward's act, bit for bit
      const float af = gemm::to_f32(gemm::from_f32<T>(gemm::gated_act_f32(gf, p.activation) * uf));
      aw.v[j] = gemm::from_f32<T>(w * af);
      if (p.u_grad != nullptr) {
        const float uu = gemm::to_f32(ug.v[j]);
        part = fmaf(uu, af, part);
        const float P = gemm::gate_p_f32(gf, p.activation);
        const float da = w * uu;
        dg.v[j] = gemm::from_f32<T>(da * uf * (P + gf * gemm::gate_dp_f32(gf, P, p.activation)));
        du.v[j] = gemm::from_f32<T>(da * gf * P);
      }
    }
    if (p.dh != nullptr) {
      store16(p.dh + r * 2 * F + c, dg);
      store16(p.dh + r * 2 * F + F + c, du);
    }
    if (p.act_w != nullptr) store16(p.act_w + r * F + c, aw);
  }
  if (p.grad_w == nullptr) return;  // uniform across the block: no thread reaches the barrier below
  const float warp_total = warp_sum(part);  // fixed butterfly order, then the warps in index order: deterministic
  if (threadIdx.x % kWarpSize == 0) s_warp[threadIdx.x / kWarpSize] = warp_total;
  __syncthreads();
  if (threadIdx.x == 0 && pair_ok) {
    float total = 0.0f;
    for (int i = 0; i < kRowWarps; ++i) total += s_warp[i];
    p.grad_w[pair] = total;
  }
}

// out[e] = 0 for every expert e without rows (out: [E, n16] 16-byte words); other experts are left alone.
__global__ void __launch_bounds__(kEltThreads)
    zero_empty_experts_kernel(const int64_t* __restrict__ offsets, int64_t n16, uint4* __restrict__ out) {
  const int64_t e = blockIdx.y;
  if (offsets[e + 1] > offsets[e]) return;
  uint4* dst = out + e * n16;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n16;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = make_uint4(0u, 0u, 0u, 0u);
  }
}

unsigned elementwise_blocks(int64_t n) {
  // enough blocks to fill any current GPU several times over; the kernels stride over the rest
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kEltThreads), 8192)));
}

void check_vec16(const at::Tensor& t, int64_t F, const char* what) {
  TORCH_CHECK(t.is_contiguous() && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 &&
                  (F * static_cast<int64_t>(t.element_size())) % 16 == 0,
              what, ": operands must be contiguous, 16-byte aligned, with rows of a multiple of 16 bytes");
}

at::Tensor gated_act_forward(const at::Tensor& h, int64_t F, Activation activation) {
  const int64_t rows = h.size(0);
  at::Tensor act = at::empty({rows, F}, h.options());
  if (rows == 0 || F == 0) return act;
  check_vec16(h, F, "gated_act_forward");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  gemm::dispatch_gemm_dtype(h.scalar_type(), "h", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t n = rows * (F / Vec16<T>::kN);
    gated_act_forward_kernel<T><<<elementwise_blocks(n), kEltThreads, 0, stream>>>(
        reinterpret_cast<const T*>(h.const_data_ptr()), rows, F, reinterpret_cast<T*>(act.mutable_data_ptr()),
        activation);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return act;
}

// Fills whichever of dh, act_w, grad_w are defined (see gated_act_backward_kernel); u_grad may be undefined only
// when dh and grad_w are.
void gated_act_backward(const at::Tensor& u_grad, const at::Tensor& h, const at::Tensor& w_f32,
                        const at::Tensor& sorted_pairs, const at::Tensor& dh, const at::Tensor& act_w,
                        const at::Tensor& grad_w, Activation activation) {
  const int64_t rows = h.size(0);
  const int64_t F = h.size(1) / 2;
  TORCH_CHECK(u_grad.defined() || (!dh.defined() && !grad_w.defined()), "gated_act_backward: dh and grad_w need U");
  if (rows == 0 || F == 0 || (!dh.defined() && !act_w.defined() && !grad_w.defined())) return;
  TORCH_CHECK(rows < (int64_t(1) << 31), "gated_act_backward: too many rows for one launch");
  check_vec16(h, F, "gated_act_backward");
  for (const at::Tensor* t : {&u_grad, &dh, &act_w}) {
    if (t->defined()) check_vec16(*t, F, "gated_act_backward");
  }
  gemm::dispatch_gemm_dtype(h.scalar_type(), "h", [&](auto tag) {
    using T = typename decltype(tag)::type;
    GatedActBackwardArgs<T> args{};
    args.u_grad = u_grad.defined() ? reinterpret_cast<const T*>(u_grad.const_data_ptr()) : nullptr;
    args.h = reinterpret_cast<const T*>(h.const_data_ptr());
    args.weights = w_f32.const_data_ptr<float>();
    args.sorted_pairs = sorted_pairs.const_data_ptr<int32_t>();
    args.rows = rows;
    args.F = F;
    args.dh = dh.defined() ? reinterpret_cast<T*>(dh.mutable_data_ptr()) : nullptr;
    args.act_w = act_w.defined() ? reinterpret_cast<T*>(act_w.mutable_data_ptr()) : nullptr;
    args.grad_w = grad_w.defined() ? grad_w.mutable_data_ptr<float>() : nullptr;
    args.activation = activation;
    gated_act_backward_kernel<T>
        <<<static_cast<unsigned>(rows), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void zero_empty_experts(const at::Tensor& out, const at::Tensor& offsets) {
  const int64_t E = out.size(0);
  const int64_t bytes = out.numel() / std::max<int64_t>(E, 1) * static_cast<int64_t>(out.element_size());
  if (E == 0 || bytes == 0) return;
  TORCH_CHECK(out.is_contiguous() && bytes % 16 == 0 && reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0,
              "zero_empty_experts: the output must be contiguous with 16-byte expert slices");
  const int64_t n16 = bytes / 16;
  const dim3 grid(std::min<unsigned>(elementwise_blocks(n16), 64u), static_cast<unsigned>(E));
  zero_empty_experts_kernel<<<grid, kEltThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      offsets.const_data_ptr<int64_t>(), n16, static_cast<uint4*>(out.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The group ends at::_grouped_mm wants: expert_offsets[1:] (cumulative, starting after expert 0) as int32.
at::Tensor group_ends(const at::Tensor& offsets) { return offsets.slice(0, 1).to(at::kInt).contiguous(); }

// One at::_grouped_mm call; its result is contiguous here (row strides are multiples of 16 bytes, so torch pads
// nothing), .contiguous() only guards that.
at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ends) {
#if H3FUSION_HAS_GROUPED_MM
  return at::_grouped_mm(a, b, ends).contiguous();
#else
  (void)a, (void)b, (void)ends;
  TORCH_CHECK(false, "this build's torch has no at::_grouped_mm");
#endif
}

// The weight-gradient form: out[e] = p_e^T q_e over expert e's rows (p[R,M], q[R,N] row-major -> out[E,M,N]),
// with exact zeros for experts without rows.
at::Tensor grouped_wgrad_mm(const at::Tensor& p, const at::Tensor& q, const at::Tensor& ends,
                            const at::Tensor& offsets) {
  at::Tensor out = grouped_mm(p.t(), q, ends);
  zero_empty_experts(out, offsets);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_forward_torch_gemm(
    const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& experts_in,
    const at::Tensor& gate_up_in, const at::Tensor& down_in, Activation activation) {
  const int64_t T = x_in.size(0), H = x_in.size(1), k = weights_in.size(1), E = gate_up_in.size(0);
  const int64_t F = gate_up_in.size(1) / 2;
  const int64_t R = T * k;
  const auto idx_opts = experts_in.options().dtype(at::kInt);
  if (T == 0) {  // no rows: nothing to launch; the plan is empty and every expert has zero rows
    return {at::empty({0, H}, x_in.options()), at::empty({0}, idx_opts), at::empty({0}, idx_opts),
            at::zeros({E + 1}, idx_opts.dtype(at::kLong)), at::empty({0, 2 * F}, x_in.options())};
  }
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const at::Tensor gate_up = gate_up_in.contiguous();
  const at::Tensor down = down_in.contiguous();

  auto [sorted_pairs, pair_rows, offsets] = route_plan(experts_in.contiguous(), E);
  const at::Tensor ends = group_ends(offsets);
  // [E,2F,H] viewed as [E,H,2F] is column-major per expert: x_sorted[r] . gate_up[e][n] for every n
  const at::Tensor h = grouped_mm(gather_rows(x, sorted_pairs, k), gate_up.transpose(1, 2), ends);
  TORCH_INTERNAL_ASSERT(h.size(0) == R && h.size(1) == 2 * F);
  // rows >= offsets[E] (pairs with an expert id outside [0, E)) belong to no group: no GEMM writes them, so they
  // are zeroed (saved as zeros for backward, contributing zero to y), as in the "own" backend
  zero_unrouted_rows(h, offsets);
  const at::Tensor o = grouped_mm(gated_act_forward(h, F, activation), down.transpose(1, 2), ends);
  zero_unrouted_rows(o, offsets);
  at::Tensor y = combine_rows(o, weights, pair_rows);
  return {y, sorted_pairs, pair_rows, offsets, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_backward_torch_gemm(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& gate_up_in,
    const at::Tensor& down_in, const at::Tensor& sorted_pairs_in, const at::Tensor& pair_rows_in,
    const at::Tensor& offsets_in, const at::Tensor& gate_up_out_in, bool need_x, bool need_weights,
    bool need_gate_up, bool need_down, Activation activation) {
  const int64_t T = x_in.size(0), H = x_in.size(1), k = weights_in.size(1), E = gate_up_in.size(0);
  const int64_t F = gate_up_in.size(1) / 2;
  const int64_t R = T * k;
  at::Tensor grad_x, grad_weights, grad_gate_up, grad_down;
  if (T == 0) {  // no rows: every weight gradient is exactly zero
    if (need_x) grad_x = at::empty({0, H}, x_in.options());
    if (need_weights) grad_weights = at::empty({0, k}, weights_in.options());
    if (need_gate_up) grad_gate_up = at::zeros({E, 2 * F, H}, gate_up_in.options());
    if (need_down) grad_down = at::zeros({E, H, F}, down_in.options());
    return {grad_x, grad_weights, grad_gate_up, grad_down};
  }
  const bool need_u = need_x || need_weights || need_gate_up;  // U = W_down^T grad_y feeds grad_w and dH
  const bool need_dh = need_x || need_gate_up;
  if (!need_u && !need_down) return {grad_x, grad_weights, grad_gate_up, grad_down};

  const at::Tensor sorted_pairs = sorted_pairs_in.contiguous();
  const at::Tensor pair_rows = pair_rows_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor h = gate_up_out_in.contiguous();
  const at::Tensor w_f32 = weights_in.to(at::kFloat).contiguous().view({R});
  const at::Tensor ends = group_ends(offsets);
  const auto opts = x_in.options();

  at::Tensor gy_sorted = gather_rows(grad_y_in.to(x_in.scalar_type()), sorted_pairs, k);  // [R,H]
  at::Tensor u_grad;
  if (need_u) {
    u_grad = grouped_mm(gy_sorted, down_in.contiguous(), ends);  // [R,F]: gy[t(r)] . down[e][:, f]
    zero_unrouted_rows(u_grad, offsets);  // with h zero there too: grad_w = 0 and dh = 0 for unrouted pairs
  }
  at::Tensor dh = need_dh ? at::empty({R, 2 * F}, opts) : at::Tensor();
  at::Tensor act_w = need_down ? at::empty({R, F}, opts) : at::Tensor();
  at::Tensor grad_w_f32 = need_weights ? at::empty({R}, opts.dtype(at::kFloat)) : at::Tensor();
  gated_act_backward(u_grad, h, w_f32, sorted_pairs, dh, act_w, grad_w_f32, activation);
  u_grad = at::Tensor();  // free before the next large temporaries

  if (need_down) grad_down = grouped_wgrad_mm(gy_sorted, act_w, ends, offsets);  // [E,H,F]
  gy_sorted = at::Tensor();
  act_w = at::Tensor();
  if (need_gate_up) grad_gate_up = grouped_wgrad_mm(dh, gather_rows(x_in.contiguous(), sorted_pairs, k), ends,
                                                    offsets);  // [E,2F,H]
  if (need_x) {
    const at::Tensor dx_rows = grouped_mm(dh, gate_up_in.contiguous(), ends);  // [R,H]: dH[r] . gate_up[e][:, i]
    zero_unrouted_rows(dx_rows, offsets);  // unrouted pairs add nothing to grad_x
    grad_x = combine_rows(dx_rows, at::ones({T, k}, opts.dtype(at::kFloat)), pair_rows);
  }
  if (need_weights) grad_weights = grad_w_f32.view({T, k}).to(weights_in.scalar_type());
  return {grad_x, grad_weights, grad_gate_up, grad_down};
}

}  // namespace h3fusion::cuda
