// CUDA kernels of the MoE permutation: route_plan (moe_route_plan), gather_rows (moe_gather), combine_rows
// (moe_combine). Host entry points are declared in launchers.cuh (moe_ffn's CUDA code calls them directly).
//
// route_plan: a stable counting sort of the N = T*k (token, slot) pairs by expert, in four small kernels:
//   1. rank:    pairs are cut into chunks of 256 (one block each). Each pair's rank = how many pairs of the same
//               expert come before it inside its chunk (an O(256) loop over the chunk in shared memory). The last
//               pair of each (expert, chunk) writes the count into counts[expert, chunk] (one writer, no atomics).
//   2. chunks:  per expert (one block each), an exclusive scan of counts[expert, :] over the chunks (in place),
//               and the expert's total.
//   3. offsets: one block scans the E+1 totals into expert_offsets (int64, on the device).
//   4. scatter: row of pair p = offsets[e] + (pairs of e in earlier chunks) + rank(p); sorted_pairs[row] = p,
//               pair_rows[p] = row.
//   Only integer arithmetic and no atomics: bitwise deterministic, and pairs of one expert stay in ascending pair
//   order (stable), exactly what reference.moe_route_plan gives.
//   Expert ids outside [0, E) cannot raise here without a device->host sync (the CPU op raises; nothing checks
//   CUDA ids on the host). Their contract instead: such pairs go to an extra bucket after all real experts, i.e.
//   rows [offsets[E], N) in ascending pair order, so sorted_pairs and pair_rows are always full permutations of
//   [0, N) and offsets[E] is the number of valid pairs. moe_ffn makes those "unrouted" rows contribute zero and
//   get zero gradient by zeroing them in its row buffers (zero_unrouted_rows below): no grouped GEMM writes them.
//   Limits: temporary memory 4 * (E+1) * ceil(N/256) bytes for the counts plus 4*N for the ranks (8 MB for
//   E = 512, N = 10^6); N = T*k must fit in int32 (the index outputs are int32).
// zero_unrouted_rows: zeroes rows [offsets[E], N) of a contiguous [N, ...] buffer, reading offsets[E] on the
//   device (a fixed grid, grid-stride over the bytes of that tail; no work at all when every id was valid).
// gather_rows: one warp per output row, a plain byte copy with the widest vector (16/8/4/2 bytes) that the row
//   size and the pointers' alignment allow, so any H works. A pair index outside [0, T*k) gives a zero row.
// combine_rows: one warp per token; each lane owns a slice of H and sums the token's k rows in slot order
//   (j = 0..k-1) in fp32 (fp64 for fp64): deterministic, no atomics. Vectorised (16-byte loads) when H and the
//   pointers allow. A row index outside [0, T*k) contributes nothing.
// No host-device synchronisation anywhere; everything runs on the current stream (CUDA-graph capturable).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

#include "arg_checks.h"
#include "cuda_utils.cuh"
#include "launchers.cuh"

