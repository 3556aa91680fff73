// CPU bodies of moe_lora_ffn_forward / moe_lora_ffn_backward (schemas in csrc/ops.cpp, contract in design.md §10,
// oracle reference.moe_lora_ffn): the shared algorithm of h3fusion/moe_lora_ffn_impl.h over the CPU route plan,
// gather and combine of moe_cpu.h and moe_ffn's vectorised gated-activation row passes (row_passes.h). GEMMs are
// ATen's; the schedule (experts over threads, BLAS threads in the base GEMMs) is moe_lora_common.h's.
#include "moe_cpu.h"
#include "row_passes.h"

#include <ATen/ATen.h>
#include <cstdlib>
#include <torch/library.h>

#include <h3fusion/moe_lora_ffn_impl.h>

namespace h3fusion::cpu {
namespace {

// The CPU plan, gather and combine (moe_cpu.h).
struct CpuPlan {
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

// The CPU op: experts over threads, moe_ffn's vectorised row passes.
struct CpuPrimitives : CpuPlan {
  static constexpr bool kHostThreads = true;  // experts may be spread over at::parallel_for threads
  // a[n,F] = act(h[:, :F]) * h[:, F:] (row slices of contiguous buffers).
  static void gated(const at::Tensor& a, const at::Tensor& h, int64_t F, Activation act) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "h3fusion_lora_gated_cpu", [&] {
      gated_rows<scalar_t>(h.mutable_data_ptr<scalar_t>(), a.mutable_data_ptr<scalar_t>(), a.stride(0), h.size(0), F,
                           act);
    });
  }
  // grad_w_pair[sp[i]] = u_i . a_i and dh = the gated backward of w u (either may be undefined); u is left as is.
  static void gated_backward(const at::Tensor& h, const at::Tensor& u, const at::Tensor& dh, const at::Tensor& sp,
                             const at::Tensor& w_pair, const at::Tensor& grad_w_pair, int64_t F, Activation act) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "h3fusion_lora_gated_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gated_backward_dispatch<scalar_t>(
          dh.defined(), grad_w_pair.defined(), /*write_a=*/false, h.const_data_ptr<scalar_t>(),
          u.mutable_data_ptr<scalar_t>(), dh.defined() ? dh.mutable_data_ptr<scalar_t>() : nullptr,
          sp.const_data_ptr<int32_t>(), w_pair.const_data_ptr<acc_t>(),
          grad_w_pair.defined() ? grad_w_pair.mutable_data_ptr<acc_t>() : nullptr, /*gy=*/nullptr, /*scale_gy=*/false,
          h.size(0), F, /*H=*/0, act);
    });
  }
};

// What the CUDA op runs, on the CPU: experts one after another, the ATen row passes. Selected by
// H3FUSION_LORA_GENERIC=1 (read per call), so that the CPU tests cover the device-generic code paths of the CUDA op.
struct CpuGenericPrimitives : CpuPlan, lora::AtenRowPasses {
  static constexpr bool kHostThreads = false;
};

// Also where H3FUSION_CPU_ISA is first read, on the calling thread: a bad value is an error there, not in a worker.
bool generic_requested() {
  (void)cpu_isa_capped_at_avx2();
  const char* v = std::getenv("H3FUSION_LORA_GENERIC");
  return v != nullptr && v[0] == '1';
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_lora_ffn_forward(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& experts, const at::Tensor& gate_up_proj,
    const at::Tensor& down_proj, const at::Tensor& gate_up_a, const at::Tensor& gate_up_b, const at::Tensor& down_a,
    const at::Tensor& down_b, double scaling, c10::string_view activation, bool save_for_backward) {
  auto run = [&](auto dev) {
    return lora::forward<decltype(dev)>(x, weights, experts, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a,
                                        down_b, scaling, activation, save_for_backward);
  };
  return generic_requested() ? run(CpuGenericPrimitives{}) : run(CpuPrimitives{});
}

lora::Grads moe_lora_ffn_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights,
                                  const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
                                  const at::Tensor& gate_up_a, const at::Tensor& gate_up_b, const at::Tensor& down_a,
                                  const at::Tensor& down_b, double scaling, c10::string_view activation,
                                  const at::Tensor& sorted_pairs, const at::Tensor& pair_rows,
                                  const at::Tensor& expert_offsets, const at::Tensor& gate_up_out,
                                  const at::Tensor& gate_up_z, const at::Tensor& down_z,
                                  std::array<bool, 8> output_mask) {
  auto run = [&](auto dev) {
    return lora::backward<decltype(dev)>(grad_y, x, weights, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a,
                                         down_b, scaling, activation, sorted_pairs, pair_rows, expert_offsets,
                                         gate_up_out, gate_up_z, down_z, output_mask);
  };
  return generic_requested() ? run(CpuGenericPrimitives{}) : run(CpuPrimitives{});
}

}  // namespace
}  // namespace h3fusion::cpu

TORCH_LIBRARY_IMPL(h3fusion, CPU, m) {
  m.impl("moe_lora_ffn_forward", &h3fusion::cpu::moe_lora_ffn_forward);
  m.impl("moe_lora_ffn_backward", &h3fusion::cpu::moe_lora_ffn_backward);
}
