// linear_logprob on CUDA: logp_n = h_n . W[t_n] - logsumexp_v(h_n . W[v]) without the [N, V] logits.
//
// The chunk loops are shared with the CPU (h3fusion/logprob_driver.h): cuBLAS GEMMs per [rows, chunk] block with
// an fp32 result (bf16/fp16 inputs stay in their dtype for the tensor cores), and three small kernels here, one
// thread block per row of the block:
//   * lse_update_kernel: folds a logits block into the running (max, sum) pair of each row and picks the target
//     logit when the target falls in the chunk;
//   * lse_finalize_kernel: lse = max + log(sum), logp = target logit - lse (0 on ignored rows);
//   * softmax_grad_kernel: d logits = coef * exp(logits - lse) + g * onehot(target), written in the GEMM dtype.
// No host-device synchronisation (CUDA-graph capturable); everything runs on the current stream; reductions are
// fixed shuffle trees (deterministic). Targets outside [0, V) cannot be reported without a sync: such a row is never
// picked, so its logp stays NaN (the pick buffer starts as NaN) and no memory outside the block is ever read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "arg_checks.h"
#include "h3fusion/logprob_driver.h"
#include "h3fusion/logprob_math.h"

namespace {

using at::Tensor;
namespace lp = h3fusion::logprob;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Reduce each thread's (m, s) pair over the block in a fixed tree; the result is valid in thread 0.
template <typename T>
__device__ void block_reduce_lse(T& m, T& s) {
  __shared__ T sm[kWarps];
  __shared__ T ss[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const T s2 = __shfl_xor_sync(0xffffffffu, s, off);
    h3fusion::lse_merge(m, s, m2, s2);
  }
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    m = sm[0];
    s = ss[0];
    for (int i = 1; i < kWarps; ++i) h3fusion::lse_merge(m, s, sm[i], ss[i]);
  }
}

// One block per row i of a [rows, cols] logits block whose first row is global row row0 and first column is
// vocabulary id v0.
template <typename acc_t>
__global__ void lse_update_kernel(const acc_t* __restrict__ logits, int64_t cols, int64_t row0, int64_t v0,
                                  const int64_t* __restrict__ targets, acc_t* __restrict__ run_max,
                                  acc_t* __restrict__ run_sum, acc_t* __restrict__ tgt_logit) {
  const int64_t i = blockIdx.x;
  const int64_t row = row0 + i;
  const acc_t* x = logits + i * cols;  // 64-bit offset
  acc_t m = h3fusion::lp_neg_inf<acc_t>(), s = acc_t(0);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) h3fusion::lse_add(m, s, x[c]);
  block_reduce_lse(m, s);
  if (threadIdx.x == 0) {
    acc_t rm = run_max[row], rs = run_sum[row];
    h3fusion::lse_merge(rm, rs, m, s);
    run_max[row] = rm;
    run_sum[row] = rs;
    const int64_t tv = targets[row] - v0;
    if (tv >= 0 && tv < cols) tgt_logit[row] = x[tv];
  }
}

template <typename acc_t>
__global__ void lse_finalize_kernel(int64_t n, const acc_t* __restrict__ run_max, const acc_t* __restrict__ run_sum,
                                    const acc_t* __restrict__ tgt_logit, const int64_t* __restrict__ targets,
                                    int64_t ignore_index, acc_t* __restrict__ logp, acc_t* __restrict__ lse) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const acc_t l = h3fusion::lse_value(run_max[i], run_sum[i]);
  lse[i] = l;
  logp[i] = targets[i] == ignore_index ? acc_t(0) : tgt_logit[i] - l;
}

// d logits for one row of the block. `out` may alias `logits` (fp32/fp64 inputs): each element is read, then
// written, by the same thread.
template <typename acc_t, typename out_t>
__global__ void softmax_grad_kernel(const acc_t* logits, out_t* out, int64_t cols, int64_t row0, int64_t v0,
                                    const int64_t* __restrict__ targets, int64_t ignore_index,
                                    const acc_t* __restrict__ lse, const acc_t* __restrict__ grad_logp,
                                    const acc_t* __restrict__ grad_lse) {
  const int64_t i = blockIdx.x;
  const int64_t row = row0 + i;
  const int64_t t = targets[row];
  // The log-prob of an ignored row is the constant 0: only its lse gradient remains.
  const acc_t g = t == ignore_index ? acc_t(0) : grad_logp[row];
  const acc_t coef = grad_lse[row] - g;
  const acc_t l = lse[row];
  const int64_t tv = t - v0;
  const acc_t* x = logits + i * cols;
  out_t* d = out + i * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    d[c] = static_cast<out_t>(h3fusion::softmax_grad(x[c], l, coef, g, c == tv));
  }
}


