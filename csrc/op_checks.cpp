// The argument checks that an op's CPU and CUDA code share (topk_route, moe_route_plan, moe_ffn, linear_logprob,
// moe_lora_ffn), out of line so that every error they raise is thrown from code the C++ compiler built
// (h3fusion/checks.h says why).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "h3fusion/checks.h"
#include "h3fusion/expert_checks.h"
#include "h3fusion/logprob_driver.h"
#include "h3fusion/moe_lora_common.h"
#include "h3fusion/moe_lora_ffn_impl.h"
#include "h3fusion/op_checks.h"

namespace h3fusion {
namespace {

// Router logits [T, E], floating, E < 2^31 - 1 (expert ids are int32); returns E.
int64_t check_logits(const at::Tensor& logits) {
  check_dim(logits, "logits", 2);
  check_float(logits, "logits");
  const int64_t E = logits.size(1);
  TORCH_CHECK(E < INT_MAX, "logits.shape[1] (the number of experts) must be below 2^31 - 1, got ", E);
  return E;
}

}  // namespace

void check_topk_route_args(const at::Tensor& logits, int64_t k) {
  const int64_t E = check_logits(logits);
  TORCH_CHECK(k >= 1 && k <= E, "k must satisfy 1 <= k <= E (the number of experts, logits.shape[1] = ", E,
              "), got k = ", k);
}

void check_topk_route_backward_args(const at::Tensor& grad_weights, const at::Tensor& logits,
                                    const at::Tensor& experts) {
  const int64_t E = check_logits(logits), T = logits.size(0);
  check_dim(experts, "experts", 2);
  check_dtype(experts, "experts", at::kInt);
  check_same_device(experts, "experts", logits, "logits");
  check_size(experts, "experts", 0, T, "logits.shape[0]");
  const int64_t k = experts.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "experts.shape[1] (k) must satisfy 1 <= k <= E (logits.shape[1] = ", E, "), got ",
              k);
  check_dim(grad_weights, "grad_weights", 2);
  check_float(grad_weights, "grad_weights");
  check_same_device(grad_weights, "grad_weights", logits, "logits");
  check_size(grad_weights, "grad_weights", 0, T, "logits.shape[0]");
  check_size(grad_weights, "grad_weights", 1, k, "experts.shape[1]");
}

void check_route_plan_args(const at::Tensor& experts, int64_t num_experts) {
  check_dim(experts, "experts", 2);
  check_dtype(experts, "experts", at::kInt);
  TORCH_CHECK(num_experts >= 1 && num_experts < INT_MAX, "num_experts must be in [1, 2^31 - 1), got ",
              num_experts);
  const int64_t P = experts.numel();
  TORCH_CHECK(P < (int64_t(1) << 31), "experts has ", P, " entries; at most 2^31 - 1 (token, slot) pairs fit int32");
}

MoeDims check_moe_ffn_args(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                           const at::Tensor& down_proj) {
  check_dim(x, "x", 2);
  check_float(x, "x");
  check_dim(weights, "weights", 2);
  check_float(weights, "weights");
  TORCH_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == x.scalar_type(),
              "weights must have dtype float32 or x's dtype (", x.scalar_type(), "), got ", weights.scalar_type());
  MoeDims d{};
  d.T = x.size(0);
  d.H = x.size(1);
  d.k = weights.size(1);
  check_size(weights, "weights", 0, d.T, "x.shape[0]");
  TORCH_CHECK(d.k >= 1, "weights.shape[1] (k) must be >= 1, got shape ", weights.sizes());
  d.F = check_expert_weights(gate_up_proj, down_proj, x);
  d.E = gate_up_proj.size(0);
  TORCH_CHECK(d.E >= 1, "gate_up_proj.shape[0] (the number of experts E) must be >= 1, got shape ",
              gate_up_proj.sizes());
  TORCH_CHECK(d.T * d.k < (int64_t(1) << 31), "x.shape[0] * k = ", d.T * d.k,
              " (token, slot) pairs do not fit the int32 indices");
  check_same_device(weights, "weights", x, "x");
  check_same_device(gate_up_proj, "gate_up_proj", x, "x");
  check_same_device(down_proj, "down_proj", x, "x");
  return d;
}

void check_moe_ffn_experts(const at::Tensor& experts, const at::Tensor& x, const MoeDims& d) {
  check_dim(experts, "experts", 2);
  check_dtype(experts, "experts", at::kInt);
  check_same_device(experts, "experts", x, "x");
  check_size(experts, "experts", 0, d.T, "x.shape[0]");
  check_size(experts, "experts", 1, d.k, "weights.shape[1]");
}

