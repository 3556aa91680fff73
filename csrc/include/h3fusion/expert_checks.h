// Argument checks of the base expert weights, shared by moe_ffn (CPU) and moe_lora_ffn (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <h3fusion/checks.h>

namespace h3fusion {

// gate_up_proj[Eb, 2F, H] and down_proj[Eb, H, F] in x's dtype, H = x.shape[1]; the number of experts Eb is the
// caller's to check. Returns F. Every error names its argument. Defined in csrc/checks.cpp.
int64_t check_expert_weights(const at::Tensor& gate_up_proj, const at::Tensor& down_proj, const at::Tensor& x);

}  // namespace h3fusion
