// One shape/dtype/device checker for every op, so each error names the argument it is about.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

namespace h3fusion {

// The argument `name` must have rank `dim`.
inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must be a ", dim, "-D tensor, got shape ", t.sizes());
}

// The argument `name` must have size `expected` along `dim` (what_expected explains where that size comes from).
inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                       const char* what_expected) {
  TORCH_CHECK(t.size(dim) == expected, name, ".shape[", dim, "] must equal ", what_expected, " (", expected,
              "), got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

// Floating dtypes the ops accept for activations and weights.
inline void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble, name,
              " must be float32, bfloat16, float16 or float64, got ", s);
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

}  // namespace h3fusion