namespace h3fusion::cuda {
namespace {

constexpr int kPlanChunk = 256;     // pairs per chunk = threads of a rank block
constexpr int kScanThreads = 256;   // threads of the scan blocks
constexpr int kRowWarps = 8;        // rows (gather) or tokens (combine) per 256-thread block
constexpr int kRowThreads = kRowWarps * kWarpSize;

// Bucket of an expert id: the id itself when valid, E (the tail bucket) otherwise.
__device__ __forceinline__ int32_t bucket_of(int32_t e, int32_t E) { return (e >= 0 && e < E) ? e : E; }

// 1. In-chunk rank of each pair, and counts[bucket * C + chunk] for every (bucket, chunk) that has pairs.
__global__ void __launch_bounds__(kPlanChunk)
    plan_rank_kernel(const int32_t* __restrict__ experts, int64_t N, int32_t E, int64_t C,
                     int32_t* __restrict__ rank, int32_t* __restrict__ counts) {
  __shared__ int32_t s_bucket[kPlanChunk];
  const int tid = threadIdx.x;
  const int64_t chunk = blockIdx.x;
  const int64_t p = chunk * kPlanChunk + tid;
  const int32_t b = p < N ? bucket_of(experts[p], E) : -1;  // -1 marks padding past N
  s_bucket[tid] = b;
  __syncthreads();
  if (p >= N) return;
  int32_t before = 0;
  bool last = true;
  for (int i = 0; i < kPlanChunk; ++i) {
    if (s_bucket[i] == b) {
      if (i < tid) {
        ++before;
      } else if (i > tid) {
        last = false;
      }
    }
  }
  rank[p] = before;
  if (last) counts[static_cast<int64_t>(b) * C + chunk] = before + 1;  // the only writer of this entry
}

// 2. For bucket b = blockIdx.x: counts[b, :] <- exclusive scan over chunks (in place); totals[b] <- sum.
__global__ void __launch_bounds__(kScanThreads)
    plan_chunk_scan_kernel(int32_t* __restrict__ counts, int64_t C, int64_t* __restrict__ totals) {
  int32_t* row = counts + static_cast<int64_t>(blockIdx.x) * C;
  int64_t carry = 0;
  for (int64_t base = 0; base < C; base += kScanThreads) {  // the same trip count in every thread
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < C ? row[i] : 0;
    int64_t tile_total;
    const int64_t excl = block_exclusive_sum(v, &tile_total);
    if (i < C) row[i] = static_cast<int32_t>(carry + excl);  // < N <= INT_MAX
    carry += tile_total;
  }
  if (threadIdx.x == 0) totals[blockIdx.x] = carry;
}

// 3. One block: offsets[b] = sum of totals[0..b) for b in [0, nb).
__global__ void __launch_bounds__(kScanThreads)
    plan_offsets_kernel(const int64_t* __restrict__ totals, int64_t nb, int64_t* __restrict__ offsets) {
  int64_t carry = 0;
  for (int64_t base = 0; base < nb; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < nb ? totals[i] : 0;
    int64_t tile_total;
    const int64_t excl = block_exclusive_sum(v, &tile_total);
    if (i < nb) offsets[i] = carry + excl;
    carry += tile_total;
  }
}

// 4. Every pair to its row.
__global__ void plan_scatter_kernel(const int32_t* __restrict__ experts, const int32_t* __restrict__ rank,
                                    const int32_t* __restrict__ chunk_start, const int64_t* __restrict__ offsets,
                                    int64_t N, int32_t E, int64_t C, int32_t* __restrict__ sorted_pairs,
                                    int32_t* __restrict__ pair_rows) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= N) return;
  const int32_t b = bucket_of(experts[p], E);
  const int64_t chunk = p / kPlanChunk;
  const int64_t row = offsets[b] + chunk_start[static_cast<int64_t>(b) * C + chunk] + rank[p];
  if (row >= 0 && row < N) {  // always true by construction; kept so that no write can leave the outputs
    sorted_pairs[row] = static_cast<int32_t>(p);
    pair_rows[p] = static_cast<int32_t>(row);
  }
}

// Zero the bytes [offsets[E] * row_words, N * row_words) of `rows`, as word_t words (row_words per row).
template <typename word_t>
__global__ void zero_unrouted_rows_kernel(const int64_t* __restrict__ offsets, int64_t E, int64_t N,
                                          int64_t row_words, word_t* __restrict__ rows) {
  const int64_t valid = offsets[E];  // rows [valid, N) hold the pairs whose expert id was outside [0, E)
  const int64_t begin = (valid < 0 ? 0 : (valid > N ? N : valid)) * row_words;
  const int64_t end = N * row_words;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end; i += stride) {
    rows[i] = word_t{};
  }
}

