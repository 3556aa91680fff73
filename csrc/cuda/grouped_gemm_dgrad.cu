// Data-gradient grouped GEMMs of moe_ffn on CUDA: out[r] = W_e^T a[src(r)] for the row-grouped layout.
//
// Design: the same row-grouped schedule as grouped_gemm_fwd.cu (grid = (ceil(T*k / 64) + E) x ceil(N / 64) blocks,
// each finds its (expert, 64-row tile) by a binary search in tile_starts and leaves if past the last tile), with
// the expert weight read as [K, N] (the transpose of its nn.Linear use). Used twice in moe_ffn_backward:
//   U[r]  = W_down[e]^T grad_y[sorted_pairs[r] / k]   (grad_y read through the permutation, fp32 output)
//   dX[r] = W_gate_up[e]^T dH[r]                         (direct rows, x.dtype output)
// Tile shape: 64 x 64 per 128-thread block, reduction step 32; bf16/fp16 through WMMA 16x16x16 with fp32
// accumulation, fp32 through a SIMT loop (grouped_gemm_core.cuh).
// Known limits: element-wise, unvectorised global loads (B is read along N, so loads are coalesced but the shared
// stores are strided); no fp64 on CUDA; N below 64 * 65535.
// TODO(perf): faster kernels only behind a GPU benchmark; this one stays the default.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "grouped_gemm.cuh"
#include "grouped_gemm_core.cuh"

namespace h3fusion::cuda {

void grouped_linear_t(const at::Tensor& a, const at::Tensor& a_rows, int64_t a_row_div, const at::Tensor& w,
                      const at::Tensor& expert_offsets, const at::Tensor& tile_starts, const at::Tensor& out) {
  const int64_t rows = out.size(0);
  const int64_t num_experts = w.size(0);
  const int64_t K = w.size(1);
  const int64_t N = w.size(2);
  TORCH_CHECK(a.is_contiguous() && w.is_contiguous() && out.is_contiguous(),
              "grouped_linear_t: operands must be contiguous");
  TORCH_CHECK(a.size(1) == K && out.size(1) == N, "grouped_linear_t: shapes do not match");
  TORCH_CHECK(!a_rows.defined() || (a_rows.scalar_type() == at::kInt && a_rows.is_contiguous() &&
                                    a_rows.numel() == rows && a_row_div >= 1),
              "grouped_linear_t: a_rows must be a contiguous int32 tensor with one entry per output row");
  TORCH_CHECK(a_rows.defined() || a.size(0) == rows, "grouped_linear_t: a must have one row per output row");
  if (rows == 0 || N == 0) return;
  const int64_t tiles_x = gemm::row_tiles_upper_bound(rows, num_experts);
  TORCH_CHECK(tiles_x < (int64_t(1) << 31), "grouped_linear_t: too many rows for one launch");
  TORCH_CHECK((N + gemm::kBN - 1) / gemm::kBN <= 65535, "grouped_linear_t: output width ", N, " is too large");
  const dim3 grid(static_cast<unsigned>(tiles_x), static_cast<unsigned>((N + gemm::kBN - 1) / gemm::kBN));
  const bool out_f32 = out.scalar_type() == at::kFloat;
  TORCH_CHECK(out_f32 || out.scalar_type() == a.scalar_type(), "grouped_linear_t: out must be float32 or a's dtype");
  gemm::dispatch_gemm_dtype(a.scalar_type(), "a", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gemm::RowGemmArgs<T> args{};
    args.a = reinterpret_cast<const T*>(a.data_ptr());
    args.a_rows = a_rows.defined() ? a_rows.data_ptr<int32_t>() : nullptr;
    args.a_row_div = a_rows.defined() ? a_row_div : 1;
    args.a_num_rows = a.size(0);
    args.b = reinterpret_cast<const T*>(w.data_ptr());
    args.b_expert_stride = K * N;
    args.offsets = expert_offsets.data_ptr<int64_t>();
    args.tile_starts = tile_starts.data_ptr<int64_t>();
    args.num_experts = num_experts;
    args.rows = rows;
    args.n = N;
    args.k = K;
    args.out = out.data_ptr();
    const auto stream = at::cuda::getCurrentCUDAStream();
    if (out_f32) {
      gemm::row_gemm_kernel<T, float, false, false><<<grid, gemm::kThreads, 0, stream>>>(args);
    } else {
      gemm::row_gemm_kernel<T, T, false, false><<<grid, gemm::kThreads, 0, stream>>>(args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace h3fusion::cuda
