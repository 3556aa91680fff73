// The whole op surface of h3fusion_ext, declared once.
//
// CPU bodies live in csrc/cpu/*.cpp and CUDA bodies in csrc/cuda/*.cu; each of those files registers its own
// kernels with TORCH_LIBRARY_IMPL(h3fusion, CPU|CUDA, m). Fake (meta) kernels and autograd are registered in
// Python (h3fusion_ext/*.py), so torch.compile can trace every op.
//
// Conventions shared by every op (design.md §5):
//   * activations/weights: fp32, bf16, fp16 (fp64 on the CPU for gradcheck); accumulation in fp32 (fp64 for fp64);
//   * index tensors are int32; per-expert offsets are int64 and stay on the device;
//   * "pair" p = t * k + j names slot j of token t; "row" r is a position in the expert-sorted order.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(h3fusion, m) {
  // ---- routing ------------------------------------------------------------------------------------------------
  // logits[T,E] (any float dtype) -> weights[T,k] fp32 (fp64 for fp64 logits), experts[T,k] int32.
  // softmax over E, top-k (ties to the lower expert index, sorted by descending weight), optional renormalisation.
  m.def("topk_route(Tensor logits, int k, bool renormalize) -> (Tensor weights, Tensor experts)");
  // d(loss)/d(logits)[T,E] in logits.dtype, recomputing the softmax from logits.
  m.def("topk_route_backward(Tensor grad_weights, Tensor logits, Tensor experts, bool renormalize) -> Tensor");

  // ---- permutation ------------------------------------------------------------------------------------------
  // experts[T,k] int32 -> sorted_pairs[T*k] int32 (row -> pair, stable counting sort by expert),
  //                       pair_rows[T*k] int32 (pair -> row, the inverse permutation),
  //                       expert_offsets[E+1] int64 (rows of expert e are [offsets[e], offsets[e+1])).
  // Expert ids outside [0, E): the CPU raises; CUDA (no host sync) puts those pairs in rows [offsets[E], T*k).
  m.def("moe_route_plan(Tensor experts, int num_experts) -> (Tensor sorted_pairs, Tensor pair_rows, "
        "Tensor expert_offsets)");
  // x[T,H], sorted_pairs[T*k] -> x_sorted[T*k,H] with x_sorted[r] = x[sorted_pairs[r] // k].
  // sorted_pairs must be a permutation of [0, T*k) (the backward uses its inverse): checked on the CPU only.
  m.def("moe_gather(Tensor x, Tensor sorted_pairs, int k) -> Tensor");
  // rows[T*k,H] (expert-sorted), weights[T,k], pair_rows[T*k] -> y[T,H], y[t] = sum_j w[t,j] rows[pair_rows[t*k+j]].
  // Each token sums its own k rows in a fixed order: no floating-point atomics. pair_rows must be a permutation
  // (checked on the CPU only).
  m.def("moe_combine(Tensor rows, Tensor weights, Tensor pair_rows) -> Tensor");

  // ---- fused expert FFN -----------------------------------------------------------------------------------------
  // x[T,H], weights[T,k] (fp32 or x.dtype), experts[T,k] int32, gate_up_proj[E,2F,H], down_proj[E,H,F]
  //   -> y[T,H] (x.dtype), y_t = sum_j w_tj W_down[e] (act(W_gate[e] x_t) * W_up[e] x_t), act by `activation`:
  //      "silu" (SwiGLU), "gelu" (exact, erf) or "gelu_tanh" (the tanh approximation); and what backward needs: sorted_pairs, pair_rows, expert_offsets (as moe_route_plan),
  //      gate_up_out[T*k,2F] (x.dtype, expert-sorted rows, pre-activation; [0,2F] when save_pre_activation is
  //      false, i.e. no backward will follow: the forward then keeps only per-expert scratch).
  // Expert ids outside [0, E): the CPU raises; on CUDA (no host sync) such a pair contributes zero to y and gets
  // zero gradient (its gate_up_out row is zero), as reference.moe_ffn, which skips it.
  m.def("moe_ffn_forward(Tensor x, Tensor weights, Tensor experts, Tensor gate_up_proj, Tensor down_proj, "
        "bool save_pre_activation=True, str activation=\"silu\") -> "
        "(Tensor y, Tensor sorted_pairs, Tensor pair_rows, Tensor expert_offsets, Tensor gate_up_out)");
  // -> grad_x[T,H], grad_weights[T,k] (weights.dtype), grad_gate_up_proj[E,2F,H], grad_down_proj[E,H,F].
  // output_mask (x, weights, gate_up_proj, down_proj): a false entry skips that gradient's work (frozen experts:
  // no weight-gradient GEMMs; weights: no per-pair dot products) and returns an undefined tensor (None) for it.
  m.def("moe_ffn_backward(Tensor grad_y, Tensor x, Tensor weights, Tensor gate_up_proj, Tensor down_proj, "
        "Tensor sorted_pairs, Tensor pair_rows, Tensor expert_offsets, Tensor gate_up_out, "
        "bool[4] output_mask=[True, True, True, True], str activation=\"silu\") -> "
        "(Tensor grad_x, Tensor grad_weights, Tensor grad_gate_up_proj, Tensor grad_down_proj)");

  // ---- fused expert FFN with per-expert LoRA (design.md §10) ----------------------------------------------------
  // Expert e computes with W_e + scaling * B_e A_e for both projections, never forming that sum: the base GEMM plus
  // a rank-r detour per expert. x[T,H], weights[T,k], experts[T,k] int32 in [0, E); gate_up_proj[Eb,2F,H] and
  // down_proj[Eb,H,F] with Eb = E (per-expert base) or 1 (a base shared by every expert); gate_up_a[E,r,H],
  // gate_up_b[E,2F,r], down_a[E,r,F], down_b[E,H,r] (E and r come from the factors); activation "silu" | "gelu" |
  // "gelu_tanh" (the gate's activation).
  //   -> y[T,H] (x.dtype), the plan (as moe_route_plan), and what the backward needs, in expert-sorted rows:
  //      gate_up_out[T*k,2F] (pre-activation), gate_up_z[T*k,r] = x A_gu^T, down_z[T*k,r] = act A_down^T
  //      (0 rows each when save_for_backward is false: an inference forward keeps nothing).
  m.def("moe_lora_ffn_forward(Tensor x, Tensor weights, Tensor experts, Tensor gate_up_proj, Tensor down_proj, "
        "Tensor gate_up_a, Tensor gate_up_b, Tensor down_a, Tensor down_b, float scaling, str activation=\"silu\", "
        "bool save_for_backward=True) -> (Tensor y, Tensor sorted_pairs, Tensor pair_rows, Tensor expert_offsets, "
        "Tensor gate_up_out, Tensor gate_up_z, Tensor down_z)");
  // -> the gradients of (x, weights, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a, down_b), each shaped
  // and typed like its input. output_mask (same order): a false entry skips that gradient's work (a frozen base:
  // no base weight-gradient GEMMs; weights: no per-pair dot products) and returns an undefined tensor (None).
  m.def("moe_lora_ffn_backward(Tensor grad_y, Tensor x, Tensor weights, Tensor gate_up_proj, Tensor down_proj, "
        "Tensor gate_up_a, Tensor gate_up_b, Tensor down_a, Tensor down_b, float scaling, str activation, "
        "Tensor sorted_pairs, Tensor pair_rows, Tensor expert_offsets, Tensor gate_up_out, Tensor gate_up_z, "
        "Tensor down_z, bool[8] output_mask=[True, True, True, True, True, True, True, True]) -> "
        "(Tensor grad_x, Tensor grad_weights, Tensor grad_gate_up_proj, Tensor grad_down_proj, "
        "Tensor grad_gate_up_a, Tensor grad_gate_up_b, Tensor grad_down_a, Tensor grad_down_b)");

  // ---- linear log-prob ------------------------------------------------------------------------------------------
  // hidden[N,H], weight[V,H], targets[N] int64 -> logp[N] fp32 (fp64 for fp64), lse[N] fp32 (fp64 for fp64).
  // Chunked over V with an online logsumexp: at most one [N, chunk] block of logits exists at a time.
  m.def("linear_logprob_forward(Tensor hidden, Tensor weight, Tensor targets, int ignore_index) -> "
        "(Tensor logp, Tensor lse)");
  // grad_logp[N], grad_lse[N] -> grad_hidden[N,H], grad_weight[V,H]; recomputes logits per chunk.
  // output_mask (hidden, weight): a false entry skips that gradient's GEMMs (a frozen lm_head: no grad_weight) and
  // returns an undefined tensor (None) for it.
  m.def("linear_logprob_backward(Tensor grad_logp, Tensor grad_lse, Tensor hidden, Tensor weight, Tensor targets, "
        "Tensor lse, int ignore_index, bool[2] output_mask=[True, True]) -> (Tensor grad_hidden, Tensor grad_weight)");

  // ---- build facts -------------------------------------------------------------------------------------------
  m.def("has_cuda_kernels() -> bool");
  // CUDA builds only (csrc/cuda/moe_gemm_backend.cpp): the grouped-GEMM backend the latest CUDA moe_ffn call ran
  // ("own" | "torch"; "none" before any), and the mode (auto | own | torch; initially H3FUSION_GROUPED_GEMM):
  // set it (None: leave it), get the previous one back.
  m.def("moe_ffn_gemm_backend() -> str");
  m.def("moe_ffn_set_gemm_backend(str? mode) -> str");
}

namespace {
bool has_cuda_kernels() {
#ifdef H3FUSION_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY_IMPL(h3fusion, CompositeExplicitAutograd, m) { m.impl("has_cuda_kernels", &has_cuda_kernels); }

// A minimal module init so that `import h3fusion_ext._C` loads the library and runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
