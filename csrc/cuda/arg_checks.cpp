// Argument checks of the CUDA ops (declared and explained in arg_checks.h). A .cpp file: built by the C++ compiler.
#include "arg_checks.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>
#include <utility>

#include "h3fusion/checks.h"

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
  check_cuda_floating(logits, "logits", 2);
  const int64_t E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "k must satisfy 1 <= k <= E (the number of experts, logits.shape[1] = ", E,
              "), got k=", k);
  TORCH_CHECK(E < INT_MAX, "logits.shape[1] (the number of experts) must be below 2^31 - 1, got ", E);
}

void check_topk_route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& experts) {
  check_cuda_floating(logits, "logits", 2);
  check_dim(experts, "experts", 2);
  check_dtype(experts, "experts", at::kInt);
  check_same_device(experts, "experts", logits, "logits");
  check_dim(grad_weights, "grad_weights", 2);
  check_float(grad_weights, "grad_weights");
  check_same_device(grad_weights, "grad_weights", logits, "logits");
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  const int64_t k = experts.size(1);
  check_size(experts, "experts", 0, T, "logits.shape[0]");
  TORCH_CHECK(k >= 1 && k <= E, "experts.shape[1] (k) must satisfy 1 <= k <= E (logits.shape[1] = ", E, "), got ",
              k);
  check_size(grad_weights, "grad_weights", 0, T, "logits.shape[0]");
  check_size(grad_weights, "grad_weights", 1, k, "experts.shape[1]");
  TORCH_CHECK(E < INT_MAX, "logits.shape[1] (the number of experts) must be below 2^31 - 1, got ", E);
}

void check_route_plan(const at::Tensor& experts, int64_t num_experts) {
  check_dim(experts, "experts", 2);
  check_dtype(experts, "experts", at::kInt);
  check_cuda(experts, "experts");
  TORCH_CHECK(num_experts >= 1 && num_experts < INT_MAX, "num_experts must be in [1, 2^31 - 1), got ",
              num_experts);
  const int64_t N = experts.numel();
  TORCH_CHECK(N <= INT_MAX, "experts has ", N, " entries; T*k must fit in int32 (the index outputs are int32)");
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
  check_dim(weights, "weights", 2);
  check_float(weights, "weights");
  TORCH_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == x.scalar_type(),
              "weights must have dtype float32 or x's dtype (", x.scalar_type(), "), got ", weights.scalar_type());
  check_same_device(weights, "weights", x, "x");
  check_dim(gate_up_proj, "gate_up_proj", 3);
  check_same_dtype(gate_up_proj, "gate_up_proj", x, "x");
  check_same_device(gate_up_proj, "gate_up_proj", x, "x");
  check_dim(down_proj, "down_proj", 3);
  check_same_dtype(down_proj, "down_proj", x, "x");
  check_same_device(down_proj, "down_proj", x, "x");

  MoeDims d{};
  d.T = x.size(0);
  d.H = x.size(1);
  d.k = weights.size(1);
  d.E = gate_up_proj.size(0);
  check_size(weights, "weights", 0, d.T, "x.shape[0]");
  TORCH_CHECK(d.E >= 1, "gate_up_proj.shape[0] (the number of experts E) must be >= 1, got ", d.E);
  // k > E is legal here (a token may list one expert twice; every pair is its own row), as on the CPU
  TORCH_CHECK(d.k >= 1, "weights.shape[1] (k) must be >= 1, got shape ", weights.sizes());
  TORCH_CHECK(gate_up_proj.size(1) % 2 == 0, "gate_up_proj.shape[1] must be 2F (even), got shape ",
              gate_up_proj.sizes());
  d.F = gate_up_proj.size(1) / 2;
  check_size(gate_up_proj, "gate_up_proj", 2, d.H, "x.shape[1]");
  check_size(down_proj, "down_proj", 0, d.E, "gate_up_proj.shape[0]");
  check_size(down_proj, "down_proj", 1, d.H, "x.shape[1]");
  check_size(down_proj, "down_proj", 2, d.F, "gate_up_proj.shape[1] / 2");
  TORCH_CHECK(d.T * d.k < (int64_t(1) << 31), "x.shape[0] * k = ", d.T * d.k,
              " (token, slot) pairs do not fit the int32 indices");
  return d;
}

void check_moe_ffn_experts(const at::Tensor& experts, const at::Tensor& x, const MoeDims& d) {
  check_dim(experts, "experts", 2);
  check_dtype(experts, "experts", at::kInt);
  check_same_device(experts, "experts", x, "x");
  check_size(experts, "experts", 0, d.T, "x.shape[0]");
  check_size(experts, "experts", 1, d.k, "weights.shape[1]");
}

void check_moe_ffn_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& sorted_pairs,
                            const at::Tensor& pair_rows, const at::Tensor& expert_offsets,
                            const at::Tensor& gate_up_out, const MoeDims& d) {
  const int64_t R = d.T * d.k;
  check_dim(grad_y, "grad_y", 2);
  // any float dtype, cast to x's by the op: the CPU op accepts the same (grad_y.to(x.dtype)), so both agree
  check_float(grad_y, "grad_y");
  check_same_device(grad_y, "grad_y", x, "x");
  check_size(grad_y, "grad_y", 0, d.T, "x.shape[0]");
  check_size(grad_y, "grad_y", 1, d.H, "x.shape[1]");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{sorted_pairs, "sorted_pairs"},
                                std::pair<const at::Tensor&, const char*>{pair_rows, "pair_rows"}}) {
    check_dim(t, name, 1);
    check_dtype(t, name, at::kInt);
    check_same_device(t, name, x, "x");
    check_size(t, name, 0, R, "x.shape[0] * k");
  }
  check_dim(expert_offsets, "expert_offsets", 1);
  check_dtype(expert_offsets, "expert_offsets", at::kLong);
  check_same_device(expert_offsets, "expert_offsets", x, "x");
  check_size(expert_offsets, "expert_offsets", 0, d.E + 1, "gate_up_proj.shape[0] + 1");
  check_dim(gate_up_out, "gate_up_out", 2);
  check_same_dtype(gate_up_out, "gate_up_out", x, "x");
  check_same_device(gate_up_out, "gate_up_out", x, "x");
  TORCH_CHECK(R == 0 || gate_up_out.size(0) != 0,
              "gate_up_out is empty: moe_ffn_forward ran with save_pre_activation=False, so it has no backward");
  check_size(gate_up_out, "gate_up_out", 0, R, "x.shape[0] * k");
  check_size(gate_up_out, "gate_up_out", 1, 2 * d.F, "gate_up_proj.shape[1]");
}

void check_moe_lora_x(const at::Tensor& x) { check_cuda_float(x, "x"); }

void check_logprob_hidden(const at::Tensor& hidden) {
  TORCH_CHECK(hidden.is_cuda(), "hidden must be a CUDA tensor for the CUDA kernel, got ", hidden.device());
}

}  // namespace h3fusion::cuda
