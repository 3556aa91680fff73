// Device side of the expert FFN's gated activations (math in h3fusion/activation.h): act(g) = g * P(g) and
// act'(g) = P(g) + g P'(g), in fp32, for the forward GEMM epilogue and the backward row kernels of both GEMM
// backends. The activation is a run-time argument: uniform over a launch, so the switch never diverges.
#pragma once

#include <h3fusion/activation.h>

namespace h3fusion::cuda::gemm {

__device__ __forceinline__ float sigmoid_f32(float v) { return 1.0f / (1.0f + expf(-v)); }

__device__ __forceinline__ float gate_p_f32(float g, Activation a) {
  switch (a) {
    case Activation::kGelu: return normcdff(g);
    case Activation::kGeluTanh:
      return sigmoid_f32(float(kGeluTanhScale) * (g + float(kGeluTanhCubic) * g * g * g));
    default: return sigmoid_f32(g);
  }
}

__device__ __forceinline__ float gate_dp_f32(float g, float P, Activation a) {
  switch (a) {
    case Activation::kGelu: return float(kInvSqrt2Pi) * expf(-0.5f * g * g);
    case Activation::kGeluTanh:
      return P * (1.0f - P) * float(kGeluTanhScale) * (1.0f + float(3 * kGeluTanhCubic) * g * g);
    default: return P * (1.0f - P);
  }
}

// act(g) = g * P(g). For silu this is g / (1 + exp(-g)); exp overflowing to inf gives -0 for very negative g.
__device__ __forceinline__ float gated_act_f32(float g, Activation a) {
  return a == Activation::kSilu ? g / (1.0f + expf(-g)) : g * gate_p_f32(g, a);
}

}  // namespace h3fusion::cuda::gemm
