// CUDA bodies of moe_lora_ffn_forward / moe_lora_ffn_backward (schemas in csrc/ops.cpp, contract in design.md §10,
// oracle reference.moe_lora_ffn): the shared algorithm of h3fusion/moe_lora_ffn_impl.h (ATen GEMMs per expert,
// cuBLAS) over our CUDA route plan, gather and combine kernels (moe_plan.cu).
//
// Obviously correct first, fast later: the expert offsets are copied to the host once per forward and once per
// backward (a host-device sync, unlike moe_ffn; design.md §5's no-sync rule is not met yet), then every expert's
// GEMMs are launched from the host. Expert ids outside [0, E) land in the rows after offsets[E]; those rows are
// zeroed after every step, so such a pair contributes zero to y and gets zero gradient, as in moe_ffn.
// Deterministic: cuBLAS GEMMs without split-K atomics and the fixed-order combine.
// fp64 is refused (CPU only), as for moe_ffn.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <h3fusion/moe_lora_ffn_impl.h>

#include "arg_checks.h"
#include "launchers.cuh"

namespace h3fusion::cuda {
namespace {

struct CudaPrimitives : lora::AtenRowPasses {  // the row passes over ATen ops
  static constexpr bool kHostThreads = false;  // one stream: experts are launched one after another
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> route_plan(const at::Tensor& experts, int64_t E) {
    return h3fusion::cuda::route_plan(experts, E);
  }
  static at::Tensor gather(const at::Tensor& x, const at::Tensor& sorted_pairs, int64_t k) {
    return gather_rows(x, sorted_pairs, k);
  }
  static at::Tensor combine(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& pair_rows,
                            int64_t k) {
    const at::Tensor w =
        weights.defined() ? weights : at::ones({rows.size(0) / k, k}, rows.options().dtype(at::kFloat));
    return combine_rows(rows, w, pair_rows);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_lora_ffn_forward(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& experts, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& gate_up_a, const at::Tensor& gate_up_b, const at::Tensor& down_a,
    const at::Tensor& down_b, double scaling, c10::string_view activation, bool save_for_backward) {
  check_moe_lora_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return lora::forward<CudaPrimitives>(x, weights, experts, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a,
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
  check_moe_lora_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return lora::backward<CudaPrimitives>(grad_y, x, weights, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a,
                                        down_b, scaling, activation, sorted_pairs, pair_rows, expert_offsets,
                                        gate_up_out, gate_up_z, down_z, output_mask);
}

}  // namespace
}  // namespace h3fusion::cuda

TORCH_LIBRARY_IMPL(h3fusion, CUDA, m) {
  m.impl("moe_lora_ffn_forward", &h3fusion::cuda::moe_lora_ffn_forward);
  m.impl("moe_lora_ffn_backward", &h3fusion::cuda::moe_lora_ffn_backward);
}
