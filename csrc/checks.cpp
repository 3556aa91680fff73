// The shape/dtype/device checkers of h3fusion/checks.h and h3fusion/expert_checks.h, and parse_activation: out of
// line, so that every error they raise is thrown from code the C++ compiler built (checks.h says why).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>

#include "h3fusion/activation.h"
#include "h3fusion/checks.h"
#include "h3fusion/expert_checks.h"

namespace h3fusion {

void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must be a ", dim, "-D tensor, got shape ", t.sizes());
}

void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const char* what_expected) {
  TORCH_CHECK(t.size(dim) == expected, name, ".shape[", dim, "] must equal ", what_expected, " (", expected,
              "), got shape ", t.sizes());
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble, name,
              " must be float32, bfloat16, float16 or float64, got ", s);
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

int64_t check_expert_weights(const at::Tensor& gate_up_proj, const at::Tensor& down_proj, const at::Tensor& x) {
  check_dim(gate_up_proj, "gate_up_proj", 3);
  check_same_dtype(gate_up_proj, "gate_up_proj", x, "x");
  TORCH_CHECK(gate_up_proj.size(1) % 2 == 0, "gate_up_proj.shape[1] must be even (2 * intermediate size), got shape ",
              gate_up_proj.sizes());
  check_size(gate_up_proj, "gate_up_proj", 2, x.size(1), "x.shape[1]");
  const int64_t F = gate_up_proj.size(1) / 2;
  check_dim(down_proj, "down_proj", 3);
  check_same_dtype(down_proj, "down_proj", x, "x");
  check_size(down_proj, "down_proj", 0, gate_up_proj.size(0), "gate_up_proj.shape[0]");
  check_size(down_proj, "down_proj", 1, x.size(1), "x.shape[1]");
  check_size(down_proj, "down_proj", 2, F, "gate_up_proj.shape[1] / 2");
  return F;
}

Activation parse_activation(std::string_view name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(false, "activation must be one of \"silu\", \"gelu\", \"gelu_tanh\", got \"", std::string(name), "\"");
}

}  // namespace h3fusion
