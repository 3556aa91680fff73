// One shape/dtype/device checker for every op, so each error names the argument it is about.
//
// Every argument check of the ops is defined out of line in a .cpp file (csrc/checks.cpp, csrc/op_checks.cpp,
// csrc/cuda/arg_checks.cpp), compiled by the C++ compiler, and none in the host code of a .cu file: on the first
// GPU run (H200 image, benchmarks/results/2026-12-04T1224-h200) each TORCH_CHECK that fired directly in the host
// code of a kernel-bearing .cu file killed the process (segfault) instead of raising, while the checks below,
// then inline and called from the same .cu functions, raised normally. Out of line, which compiler built the code
// that throws no longer depends on which inline copy the linker keeps.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace h3fusion {

// The argument `name` must have rank `dim`.
void check_dim(const at::Tensor& t, const char* name, int64_t dim);

// The argument `name` must have size `expected` along `dim` (what_expected explains where that size comes from).
void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const char* what_expected);

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype);

// Floating dtypes the ops accept for activations and weights: float32, bfloat16, float16, float64.
void check_float(const at::Tensor& t, const char* name);

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);

}  // namespace h3fusion
