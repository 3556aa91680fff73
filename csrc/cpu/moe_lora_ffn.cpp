// CPU bodies of moe_lora_ffn_forward / moe_lora_ffn_backward (schemas in csrc/ops.cpp, contract in design.md §10,
// oracle reference.moe_lora_ffn): the shared algorithm of h3fusion/moe_lora_ffn_impl.h over the CPU route plan,
// gather and combine of moe_cpu.h. GEMMs are ATen's (BLAS threads inside each); experts run one after another.
#include "moe_cpu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <h3fusion/moe_lora_ffn_impl.h>

namespace h3fusion::cpu {
namespace {

struct CpuPrimitives {
  static constexpr bool kHostThreads = true;  // experts may be spread over at::parallel_for threads
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> route_plan(const at::Tensor& experts, int64_t E) {
    return h3fusion::cpu::route_plan(experts, E);
  }
  static at::Tensor gather(const at::Tensor& x, const at::Tensor& sorted_pairs, int64_t k) {
    return gather_rows(x, sorted_pairs, k);
  }
  static at::Tensor combine(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& pair_rows,
                            int64_t k) {
    return combine_rows(rows, weights, pair_rows, k);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_lora_ffn_forward(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& experts, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& gate_up_a, const at::Tensor& gate_up_b, const at::Tensor& down_a,
    const at::Tensor& down_b, double scaling, c10::string_view activation, bool save_for_backward) {
  return lora::forward<CpuPrimitives>(x, weights, experts, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a,
                                      down_b, scaling, activation, save_for_backward);
}

lora::Grads moe_lora_ffn_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights,
                                  const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
                                  const at::Tensor& gate_up_a, const at::Tensor& gate_up_b, const at::Tensor& down_a,
                                  const at::Tensor& down_b, double scaling, c10::string_view activation,
                                  const at::Tensor& sorted_pairs, const at::Tensor& pair_rows,
                                  const at::Tensor& expert_offsets, const at::Tensor& gate_up_out,
                                  const at::Tensor& gate_up_z, const at::Tensor& down_z,
                                  std::array<bool, 8> output_mask) {
  return lora::backward<CpuPrimitives>(grad_y, x, weights, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a,
                                       down_b, scaling, activation, sorted_pairs, pair_rows, expert_offsets,
                                       gate_up_out, gate_up_z, down_z, output_mask);
}

}  // namespace
}  // namespace h3fusion::cpu

TORCH_LIBRARY_IMPL(h3fusion, CPU, m) {
  m.impl("moe_lora_ffn_forward", &h3fusion::cpu::moe_lora_ffn_forward);
  m.impl("moe_lora_ffn_backward", &h3fusion::cpu::moe_lora_ffn_backward);
}
