// Weight-gradient grouped GEMMs and the SwiGLU / routing-weight backward of moe_ffn on CUDA.
//
// Design (weight gradients): out[e] = sum over the rows r of expert e of P'[r]^T Q[r], an [M, N] matrix per expert
// whose reduction dimension is the expert's (device-known) row count. Grid = ceil(N/64) x ceil(M/64) x E; each
// block owns one 64 x 64 output tile of one expert and walks that expert's rows 32 at a time, in row order, so
// the sum order is fixed (deterministic, no atomics) and an expert without rows writes exact zeros. Rows are read
// through the permutation where needed (grad_y and x by token, via sorted_pairs / k) and the routing weight is
// applied while staging (P'[r] = w_r * grad_y[t(r)], rounded to the operand dtype as PyTorch's own bf16 autograd
// rounds grad_out * w). Used for grad_down_proj[e] = sum_r (w_r grad_y[t(r)]) act[r]^T ([H, F]) and
// grad_gate_up_proj[e] = sum_r dH[r] x[t(r)]^T ([2F, H]).
// Tile shape: 64 x 64 per 128-thread block, reduction step 32; WMMA 16x16x16 (bf16/fp16, fp32 accumulation) or a
// SIMT fp32 loop (grouped_gemm_core.cuh).
// Design (SwiGLU backward): one 128-thread block per row; recomputes act from the stored pre-activation h exactly
// as the forward epilogue rounded it, writes dH and act, and the routing-weight gradient U[r] . act[r] reduced in
// a fixed tree order (one writer per pair, no atomics).
// Known limits: a very large expert (many rows) is walked by one block per output tile (no split-K), which is
// slow for tiny E*M*N but always correct; element-wise global loads; no fp64 on CUDA; E and ceil(M/64) <= 65535.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "grouped_gemm.cuh"
#include "grouped_gemm_core.cuh"

namespace h3fusion::cuda {
namespace {

using gemm::kBK;
using gemm::kBM;
using gemm::kBN;
using gemm::kLdc;
using gemm::kThreads;

template <typename T>
struct WgradArgs {
  const T* p;              // [p_num_rows, M]
  const int32_t* p_rows;   // nullable
  int64_t p_div;
  int64_t p_num_rows;
  const float* p_scale;    // nullable, indexed by the pair p_rows[r] (requires p_rows)
  const T* q;              // [q_num_rows, N]
  const int32_t* q_rows;   // nullable
  int64_t q_div;
  int64_t q_num_rows;
  const int64_t* offsets;  // [E+1]
  int64_t rows;            // R
  int64_t m;
  int64_t n;
  T* out;                  // [E, M, N]
};

template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const WgradArgs<T> p) {
  constexpr int ld = gemm::staging_ld<T>();
  __shared__ __align__(128) unsigned char smem[gemm::smem_bytes<T>(1)];
  __shared__ int64_t s_prow[kBK];
  __shared__ int64_t s_qrow[kBK];
  __shared__ float s_scale[kBK];

  const int64_t e = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int tid = threadIdx.x;
  int64_t r_begin = p.offsets[e];
  int64_t r_end = p.offsets[e + 1];
  r_begin = r_begin > 0 ? r_begin : 0;
  r_end = r_end < p.rows ? r_end : p.rows;

  T* sA = reinterpret_cast<T*>(smem);  // sA[m][kk] = P'(row r0+kk, column m0+m)
  T* sB = sA + kBM * ld;               // sB[n][kk] = Q(row r0+kk, column n0+n)
  const T zero = gemm::from_f32<T>(0.0f);
  gemm::Tile<T> acc;
  acc.zero();

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kBK) {
    for (int i = tid; i < kBK; i += kThreads) {
      const int64_t r = r0 + i;
      int64_t prow = -1, qrow = -1;
      float scale = 0.0f;
      if (r < r_end) {
        // raw indices are tested for < 0 before the division (which would round -1 / k to row 0)
        const int64_t p_raw = p.p_rows != nullptr ? static_cast<int64_t>(p.p_rows[r]) : r;
        const int64_t q_raw = p.q_rows != nullptr ? static_cast<int64_t>(p.q_rows[r]) : r;
        prow = p_raw < 0 ? -1 : p_raw / p.p_div;
        qrow = q_raw < 0 ? -1 : q_raw / p.q_div;
        if (prow >= p.p_num_rows) prow = -1;
        if (qrow >= p.q_num_rows) qrow = -1;
        // p_scale has p_num_rows * p_div entries (one per pair), so a valid prow bounds p_raw too
        scale = (p.p_scale != nullptr && prow >= 0) ? p.p_scale[p_raw] : 1.0f;
      }
      s_prow[i] = prow;
      s_qrow[i] = qrow;
      s_scale[i] = scale;
    }
    __syncthreads();
    for (int idx = tid; idx < kBM * kBK; idx += kThreads) {
      const int kk = idx / kBM, mi = idx % kBM;  // consecutive threads read consecutive columns of one row
      const int64_t row = s_prow[kk], col = m0 + mi;
      sA[mi * ld + kk] =
          (row >= 0 && col < p.m) ? gemm::from_f32<T>(gemm::to_f32(p.p[row * p.m + col]) * s_scale[kk]) : zero;
    }
    for (int idx = tid; idx < kBN * kBK; idx += kThreads) {
      const int kk = idx / kBN, ni = idx % kBN;
      const int64_t row = s_qrow[kk], col = n0 + ni;
      sB[ni * ld + kk] = (row >= 0 && col < p.n) ? p.q[row * p.n + col] : zero;
    }
    __syncthreads();
    acc.step(sA, sB);
    __syncthreads();  // the next staging (or the epilogue's sC) overwrites sA/sB and the row tables
  }