std::tuple<Tensor, Tensor> linear_logprob_forward_cuda(const Tensor& hidden, const Tensor& weight,
                                                       const Tensor& targets, int64_t ignore_index) {
  lp::check_inputs(hidden, weight, targets);
  h3fusion::cuda::check_logprob_hidden(hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const Tensor h = hidden.contiguous(), w = weight.contiguous();
  const Tensor t = targets.to(at::kLong).contiguous();
  const int64_t n = h.size(0);
  const auto acc = lp::acc_dtype(h);
  const auto opts = h.options().dtype(acc);
  Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts);
  if (n == 0) return {logp, lse};  // no zero-size launches

  Tensor run_max = at::full({n}, -std::numeric_limits<double>::infinity(), opts);
  Tensor run_sum = at::zeros({n}, opts);
  // NaN until the target is picked: an out-of-range target leaves its logp NaN (see the header comment).
  Tensor tgt_logit = at::full({n}, std::numeric_limits<double>::quiet_NaN(), opts);
  const int64_t* tp = t.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(acc, "linear_logprob_forward_cuda", [&] {
    using acc_t = scalar_t;
    acc_t* m = run_max.data_ptr<acc_t>();
    acc_t* s = run_sum.data_ptr<acc_t>();
    acc_t* tl = tgt_logit.data_ptr<acc_t>();
    lp::forward_chunks(h, w, h.scalar_type(), acc, [&](Tensor& logits, int64_t r0, int64_t v0) {
      const int64_t r = logits.size(0), c = logits.size(1);
      auto stream = at::cuda::getCurrentCUDAStream();
      lse_update_kernel<acc_t><<<static_cast<unsigned>(r), kThreads, 0, stream>>>(logits.data_ptr<acc_t>(), c, r0,
                                                                                   v0, tp, m, s, tl);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int64_t blocks = (n + kThreads - 1) / kThreads;
    lse_finalize_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        n, m, s, tl, tp, ignore_index, logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logp, lse};
}

std::tuple<Tensor, Tensor> linear_logprob_backward_cuda(const Tensor& grad_logp, const Tensor& grad_lse,
                                                        const Tensor& hidden, const Tensor& weight,
                                                        const Tensor& targets, const Tensor& lse,
                                                        int64_t ignore_index, std::array<bool, 2> output_mask) {
  lp::check_inputs(hidden, weight, targets);
  h3fusion::cuda::check_logprob_hidden(hidden);
  lp::check_row_vector(grad_logp, "grad_logp", hidden);
  lp::check_row_vector(grad_lse, "grad_lse", hidden);
  lp::check_row_vector(lse, "lse", hidden);
  if (!output_mask[0] && !output_mask[1]) return {Tensor(), Tensor()};  // nothing asked for: both undefined
  const c10::cuda::CUDAGuard guard(hidden.device());
  const Tensor h = hidden.contiguous(), w = weight.contiguous();
  const Tensor t = targets.to(at::kLong).contiguous();
  const auto acc = lp::acc_dtype(h);
  const Tensor gl = grad_logp.to(acc).contiguous();
  const Tensor gs = grad_lse.to(acc).contiguous();
  const Tensor ls = lse.to(acc).contiguous();
  const auto gemm_dtype = h.scalar_type();
  // Low-precision GEMM inputs: the softmax gradients go to a separate buffer in the input dtype.
  Tensor dbuf;
  if (gemm_dtype != acc) {
    const lp::Plan plan = lp::make_plan(h.size(0), w.size(0));
    dbuf = at::empty({plan.rows * plan.chunk}, h.options());
  }
  const int64_t* tp = t.data_ptr<int64_t>();

  std::tuple<Tensor, Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(acc, "linear_logprob_backward_cuda", [&] {
    using acc_t = scalar_t;
    const acc_t* glp = gl.data_ptr<acc_t>();
    const acc_t* gsp = gs.data_ptr<acc_t>();
    const acc_t* lsp = ls.data_ptr<acc_t>();
    grads = lp::backward_chunks(h, w, gemm_dtype, acc, output_mask, [&](Tensor& logits, int64_t r0, int64_t v0) -> Tensor {
      const int64_t r = logits.size(0), c = logits.size(1);
      auto stream = at::cuda::getCurrentCUDAStream();
      const acc_t* x = logits.data_ptr<acc_t>();
      if (gemm_dtype == acc) {
        softmax_grad_kernel<acc_t, acc_t><<<static_cast<unsigned>(r), kThreads, 0, stream>>>(
            x, logits.data_ptr<acc_t>(), c, r0, v0, tp, ignore_index, lsp, glp, gsp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return logits;
      }
      Tensor d = lp::view2d(dbuf, r, c);
      AT_DISPATCH_REDUCED_FLOATING_TYPES(gemm_dtype, "linear_logprob_softmax_grad", [&] {
        softmax_grad_kernel<acc_t, scalar_t><<<static_cast<unsigned>(r), kThreads, 0, stream>>>(
            x, d.data_ptr<scalar_t>(), c, r0, v0, tp, ignore_index, lsp, glp, gsp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      return d;
    });
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(h3fusion, CUDA, m) {
  m.impl("linear_logprob_forward", &linear_logprob_forward_cuda);
  m.impl("linear_logprob_backward", &linear_logprob_backward_cuda);
}
