// Forward grouped GEMMs of moe_ffn on CUDA: the fused gate/up projection + gated activation, and the down projection.
//
// Design: the rows of the T*k (token, slot) pairs are grouped by expert (expert_offsets, on the device). Group
// sizes are unknown on the host, so the grid is an upper bound on the number of 64-row tiles
// (ceil(T*k / 64) + E) x ceil(N / 64): a one-thread kernel first writes tile_starts[E+1] (cumulative
// ceil(count_e / 64)); each block binary-searches its expert in it and leaves if its index is past the last tile.
// The gate/up GEMM reads x's rows through sorted_pairs (no gathered copy of x) and computes, per block, the same
// 64 columns of the gate half and of the up half, so the epilogue writes h (kept for backward) and
// act = act(gate) * up (silu, gelu or gelu_tanh) in one pass.
// Tile shape: 64 x 64 output per 128-thread block, reduction step 32 (see grouped_gemm_core.cuh); bf16/fp16 via
// WMMA 16x16x16 with fp32 accumulation, fp32 via a SIMT loop.
// Known limits: element-wise global loads (no vectorisation, no cp.async, no pipelining): correct for any shape
// and alignment but far from peak. fp64 is not supported on CUDA (clear error). N must be below 64 * 65535.
// Where at::_grouped_mm has its device-side path (bf16 on sm_90/sm_100), moe_ffn runs that instead by default
// (moe_ffn_torch_gemm.cu, moe_gemm_backend.h); these kernels are the fallback elsewhere and the tests' oracle.
// TODO(perf): mma.sync/wgmma with cp.async pipelines, for the dtypes and GPUs at::_grouped_mm leaves to us.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include "grouped_gemm.cuh"
#include "grouped_gemm_core.cuh"

namespace h3fusion::cuda {
namespace {

// tile_starts[e] = sum_{e' < e} ceil(max(count_e', 0) / kBM). E is small (tens to hundreds): one thread is enough.
__global__ void tile_starts_kernel(const int64_t* offsets, int64_t num_experts, int64_t* tile_starts) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t acc = 0;
  tile_starts[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    int64_t count = offsets[e + 1] - offsets[e];
    count = count > 0 ? count : 0;
    acc += (count + gemm::kBM - 1) / gemm::kBM;
    tile_starts[e + 1] = acc;
  }
}

void check_grid(int64_t tiles_x, int64_t n, const char* what) {
  TORCH_CHECK(tiles_x < (int64_t(1) << 31), what, ": too many rows for one launch (", tiles_x, " row tiles)");
  TORCH_CHECK((n + gemm::kBN - 1) / gemm::kBN <= 65535, what, ": output width ", n, " exceeds ", 65535 * gemm::kBN);
}

}  // namespace

at::Tensor grouped_tile_starts(const at::Tensor& expert_offsets) {
  TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) >= 2 &&
                  expert_offsets.scalar_type() == at::kLong && expert_offsets.is_contiguous(),
              "expert_offsets must be a contiguous 1-D int64 tensor of E+1 >= 2 entries, got ",
              expert_offsets.sizes(), " ", expert_offsets.scalar_type());
  const int64_t num_experts = expert_offsets.size(0) - 1;
  at::Tensor tile_starts = at::empty({num_experts + 1}, expert_offsets.options());
  tile_starts_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(
      expert_offsets.data_ptr<int64_t>(), num_experts, tile_starts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return tile_starts;
}

void grouped_gate_up_act(const at::Tensor& x, const at::Tensor& sorted_pairs, int64_t k,
                         const at::Tensor& gate_up_proj, const at::Tensor& expert_offsets,
                         const at::Tensor& tile_starts, const at::Tensor& h, const at::Tensor& act,
                         Activation activation) {
  const int64_t rows = sorted_pairs.size(0);
  const int64_t num_experts = gate_up_proj.size(0);
  const int64_t F = gate_up_proj.size(1) / 2;
  const int64_t H = gate_up_proj.size(2);
  TORCH_CHECK(x.is_contiguous() && gate_up_proj.is_contiguous() && h.is_contiguous() && act.is_contiguous() &&
                  sorted_pairs.is_contiguous(),
              "grouped_gate_up_act: operands must be contiguous");
  TORCH_CHECK(k >= 1, "grouped_gate_up_act: k must be >= 1, got ", k);
  if (rows == 0 || F == 0) return;  // nothing to write (h and act have no elements)
  const int64_t tiles_x = gemm::row_tiles_upper_bound(rows, num_experts);
  check_grid(tiles_x, F, "grouped_gate_up_act");
  const dim3 grid(static_cast<unsigned>(tiles_x), static_cast<unsigned>((F + gemm::kBN - 1) / gemm::kBN));
  gemm::dispatch_gemm_dtype(x.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gemm::RowGemmArgs<T> args{};
    args.a = reinterpret_cast<const T*>(x.data_ptr());
    args.a_rows = sorted_pairs.data_ptr<int32_t>();
    args.a_row_div = k;
    args.a_num_rows = x.size(0);
    args.b = reinterpret_cast<const T*>(gate_up_proj.data_ptr());
    args.b_expert_stride = 2 * F * H;
    args.offsets = expert_offsets.data_ptr<int64_t>();
    args.tile_starts = tile_starts.data_ptr<int64_t>();
    args.num_experts = num_experts;
    args.rows = rows;
    args.n = F;
    args.k = H;
    args.out = nullptr;
    args.h = reinterpret_cast<T*>(h.data_ptr());
    args.act = reinterpret_cast<T*>(act.data_ptr());
    args.activation = activation;
    gemm::row_gemm_kernel<T, T, true, true><<<grid, gemm::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void grouped_linear(const at::Tensor& a, const at::Tensor& w, const at::Tensor& expert_offsets,
                    const at::Tensor& tile_starts, const at::Tensor& out) {
  const int64_t rows = a.size(0);
  const int64_t num_experts = w.size(0);
  const int64_t N = w.size(1);
  const int64_t K = w.size(2);
  TORCH_CHECK(a.is_contiguous() && w.is_contiguous() && out.is_contiguous(),
              "grouped_linear: operands must be contiguous");
  TORCH_CHECK(out.scalar_type() == a.scalar_type(), "grouped_linear: out must have a's dtype");
  if (rows == 0 || N == 0) return;
  const int64_t tiles_x = gemm::row_tiles_upper_bound(rows, num_experts);
  check_grid(tiles_x, N, "grouped_linear");
  const dim3 grid(static_cast<unsigned>(tiles_x), static_cast<unsigned>((N + gemm::kBN - 1) / gemm::kBN));
  gemm::dispatch_gemm_dtype(a.scalar_type(), "a", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gemm::RowGemmArgs<T> args{};
    args.a = reinterpret_cast<const T*>(a.data_ptr());
    args.a_rows = nullptr;
    args.a_row_div = 1;
    args.a_num_rows = rows;
    args.b = reinterpret_cast<const T*>(w.data_ptr());
    args.b_expert_stride = N * K;
    args.offsets = expert_offsets.data_ptr<int64_t>();
    args.tile_starts = tile_starts.data_ptr<int64_t>();
    args.num_experts = num_experts;
    args.rows = rows;
    args.n = N;
    args.k = K;
    args.out = out.data_ptr();
    gemm::row_gemm_kernel<T, T, true, false><<<grid, gemm::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace h3fusion::cuda
