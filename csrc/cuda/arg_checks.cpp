// Argument checks of the CUDA ops (declared and explained in arg_checks.h). A .cpp file: built by the C++ compiler.
#include "arg_checks.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>

#include "h3fusion/checks.h"
#include "h3fusion/op_checks.h"

namespace h3fusion::cuda {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

namespace {

// t: a `dim`-D floating tensor (check_float's dtypes) on a CUDA device.
void check_cuda_floating(const at::Tensor& t, const char* name, int64_t dim) {
  check_dim(t, name, dim);
  check_float(t, name);
  check_cuda(t, name);
}

// moe_ffn / moe_lora_ffn's x (or any of their floating inputs): floating, not float64 (CPU-only), on CUDA.
void check_cuda_float(const at::Tensor& t, const char* name) {
  check_float(t, name);
  TORCH_CHECK(t.scalar_type() != at::kDouble, name,
              " has dtype float64, which moe_ffn supports on the CPU only; on CUDA use float32, bfloat16 or float16");
  check_cuda(t, name);
}

}  // namespace

void check_topk_route(const at::Tensor& logits, int64_t k) {
  check_topk_route_args(logits, k);
  check_cuda(logits, "logits");
}

void check_topk_route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& experts) {
  check_topk_route_backward_args(grad_weights, logits, experts);
  check_cuda(logits, "logits");
}

void check_route_plan(const at::Tensor& experts, int64_t num_experts) {
  check_route_plan_args(experts, num_experts);
  check_cuda(experts, "experts");
}

void check_gather_rows(const at::Tensor& x, const at::Tensor& sorted_pairs, int64_t k) {
  check_cuda_floating(x, "x", 2);
  check_dim(sorted_pairs, "sorted_pairs", 1);
  check_dtype(sorted_pairs, "sorted_pairs", at::kInt);
  check_same_device(sorted_pairs, "sorted_pairs", x, "x");
  TORCH_CHECK(k >= 1 && k < INT_MAX, "k must be in [1, 2^31 - 1), got ", k);
  const int64_t R = x.size(0) * k;
  check_size(sorted_pairs, "sorted_pairs", 0, R, "x.shape[0] * k");
  TORCH_CHECK(R <= INT_MAX, "x.shape[0] * k = ", R, " must fit in int32 (sorted_pairs is int32)");
}

void check_combine_rows(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& pair_rows) {
  check_cuda_floating(rows, "rows", 2);
  check_dim(weights, "weights", 2);
  check_float(weights, "weights");
  check_same_device(weights, "weights", rows, "rows");
  check_dim(pair_rows, "pair_rows", 1);
  check_dtype(pair_rows, "pair_rows", at::kInt);
  check_same_device(pair_rows, "pair_rows", rows, "rows");
  const int64_t R = weights.size(0) * weights.size(1);
  check_size(pair_rows, "pair_rows", 0, R, "weights.shape[0] * weights.shape[1]");
  check_size(rows, "rows", 0, R, "weights.shape[0] * weights.shape[1]");
}

MoeDims check_moe_ffn_common(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                             const at::Tensor& down_proj) {
  check_dim(x, "x", 2);
  check_cuda_float(x, "x");
  return check_moe_ffn_args(x, weights, gate_up_proj, down_proj);
}

void check_moe_lora_x(const at::Tensor& x) { check_cuda_float(x, "x"); }

void check_logprob_hidden(const at::Tensor& hidden) {
  TORCH_CHECK(hidden.is_cuda(), "hidden must be a CUDA tensor for the CUDA kernel, got ", hidden.device());
}

}  // namespace h3fusion::cuda