// gather: out[r] = x[sorted_pairs[r] / k] as raw vec_t words (vecs_per_row of them per row).
template <typename vec_t>
__global__ void __launch_bounds__(kRowThreads)
    gather_rows_kernel(const vec_t* __restrict__ x, const int32_t* __restrict__ sorted_pairs, int64_t R, int64_t k,
                       int64_t vecs_per_row, vec_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
  if (r >= R) return;
  const int64_t p = sorted_pairs[r];
  const bool valid = p >= 0 && p < R;  // R = T * k
  const vec_t* src = x + (valid ? p / k : 0) * vecs_per_row;
  vec_t* dst = out + r * vecs_per_row;
  for (int64_t v = lane; v < vecs_per_row; v += kWarpSize) dst[v] = valid ? src[v] : vec_t{};
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// combine: y[t, h] = sum_j w[t, j] * rows[pair_rows[t*k + j], h], VEC consecutive h per lane step.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    combine_rows_kernel(const scalar_t* __restrict__ rows, const acc_t<scalar_t>* __restrict__ weights,
                        const int32_t* __restrict__ pair_rows, int64_t T, int64_t k, int64_t H,
                        scalar_t* __restrict__ y) {
  using acc = acc_t<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
  if (t >= T) return;
  const int64_t R = T * k;
  const int32_t* my_rows = pair_rows + t * k;
  const acc* my_w = weights + t * k;
  for (int64_t h0 = static_cast<int64_t>(lane) * VEC; h0 < H; h0 += static_cast<int64_t>(kWarpSize) * VEC) {
    acc sum[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum[i] = acc(0);
    for (int64_t j = 0; j < k; ++j) {  // slot order: a fixed summation order
      const int64_t r = my_rows[j];
      if (r < 0 || r >= R) continue;
      const acc w = my_w[j];
      const pack_t in = *reinterpret_cast<const pack_t*>(rows + r * H + h0);  // H % VEC == 0, aligned
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum[i] += w * static_cast<acc>(in.v[i]);
    }
    pack_t out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.v[i] = static_cast<scalar_t>(sum[i]);
    *reinterpret_cast<pack_t*>(y + t * H + h0) = out;
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename vec_t>
void launch_gather(const at::Tensor& x, const at::Tensor& sp, int64_t R, int64_t k, int64_t row_bytes,
                   at::Tensor& out, cudaStream_t stream) {
  const int64_t blocks = ceil_div(R, kRowWarps);
  gather_rows_kernel<vec_t><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
      static_cast<const vec_t*>(x.const_data_ptr()), sp.const_data_ptr<int32_t>(), R, k,
      row_bytes / static_cast<int64_t>(sizeof(vec_t)), static_cast<vec_t*>(out.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::ScalarType acc_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_plan(const at::Tensor& experts, int64_t num_experts) {
  check_route_plan(experts, num_experts);
  const int64_t N = experts.numel();
  const int64_t E = num_experts;

  const c10::cuda::CUDAGuard guard(experts.device());
  const at::Tensor ex = experts.contiguous();
  const auto int_opts = ex.options().dtype(at::kInt);
  at::Tensor sorted_pairs = at::empty({N}, int_opts);
  at::Tensor pair_rows = at::empty({N}, int_opts);
  at::Tensor offsets = at::empty({E + 1}, ex.options().dtype(at::kLong));
  if (N == 0) {
    offsets.zero_();
    return {sorted_pairs, pair_rows, offsets};
  }

  const int64_t C = ceil_div(N, kPlanChunk);
  const int64_t nb = E + 1;  // buckets: the E experts and the tail bucket of invalid ids
  at::Tensor rank = at::empty({N}, int_opts);
  at::Tensor counts = at::zeros({nb * C}, int_opts);
  at::Tensor totals = at::empty({nb}, offsets.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  plan_rank_kernel<<<static_cast<unsigned>(C), kPlanChunk, 0, stream>>>(
      ex.const_data_ptr<int32_t>(), N, static_cast<int32_t>(E), C, rank.mutable_data_ptr<int32_t>(),
      counts.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plan_chunk_scan_kernel<<<static_cast<unsigned>(nb), kScanThreads, 0, stream>>>(
      counts.mutable_data_ptr<int32_t>(), C, totals.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // offsets has E+1 entries: starts of buckets 0..E; the start of the tail bucket is offsets[E] = valid pairs.
  plan_offsets_kernel<<<1, kScanThreads, 0, stream>>>(totals.const_data_ptr<int64_t>(), nb,
                                                       offsets.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plan_scatter_kernel<<<static_cast<unsigned>(ceil_div(N, 256)), 256, 0, stream>>>(
      ex.const_data_ptr<int32_t>(), rank.const_data_ptr<int32_t>(), counts.const_data_ptr<int32_t>(),
      offsets.const_data_ptr<int64_t>(), N, static_cast<int32_t>(E), C, sorted_pairs.mutable_data_ptr<int32_t>(),
      pair_rows.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sorted_pairs, pair_rows, offsets};
}

void zero_unrouted_rows(const at::Tensor& rows, const at::Tensor& expert_offsets) {
  TORCH_CHECK(rows.is_cuda() && rows.is_contiguous() && rows.dim() >= 1,
              "zero_unrouted_rows: rows must be a contiguous CUDA tensor, got shape ", rows.sizes());
  TORCH_CHECK(expert_offsets.is_cuda() && expert_offsets.scalar_type() == at::kLong && expert_offsets.dim() == 1 &&
                  expert_offsets.numel() >= 1 && expert_offsets.is_contiguous(),
              "zero_unrouted_rows: expert_offsets must be a contiguous 1-D int64 CUDA tensor");
  const int64_t N = rows.size(0);
  if (rows.numel() == 0) return;
  const int64_t E = expert_offsets.numel() - 1;
  const int64_t row_bytes = rows.numel() / N * static_cast<int64_t>(rows.element_size());
  const c10::cuda::CUDAGuard guard(rows.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto word) {
    using word_t = decltype(word);
    const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(word_t));
    const int64_t blocks = std::min<int64_t>(ceil_div(N * row_words, 256), 1024);
    zero_unrouted_rows_kernel<word_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        expert_offsets.const_data_ptr<int64_t>(), E, N, row_words, static_cast<word_t*>(rows.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const void* base = rows.const_data_ptr();
  if (row_bytes % 16 == 0 && aligned(base, 16)) {
    launch(uint4{});
  } else if (row_bytes % 4 == 0 && aligned(base, 4)) {
    launch(uint32_t{});
  } else if (row_bytes % 2 == 0 && aligned(base, 2)) {
    launch(uint16_t{});
  } else {
    launch(uint8_t{});
  }
}

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& sorted_pairs, int64_t k) {
  check_gather_rows(x, sorted_pairs, k);
  const int64_t T = x.size(0);
  const int64_t H = x.size(1);
  const int64_t R = T * k;

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor sp = sorted_pairs.contiguous();
  at::Tensor out = at::empty({R, H}, xc.options());
  if (R == 0 || H == 0) return out;

  const int64_t row_bytes = H * static_cast<int64_t>(xc.element_size());
  const void* src = xc.const_data_ptr();
  const void* dst = out.const_data_ptr();
  const auto fits = [&](int64_t w) { return row_bytes % w == 0 && aligned(src, w) && aligned(dst, w); };
  TORCH_CHECK(ceil_div(R, kRowWarps) <= INT_MAX, "too many rows for one launch");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (fits(16)) {
    launch_gather<uint4>(xc, sp, R, k, row_bytes, out, stream);
  } else if (fits(8)) {
    launch_gather<uint2>(xc, sp, R, k, row_bytes, out, stream);
  } else if (fits(4)) {
    launch_gather<uint32_t>(xc, sp, R, k, row_bytes, out, stream);
  } else if (fits(2)) {
    launch_gather<uint16_t>(xc, sp, R, k, row_bytes, out, stream);
  } else {
    launch_gather<uint8_t>(xc, sp, R, k, row_bytes, out, stream);
  }
  return out;
}

at::Tensor combine_rows(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& pair_rows) {
  check_combine_rows(rows, weights, pair_rows);
  const int64_t T = weights.size(0);
  const int64_t k = weights.size(1);
  const int64_t H = rows.size(1);

  const c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor rc = rows.contiguous();
  const at::Tensor pr = pair_rows.contiguous();
  const at::Tensor w = weights.to(acc_dtype(rc.scalar_type())).contiguous();
  at::Tensor y = at::empty({T, H}, rc.options());
  if (T == 0 || H == 0) return y;

  const int64_t blocks = ceil_div(T, kRowWarps);
  TORCH_CHECK(blocks <= INT_MAX, "too many tokens for one launch");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rc.scalar_type(), "combine_rows_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec_ok = H % kVec == 0 && aligned(rc.const_data_ptr(), 16) && aligned(y.const_data_ptr(), 16);
    if (vec_ok) {
      combine_rows_kernel<scalar_t, kVec><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
          rc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t<scalar_t>>(), pr.const_data_ptr<int32_t>(), T, k,
          H, y.mutable_data_ptr<scalar_t>());
    } else {
      combine_rows_kernel<scalar_t, 1><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
          rc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t<scalar_t>>(), pr.const_data_ptr<int32_t>(), T, k,
          H, y.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace h3fusion::cuda

TORCH_LIBRARY_IMPL(h3fusion, CUDA, m) {
  m.impl("moe_route_plan", &h3fusion::cuda::route_plan);
  m.impl("moe_gather", &h3fusion::cuda::gather_rows);
  m.impl("moe_combine", &h3fusion::cuda::combine_rows);
}
