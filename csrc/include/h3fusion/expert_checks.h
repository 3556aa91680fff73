// Argument checks of the base expert weights, shared by moe_ffn (CPU) and moe_lora_ffn (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <h3fusion/checks.h>

namespace h3fusion {

// gate_up_proj[Eb, 2F, H] and down_proj[Eb, H, F] in x's dtype, H = x.shape[1]; the number of experts Eb is the
// caller's to check. Returns F. Every error names its argument.
inline int64_t check_expert_weights(const at::Tensor& gate_up_proj, const at::Tensor& down_proj, const at::Tensor& x) {
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

}  // namespace h3fusion
