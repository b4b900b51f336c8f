// Every switch_sae schema, declared once. Backends add kernels with
// TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and
// autograd live in python/switch_sae/ops.py; plain PyTorch twins of every op live
// in python/switch_sae/reference.py (the executable specification).
//
// Vocabulary: batch tokens, n_active experts per token, rows = batch * n_active
// (token, expert) pairs in token-major order (pair p is token p / n_active),
// n_experts, d_expert features per expert, d_sae = n_experts * d_expert, d_in.
#include <torch/extension.h>

#include "cpu/expert_gemm.h"

TORCH_LIBRARY(switch_sae, m) {
  // experts [rows] int64 in [0, n_experts) -> order [rows] int64 (pair ids sorted
  // stably by expert), offsets [n_experts + 1] int64 (expert e owns
  // order[offsets[e]:offsets[e+1]]; an expert may own none).
  m.def("dispatch(Tensor experts, int n_experts) -> (Tensor order, Tensor offsets)");

  // x [batch, d_in], W_enc [n_experts, d_expert, d_in], b_enc [n_experts, d_expert]
  // or None, b_dec [d_in], order/offsets from dispatch (order must be a permutation of
  // [0, rows), n_active <= n_experts; both are checked, order on CUDA by a device-side
  // assert that surfaces at the next synchronisation). For every pair p routed to
  // expert e: pre = W_enc[e] @ (x[p / n_active] - b_dec) (+ b_enc[e]); values[p],
  // local = TopK(pre, k) sorted descending, then ReLU; indices[p] = e * d_expert +
  // local. Computed tile_rows pairs at a time: no [rows, d_sae] tensor exists.
  // -> values [rows, k] (x.dtype), indices [rows, k] int64.
  m.def(
      "encode_topk(Tensor x, Tensor W_enc, Tensor? b_enc, Tensor b_dec, Tensor order, "
      "Tensor offsets, int n_active, int k, int tile_rows) -> (Tensor values, Tensor indices)");

  // grad_values [rows, k], values [rows, k] (post-ReLU; the gradient is masked
  // where values == 0), indices [rows, k], x, W_enc, b_dec as in encode_topk.
  // -> grad_x [batch, d_in], grad_W_enc [n_experts, d_expert, d_in],
  //    grad_b_enc [n_experts, d_expert]. (grad_b_dec = -grad_x.sum(0).)
  // Sparse: O(rows * k * d_in); per-feature sums by counting sort, no atomics.
  m.def(
      "encode_backward(Tensor grad_values, Tensor values, Tensor indices, Tensor x, "
      "Tensor W_enc, Tensor b_dec, int n_active) -> (Tensor grad_x, Tensor grad_W_enc, Tensor grad_b_enc)");

  // values [rows, k], indices [rows, k] int64 in [0, d_sae), W_dec [d_sae, d_in]
  // -> out [rows, d_in], out[r] = sum_j values[r, j] * W_dec[indices[r, j]]
  // (accumulated in fp32 for reduced-precision inputs).
  m.def("decode(Tensor values, Tensor indices, Tensor W_dec) -> Tensor");

  // grad_out [rows, d_in] -> grad_values [rows, k] = <grad_out[r], W_dec[idx]>,
  // grad_W_dec [d_sae, d_in] = per feature, sum of values * grad_out[r]
  // (counting sort by feature, no atomics, deterministic).
  m.def(
      "decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor W_dec) "
      "-> (Tensor grad_values, Tensor grad_W_dec)");

  // Build facts, so Python (and other codebases) can ask the loaded binary.
  m.def("with_cuda() -> bool");
}

namespace {
bool with_cuda() {
#ifdef SWITCH_SAE_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY_IMPL(switch_sae, CompositeExplicitAutograd, m) {
  m.impl("with_cuda", &with_cuda);
}

// Importing switch_sae._C runs the registrations above; the module itself only
// reports build facts.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("with_cuda", &with_cuda, "Whether CUDA kernels were compiled into this build");
  m.def("torch_version_built", [] { return std::string(SWITCH_SAE_TORCH_VERSION); },
        "The torch version this binary was compiled against");
  m.def("cpu_encoder_gemm",
        [] { return std::string(switch_sae::cpu::expert_gemm_available() ? "avx512" : "aten"); },
        "Which GEMM encode_topk's CPU kernel runs for float32 on this CPU: avx512 (its own) or aten");
}