namespace {

// The plan and grad_y a backward of moe_ffn or moe_lora_ffn gets back (R = T*k pairs over E experts).
void check_backward_plan(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& sorted_pairs,
                         const at::Tensor& pair_rows, const at::Tensor& expert_offsets, int64_t T, int64_t H,
                         int64_t k, int64_t E) {
  const int64_t R = T * k;
  check_dim(grad_y, "grad_y", 2);
  check_float(grad_y, "grad_y");
  check_same_device(grad_y, "grad_y", x, "x");
  check_size(grad_y, "grad_y", 0, T, "x.shape[0]");
  check_size(grad_y, "grad_y", 1, H, "x.shape[1]");
  for (const auto& [t, name] : {std::pair{&sorted_pairs, "sorted_pairs"}, std::pair{&pair_rows, "pair_rows"}}) {
    check_dim(*t, name, 1);
    check_dtype(*t, name, at::kInt);
    check_same_device(*t, name, x, "x");
    check_size(*t, name, 0, R, "x.shape[0] * k");
  }
  check_dim(expert_offsets, "expert_offsets", 1);
  check_dtype(expert_offsets, "expert_offsets", at::kLong);
  check_same_device(expert_offsets, "expert_offsets", x, "x");
  check_size(expert_offsets, "expert_offsets", 0, E + 1, "the number of experts + 1");
}

// A [R, width] tensor the forward saved for the backward, in x's dtype; empty when the forward kept nothing.
void check_saved_rows(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t R, int64_t width,
                      const char* what_width, const char* why_empty) {
  check_dim(t, name, 2);
  check_same_dtype(t, name, x, "x");
  check_same_device(t, name, x, "x");
  TORCH_CHECK(R == 0 || t.size(0) != 0, name, " is empty: ", why_empty, ", so it has no backward");
  check_size(t, name, 0, R, "x.shape[0] * k");
  check_size(t, name, 1, width, what_width);
}

}  // namespace

void check_moe_ffn_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& sorted_pairs,
                                 const at::Tensor& pair_rows, const at::Tensor& expert_offsets,
                                 const at::Tensor& gate_up_out, const MoeDims& d) {
  check_backward_plan(grad_y, x, sorted_pairs, pair_rows, expert_offsets, d.T, d.H, d.k, d.E);
  check_saved_rows(gate_up_out, "gate_up_out", x, d.T * d.k, 2 * d.F, "gate_up_proj.shape[1]",
                   "moe_ffn_forward ran with save_pre_activation=False");
}

}  // namespace h3fusion

namespace h3fusion::logprob {

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  check_dim(hidden, "hidden", 2);
  check_dim(weight, "weight", 2);
  check_dim(targets, "targets", 1);
  check_float(hidden, "hidden");
  check_same_dtype(weight, "weight", hidden, "hidden");
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
              "targets must have dtype int64 or int32, got ", targets.scalar_type());
  check_size(weight, "weight", 1, hidden.size(1), "hidden.shape[1] (H)");
  check_size(targets, "targets", 0, hidden.size(0), "hidden.shape[0] (N)");
  check_same_device(weight, "weight", hidden, "hidden");
  check_same_device(targets, "targets", hidden, "hidden");
  TORCH_CHECK(weight.size(0) > 0, "weight must have at least one row (vocabulary size V >= 1), got shape ",
              weight.sizes());
}

void check_row_vector(const at::Tensor& t, const char* name, const at::Tensor& hidden) {
  check_dim(t, name, 1);
  check_size(t, name, 0, hidden.size(0), "hidden.shape[0] (N)");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ", t.scalar_type());
  check_same_device(t, name, hidden, "hidden");
}

}  // namespace h3fusion::logprob

namespace h3fusion::lora {

Dims check_args(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& gate_up_proj,
                       const at::Tensor& down_proj, const at::Tensor& gate_up_a, const at::Tensor& gate_up_b,
                       const at::Tensor& down_a, const at::Tensor& down_b, double scaling) {
  check_dim(x, "x", 2);
  check_float(x, "x");
  const int64_t T = x.size(0), H = x.size(1);
  check_dim(weights, "weights", 2);
  check_float(weights, "weights");
  check_size(weights, "weights", 0, T, "x.shape[0]");
  TORCH_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == x.scalar_type(),
              "weights must have dtype float32 or x's dtype (", x.scalar_type(), "), got ", weights.scalar_type());
  const int64_t k = weights.size(1);
  TORCH_CHECK(k >= 1, "weights.shape[1] (k) must be >= 1, got shape ", weights.sizes());
  TORCH_CHECK(std::isfinite(scaling), "scaling (the LoRA scale) must be finite, got ", scaling);

