// CPU token permutation: the route plan (stable counting sort of (token, slot) pairs by expert), the gather of
// token rows into expert-sorted order, and the weighted combine back to tokens.
#include "moe_cpu.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <h3fusion/checks.h>
#include <h3fusion/op_checks.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace h3fusion::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_plan(const at::Tensor& experts_in, int64_t num_experts) {
  check_route_plan_args(experts_in, num_experts);
  const at::Tensor experts = experts_in.contiguous();
  const int64_t P = experts.numel();
  const int32_t* ids = experts.const_data_ptr<int32_t>();
  at::Tensor offsets = at::empty({num_experts + 1}, experts.options().dtype(at::kLong));
  at::Tensor sorted_pairs = at::empty({P}, experts.options());
  at::Tensor pair_rows = at::empty({P}, experts.options());
  int64_t* off = offsets.mutable_data_ptr<int64_t>();
  int32_t* sp = sorted_pairs.mutable_data_ptr<int32_t>();
  int32_t* pr = pair_rows.mutable_data_ptr<int32_t>();

  // One serial pass to count and one to place: O(T*k), cheap next to the GEMMs, and trivially stable.
  std::vector<int64_t> cursor(num_experts + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    const int32_t e = ids[p];
    TORCH_CHECK(e >= 0 && e < num_experts, "experts must lie in [0, num_experts = ", num_experts, "), found ", e,
                " at flat position ", p);
    ++cursor[e + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) cursor[e + 1] += cursor[e];
  std::memcpy(off, cursor.data(), sizeof(int64_t) * (num_experts + 1));
  for (int64_t p = 0; p < P; ++p) {
    const int64_t r = cursor[ids[p]]++;
    sp[r] = static_cast<int32_t>(p);
    pr[p] = static_cast<int32_t>(r);
  }
  return {sorted_pairs, pair_rows, offsets};
}

at::Tensor gather_rows(const at::Tensor& x_in, const at::Tensor& sorted_pairs_in, int64_t k) {
  check_dim(x_in, "x", 2);
  check_dim(sorted_pairs_in, "sorted_pairs", 1);
  check_dtype(sorted_pairs_in, "sorted_pairs", at::kInt);
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  const int64_t T = x_in.size(0), H = x_in.size(1);
  check_size(sorted_pairs_in, "sorted_pairs", 0, T * k, "x.shape[0] * k");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor sorted_pairs = sorted_pairs_in.contiguous();
  const int64_t R = T * k;
  at::Tensor out = at::empty({R, H}, x.options());
  if (R == 0 || H == 0) return out;
  const int32_t* sp = sorted_pairs.const_data_ptr<int32_t>();
  const auto* src = static_cast<const char*>(x.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t row_bytes = H * x.element_size();
  std::atomic<bool> ok{true};
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = sp[r];
      if (p < 0 || p >= R) {
        ok.store(false, std::memory_order_relaxed);
        return;
      }
      std::memcpy(dst + r * row_bytes, src + (p / k) * row_bytes, row_bytes);
    }
  });
  TORCH_CHECK(ok.load(), "sorted_pairs must lie in [0, x.shape[0] * k = ", R, ")");
  return out;
}