  float* sC = reinterpret_cast<float*>(smem);
  acc.store(sC);
  __syncthreads();
  T* out_e = p.out + e * p.m * p.n;
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int mi = idx / kBN, ni = idx % kBN;
    const int64_t row = m0 + mi, col = n0 + ni;
    if (row < p.m && col < p.n) out_e[row * p.n + col] = gemm::from_f32<T>(sC[mi * kLdc + ni]);
  }
}

// One block per row r (see the file comment). h, dh: [R, 2F]; act: [R, F]; u_grad: [R, F] fp32.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gated_act_backward_kernel(const float* u_grad, const T* h, const float* weights, const int32_t* sorted_pairs,
                              int64_t num_pairs, int64_t F, T* dh, T* act, float* grad_w, Activation activation) {
  __shared__ float s_part[kThreads];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t pair = sorted_pairs[r];
  const bool pair_ok = pair >= 0 && pair < num_pairs;
  const float w = pair_ok ? weights[pair] : 0.0f;
  const T* h_r = h + r * 2 * F;
  T* dh_r = dh + r * 2 * F;
  const float* u_r = u_grad + r * F;
  float part = 0.0f;
  for (int64_t f = tid; f < F; f += kThreads) {
    const float g = gemm::to_f32(h_r[f]);
    const float u = gemm::to_f32(h_r[F + f]);
    const float P = gemm::gate_p_f32(g, activation);
    const float gp = g * P;
    // the forward epilogue's act, bit for bit: gated_act_f32 of the stored gate times the stored up, rounded to T
    const T a = gemm::from_f32<T>(gemm::gated_act_f32(g, activation) * u);
    act[r * F + f] = a;
    const float ug = u_r[f];
    part = fmaf(ug, gemm::to_f32(a), part);
    const float da = w * ug;
    dh_r[f] = gemm::from_f32<T>(da * u * (P + g * gemm::gate_dp_f32(g, P, activation)));
    dh_r[F + f] = gemm::from_f32<T>(da * gp);
  }
  s_part[tid] = part;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {  // fixed tree order: deterministic
    if (tid < stride) s_part[tid] += s_part[tid + stride];
    __syncthreads();
  }
  if (tid == 0 && pair_ok) grad_w[pair] = s_part[0];
}

}  // namespace

