// The gated activations of the expert FFN, act(gate) * up, shared by the CPU and CUDA kernels.
//
// Every activation is written act(g) = g * P(g), so that one backward formula serves all of them:
//   act'(g) = P(g) + g * P'(g).
//   silu:      P = sigmoid(g)                                   P' = P (1 - P)
//   gelu:      P = Phi(g), the standard normal CDF (exact GELU)  P' = exp(-g^2 / 2) / sqrt(2 pi)
//   gelu_tanh: P = sigmoid(c (g + 0.044715 g^3)), c = 2 sqrt(2/pi)   (0.5 (1 + tanh(u)) = sigmoid(2u): the same
//              function as transformers' "gelu_pytorch_tanh" / "gelu_new")
//                                                                P' = P (1 - P) c (1 + 3 * 0.044715 g^2)
#pragma once

#include <string_view>

namespace h3fusion {

enum class Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

// c = 2 sqrt(2 / pi) and the cubic coefficient of the tanh approximation.
constexpr double kGeluTanhScale = 1.5957691216057307;
constexpr double kGeluTanhCubic = 0.044715;
constexpr double kInvSqrt2Pi = 0.3989422804014327;  // 1 / sqrt(2 pi)
constexpr double kInvSqrt2 = 0.7071067811865476;

// The op argument `activation` ("silu", "gelu", "gelu_tanh") -> the enum; anything else is a clear error.
// Defined in csrc/checks.cpp (host code; see checks.h for why argument errors are raised out of line).
Activation parse_activation(std::string_view name);

}  // namespace h3fusion