at::Tensor combine_rows(const at::Tensor& rows_in, const at::Tensor& weights_in, const at::Tensor& pair_rows_in,
                        int64_t k) {
  check_dim(rows_in, "rows", 2);
  check_float(rows_in, "rows");
  check_dim(pair_rows_in, "pair_rows", 1);
  check_dtype(pair_rows_in, "pair_rows", at::kInt);
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  const int64_t R = rows_in.size(0), H = rows_in.size(1);
  check_size(pair_rows_in, "pair_rows", 0, R, "rows.shape[0]");
  TORCH_CHECK(R % k == 0, "rows.shape[0] (", R, ") must be a multiple of k (", k, ")");
  const int64_t T = R / k;
  const bool has_w = weights_in.defined();
  if (has_w) {
    check_dim(weights_in, "weights", 2);
    check_float(weights_in, "weights");
    check_size(weights_in, "weights", 0, T, "rows.shape[0] / k");
    check_size(weights_in, "weights", 1, k, "k");
    check_same_device(weights_in, "weights", rows_in, "rows");
  }
  check_same_device(pair_rows_in, "pair_rows", rows_in, "rows");
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor pair_rows = pair_rows_in.contiguous();
  at::Tensor y = at::empty({T, H}, rows.options());
  if (T == 0 || H == 0) return y;
  const auto acc_dtype = rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = has_w ? weights_in.to(acc_dtype).contiguous() : at::Tensor();
  std::atomic<bool> ok{true};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "h3fusion_moe_combine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = rows.const_data_ptr<scalar_t>();
    const int32_t* pr = pair_rows.const_data_ptr<int32_t>();
    const acc_t* wp = has_w ? w.const_data_ptr<acc_t>() : nullptr;
    scalar_t* dst = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(H * k, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(H);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {  // slot order: the same sum every run
          const int64_t r = pr[t * k + j];
          if (r < 0 || r >= R) {
            ok.store(false, std::memory_order_relaxed);
            return;
          }
          const acc_t wt = wp ? wp[t * k + j] : acc_t(1);
          const scalar_t* s = src + r * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += wt * static_cast<acc_t>(s[h]);
        }
        scalar_t* d = dst + t * H;
        for (int64_t h = 0; h < H; ++h) d[h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  TORCH_CHECK(ok.load(), "pair_rows must lie in [0, rows.shape[0] = ", R, ")");
  return y;
}

namespace {

// The public moe_gather / moe_combine take an index tensor from the caller, and their backward reads through
// its inverse (h3fusion_ext/moe.py), which is only defined for a permutation: a repeated entry leaves rows of the
// inverse unset and the gradient would read them. One serial O(T*k) pass, cheap next to the copy itself.
// (moe_ffn's plan comes from route_plan and is a permutation by construction, so it calls the unchecked pieces.)
void check_permutation(const at::Tensor& perm_in, const char* name) {
  check_dim(perm_in, name, 1);
  check_dtype(perm_in, name, at::kInt);
  const at::Tensor perm = perm_in.contiguous();
  const int64_t n = perm.numel();
  const int32_t* v = perm.const_data_ptr<int32_t>();
  std::vector<uint8_t> seen(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = v[i];
    TORCH_CHECK(r >= 0 && r < n, name, " must be a permutation of [0, ", n, "), found ", r, " at position ", i);
    TORCH_CHECK(!seen[r], name, " must be a permutation of [0, ", n, "), found ", r, " twice (again at position ", i,
                ")");
    seen[r] = 1;
  }
}

at::Tensor moe_gather(const at::Tensor& x, const at::Tensor& sorted_pairs, int64_t k) {
  check_dim(x, "x", 2);
  check_same_device(sorted_pairs, "sorted_pairs", x, "x");
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  check_dim(sorted_pairs, "sorted_pairs", 1);
  check_size(sorted_pairs, "sorted_pairs", 0, x.size(0) * k, "x.shape[0] * k");
  check_permutation(sorted_pairs, "sorted_pairs");
  return gather_rows(x, sorted_pairs, k);
}

at::Tensor moe_combine(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& pair_rows) {
  check_dim(weights, "weights", 2);
  const int64_t k = weights.size(1);
  TORCH_CHECK(k >= 1, "weights.shape[1] (k) must be >= 1, got ", k);
  check_dim(rows, "rows", 2);
  check_same_device(pair_rows, "pair_rows", rows, "rows");
  check_dim(pair_rows, "pair_rows", 1);
  check_size(pair_rows, "pair_rows", 0, rows.size(0), "rows.shape[0]");
  check_permutation(pair_rows, "pair_rows");
  return combine_rows(rows, weights, pair_rows, k);
}

}  // namespace
}  // namespace h3fusion::cpu

TORCH_LIBRARY_IMPL(h3fusion, CPU, m) {
  m.impl("moe_route_plan", &h3fusion::cpu::route_plan);
  m.impl("moe_gather", &h3fusion::cpu::moe_gather);
  m.impl("moe_combine", &h3fusion::cpu::moe_combine);
}