void grouped_wgrad(const at::Tensor& p, const at::Tensor& p_rows, int64_t p_div, const at::Tensor& p_scale,
                   const at::Tensor& q, const at::Tensor& q_rows, int64_t q_div, const at::Tensor& expert_offsets,
                   const at::Tensor& out) {
  const int64_t num_experts = out.size(0);
  const int64_t M = out.size(1);
  const int64_t N = out.size(2);
  TORCH_CHECK(p.is_contiguous() && q.is_contiguous() && out.is_contiguous() && expert_offsets.is_contiguous(),
              "grouped_wgrad: operands must be contiguous");
  TORCH_CHECK(p.size(1) == M && q.size(1) == N && expert_offsets.numel() == num_experts + 1,
              "grouped_wgrad: shapes do not match");
  TORCH_CHECK(p.scalar_type() == q.scalar_type() && out.scalar_type() == p.scalar_type(),
              "grouped_wgrad: p, q and out must share one dtype");
  TORCH_CHECK(!p_scale.defined() || (p_rows.defined() && p_scale.scalar_type() == at::kFloat &&
                                     p_scale.is_contiguous()),
              "grouped_wgrad: p_scale must be a contiguous float32 tensor indexed through p_rows");
  TORCH_CHECK(!p_rows.defined() || (p_rows.scalar_type() == at::kInt && p_rows.is_contiguous() && p_div >= 1),
              "grouped_wgrad: p_rows must be contiguous int32");
  TORCH_CHECK(!q_rows.defined() || (q_rows.scalar_type() == at::kInt && q_rows.is_contiguous() && q_div >= 1),
              "grouped_wgrad: q_rows must be contiguous int32");
  const int64_t rows = p_rows.defined() ? p_rows.numel() : p.size(0);
  TORCH_CHECK(q_rows.defined() ? q_rows.numel() == rows : q.size(0) == rows,
              "grouped_wgrad: p and q must cover the same rows");
  TORCH_CHECK(!p_scale.defined() || p_scale.numel() == p.size(0) * p_div,
              "grouped_wgrad: p_scale needs one entry per pair (p.shape[0] * p_div)");
  if (num_experts == 0 || M == 0 || N == 0) return;
  const int64_t gx = (N + kBN - 1) / kBN, gy = (M + kBM - 1) / kBM;
  TORCH_CHECK(gx < (int64_t(1) << 31) && gy <= 65535 && num_experts <= 65535,
              "grouped_wgrad: output [", num_experts, ", ", M, ", ", N, "] is too large for one launch");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(num_experts));
  gemm::dispatch_gemm_dtype(p.scalar_type(), "p", [&](auto tag) {
    using T = typename decltype(tag)::type;
    WgradArgs<T> args{};
    args.p = reinterpret_cast<const T*>(p.data_ptr());
    args.p_rows = p_rows.defined() ? p_rows.data_ptr<int32_t>() : nullptr;
    args.p_div = p_rows.defined() ? p_div : 1;
    args.p_num_rows = p.size(0);
    args.p_scale = p_scale.defined() ? p_scale.data_ptr<float>() : nullptr;
    args.q = reinterpret_cast<const T*>(q.data_ptr());
    args.q_rows = q_rows.defined() ? q_rows.data_ptr<int32_t>() : nullptr;
    args.q_div = q_rows.defined() ? q_div : 1;
    args.q_num_rows = q.size(0);
    args.offsets = expert_offsets.data_ptr<int64_t>();
    args.rows = rows;
    args.m = M;
    args.n = N;
    args.out = reinterpret_cast<T*>(out.data_ptr());
    wgrad_kernel<T><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void gated_act_backward(const at::Tensor& u_grad, const at::Tensor& h, const at::Tensor& weights_f32,
                        const at::Tensor& sorted_pairs, const at::Tensor& dh, const at::Tensor& act,
                        const at::Tensor& grad_w, Activation activation) {
  const int64_t rows = h.size(0);
  const int64_t F = h.size(1) / 2;
  TORCH_CHECK(u_grad.is_contiguous() && h.is_contiguous() && weights_f32.is_contiguous() &&
                  sorted_pairs.is_contiguous() && dh.is_contiguous() && act.is_contiguous() && grad_w.is_contiguous(),
              "gated_act_backward: operands must be contiguous");
  TORCH_CHECK(u_grad.scalar_type() == at::kFloat && weights_f32.scalar_type() == at::kFloat &&
                  grad_w.scalar_type() == at::kFloat && sorted_pairs.scalar_type() == at::kInt,
              "gated_act_backward: u_grad, weights_f32, grad_w must be float32 and sorted_pairs int32");
  TORCH_CHECK(u_grad.size(0) == rows && u_grad.size(1) == F && sorted_pairs.numel() == rows &&
                  weights_f32.numel() == rows && grad_w.numel() == rows && dh.sizes() == h.sizes() &&
                  act.size(0) == rows && act.size(1) == F,
              "gated_act_backward: shapes do not match");
  if (rows == 0) return;
  TORCH_CHECK(rows < (int64_t(1) << 31), "gated_act_backward: too many rows");
  gemm::dispatch_gemm_dtype(h.scalar_type(), "h", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gated_act_backward_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        u_grad.data_ptr<float>(), reinterpret_cast<const T*>(h.data_ptr()), weights_f32.data_ptr<float>(),
        sorted_pairs.data_ptr<int32_t>(), rows, F, reinterpret_cast<T*>(dh.data_ptr()),
        reinterpret_cast<T*>(act.data_ptr()), grad_w.data_ptr<float>(), activation);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace h3fusion::cuda
