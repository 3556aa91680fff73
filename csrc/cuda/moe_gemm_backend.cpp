// The choice of grouped-GEMM backend for the CUDA moe_ffn (contract in moe_gemm_backend.h), and the two ops that
// expose it: moe_ffn_gemm_backend() (which backend the latest CUDA moe_ffn call ran) and
// moe_ffn_set_gemm_backend(mode) (schemas in csrc/ops.cpp).
//
// What at::_grouped_mm accepts comes from torch's sources (aten/src/ATen/native/cuda/GroupedBlas.cpp, GroupMM.cu,
// GroupMMCommon.cuh, GroupedMMUtils.h):
//   * 2.8: CUDA only, bfloat16 only, compute capability major 9 only (an error elsewhere);
//   * 2.9+: the CUTLASS path for bfloat16 on major 9 or 10, a fallback elsewhere (float32/float16, other GPUs)
//     that copies the offsets to the host and loops over mm (a host sync per call);
//   * always: offsets int32, cumulative group ends; 16-byte aligned data pointers and row strides; output dtype =
//     input dtype; the CUTLASS path takes fewer than 1024 groups.
// Compile time: a torch without the operator (< 2.8) builds fine and reports "torch" as unavailable.
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <torch/version.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

#include "moe_gemm_backend.h"

namespace h3fusion::cuda {
namespace {

enum class Mode : int { kAuto = 0, kOwn = 1, kTorch = 2 };
constexpr int kNotRun = -1;

constexpr bool kTorchAtLeast29 = TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9);
constexpr int64_t kMaxTorchGroups = 1023;  // the CUTLASS grouped GEMM's limit (group_count < 1024)

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::kOwn:
      return "own";
    case Mode::kTorch:
      return "torch";
    default:
      return "auto";
  }
}

Mode parse_mode(const std::string& value, const char* source) {
  if (value.empty() || value == "auto") return Mode::kAuto;
  if (value == "own") return Mode::kOwn;
  if (value == "torch") return Mode::kTorch;
  TORCH_CHECK(false, source, " must be \"auto\", \"own\" or \"torch\", got \"", value, "\"");
}

// The mode: H3FUSION_GROUPED_GEMM read once (at the first use), then whatever moe_ffn_set_gemm_backend stored.
std::atomic<int>& mode_slot() {
  static std::atomic<int> slot([] {
    const char* env = std::getenv("H3FUSION_GROUPED_GEMM");
    return static_cast<int>(parse_mode(env == nullptr ? "" : env, "H3FUSION_GROUPED_GEMM"));
  }());
  return slot;
}

std::atomic<int> last_backend{kNotRun};

bool aligned16(const at::Tensor& t) {
  // a non-contiguous tensor is copied (freshly allocated, hence aligned) before the GEMMs read it
  return !t.is_contiguous() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Why at::_grouped_mm cannot run this call ("" when it can). fast_only: also require its device-side CUTLASS path.
std::string grouped_mm_refusal(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                               bool fast_only) {
#if !H3FUSION_HAS_GROUPED_MM
  (void)x, (void)gate_up, (void)down, (void)fast_only;
  return "this build's torch (" TORCH_VERSION ") has no at::_grouped_mm (torch >= 2.8 needed)";
#else
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(x.device().index());
  const int major = prop->major;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const bool cutlass_arch = major == 9 || (kTorchAtLeast29 && major == 10);
  const std::string where = std::string(c10::toString(x.scalar_type())) + " on sm_" + std::to_string(major) +
                            std::to_string(prop->minor) + " with torch " TORCH_VERSION;
  if (!(bf16 && cutlass_arch)) {
    if (fast_only) {
      return "at::_grouped_mm runs without a host sync only for bfloat16 on sm_90" +
             std::string(kTorchAtLeast29 ? "/sm_100" : "") + ", not " + where;
    }
    if (!kTorchAtLeast29) return "torch < 2.9's at::_grouped_mm takes bfloat16 on sm_90 only, not " + where;
  }
  const int64_t elem = x.element_size();
  const int64_t H = x.size(1);
  const int64_t F = down.size(2);
  if (H == 0 || F == 0) return "H and F must be positive for at::_grouped_mm";
  if ((H * elem) % 16 != 0 || (F * elem) % 16 != 0) {
    return "at::_grouped_mm needs 16-byte row strides: H and F multiples of " + std::to_string(16 / elem) +
           " for " + std::string(c10::toString(x.scalar_type())) + ", got H=" + std::to_string(H) +
           ", F=" + std::to_string(F);
  }
  if (gate_up.size(0) > kMaxTorchGroups) {
    return "at::_grouped_mm takes at most " + std::to_string(kMaxTorchGroups) + " experts, got " +
           std::to_string(gate_up.size(0));
  }
  if (!aligned16(gate_up) || !aligned16(down)) {
    return "at::_grouped_mm needs 16-byte aligned gate_up_proj and down_proj (a view at an odd offset?)";
  }
  return "";
#endif
}

// ---- the ops ------------------------------------------------------------------------------------------------

std::string moe_ffn_gemm_backend_op() {
  const int b = last_backend.load();
  return b == kNotRun ? "none" : (b == static_cast<int>(MoeGemmBackend::kTorch) ? "torch" : "own");
}

std::string moe_ffn_set_gemm_backend_op(std::optional<std::string> mode) {
  const Mode previous = static_cast<Mode>(mode_slot().load());
  if (mode.has_value()) mode_slot().store(static_cast<int>(parse_mode(*mode, "mode")));
  return mode_name(previous);
}

}  // namespace

MoeGemmBackend choose_moe_gemm_backend(const at::Tensor& x, const at::Tensor& gate_up_proj,
                                       const at::Tensor& down_proj) {
  const Mode mode = static_cast<Mode>(mode_slot().load());
  MoeGemmBackend backend = MoeGemmBackend::kOwn;
  if (mode == Mode::kTorch) {
    const std::string why = grouped_mm_refusal(x, gate_up_proj, down_proj, /*fast_only=*/false);
    TORCH_CHECK(why.empty(), "moe_ffn: the grouped-GEMM backend is \"torch\" (H3FUSION_GROUPED_GEMM or "
                "moe_ffn_set_gemm_backend) but ", why, "; use \"auto\" or \"own\" for this call");
    backend = MoeGemmBackend::kTorch;
  } else if (mode == Mode::kAuto && grouped_mm_refusal(x, gate_up_proj, down_proj, /*fast_only=*/true).empty()) {
    backend = MoeGemmBackend::kTorch;
  }
  last_backend.store(static_cast<int>(backend));
  return backend;
}

}  // namespace h3fusion::cuda

TORCH_LIBRARY_IMPL(h3fusion, CompositeExplicitAutograd, m) {
  m.impl("moe_ffn_gemm_backend", &h3fusion::cuda::moe_ffn_gemm_backend_op);
  m.impl("moe_ffn_set_gemm_backend", &h3fusion::cuda::moe_ffn_set_gemm_backend_op);
}