  // The factors fix E and r.
  check_dim(gate_up_a, "gate_up_a", 3);
  check_same_dtype(gate_up_a, "gate_up_a", x, "x");
  const int64_t E = gate_up_a.size(0), r = gate_up_a.size(1);
  TORCH_CHECK(E >= 1, "gate_up_a.shape[0] (the number of experts E) must be >= 1, got shape ", gate_up_a.sizes());
  TORCH_CHECK(r >= 1, "gate_up_a.shape[1] (the LoRA rank r) must be >= 1, got shape ", gate_up_a.sizes());
  check_size(gate_up_a, "gate_up_a", 2, H, "x.shape[1]");

  check_dim(gate_up_proj, "gate_up_proj", 3);
  check_same_dtype(gate_up_proj, "gate_up_proj", x, "x");
  const int64_t Eb = gate_up_proj.size(0);
  TORCH_CHECK(Eb == 1 || Eb == E, "gate_up_proj.shape[0] must be 1 (a base shared by every expert) or the number of "
              "experts E = gate_up_a.shape[0] (", E, "), got shape ", gate_up_proj.sizes());
  const int64_t F = check_expert_weights(gate_up_proj, down_proj, x);

  check_dim(gate_up_b, "gate_up_b", 3);
  check_same_dtype(gate_up_b, "gate_up_b", x, "x");
  check_size(gate_up_b, "gate_up_b", 0, E, "gate_up_a.shape[0] (E)");
  check_size(gate_up_b, "gate_up_b", 1, 2 * F, "gate_up_proj.shape[1]");
  check_size(gate_up_b, "gate_up_b", 2, r, "gate_up_a.shape[1] (the rank r)");
  check_dim(down_a, "down_a", 3);
  check_same_dtype(down_a, "down_a", x, "x");
  check_size(down_a, "down_a", 0, E, "gate_up_a.shape[0] (E)");
  check_size(down_a, "down_a", 1, r, "gate_up_a.shape[1] (the rank r)");
  check_size(down_a, "down_a", 2, F, "gate_up_proj.shape[1] / 2");
  check_dim(down_b, "down_b", 3);
  check_same_dtype(down_b, "down_b", x, "x");
  check_size(down_b, "down_b", 0, E, "gate_up_a.shape[0] (E)");
  check_size(down_b, "down_b", 1, H, "x.shape[1]");
  check_size(down_b, "down_b", 2, r, "gate_up_a.shape[1] (the rank r)");

  check_same_device(weights, "weights", x, "x");
  check_same_device(gate_up_proj, "gate_up_proj", x, "x");
  check_same_device(down_proj, "down_proj", x, "x");
  check_same_device(gate_up_a, "gate_up_a", x, "x");
  check_same_device(gate_up_b, "gate_up_b", x, "x");
  check_same_device(down_a, "down_a", x, "x");
  check_same_device(down_b, "down_b", x, "x");
  return {T, H, k, E, F, r, Eb == 1};
}

std::vector<int64_t> host_offsets(const at::Tensor& offsets, int64_t E, int64_t R) {
  const at::Tensor o = offsets.to(at::kCPU).contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  std::vector<int64_t> off(p, p + E + 1);
  TORCH_CHECK(off[0] == 0 && off[E] <= R, "expert_offsets must start at 0 and end at most at x.shape[0] * k (", R,
              ")");
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(off[e + 1] >= off[e], "expert_offsets must be non-decreasing, got a drop after expert ", e);
  return off;
}

void check_saved(const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& sorted_pairs,
                 const at::Tensor& pair_rows, const at::Tensor& offsets, const at::Tensor& h, const at::Tensor& z1,
                 const at::Tensor& z2, const Dims& d) {
  check_backward_plan(grad_y, x, sorted_pairs, pair_rows, offsets, d.T, d.H, d.k, d.E);
  const char* why_empty = "moe_lora_ffn_forward ran with save_for_backward=False";
  const int64_t R = d.T * d.k;
  check_saved_rows(h, "gate_up_out", x, R, 2 * d.F, "gate_up_proj.shape[1]", why_empty);
  check_saved_rows(z1, "gate_up_z", x, R, d.r, "gate_up_a.shape[1] (the rank r)", why_empty);
  check_saved_rows(z2, "down_z", x, R, d.r, "gate_up_a.shape[1] (the rank r)", why_empty);
}

}  // namespace h3fusion::lora
