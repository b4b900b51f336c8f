// switch_sae::encode_backward on CUDA: gradients of encode_topk (ReLU mask included)
// w.r.t. x, W_enc and b_enc. CPU twin: csrc/cpu/encode_backward.cpp.
//
// Algorithm, as on the CPU, deterministic and without float atomics. With
// grad_pre = where(values > 0, grad_values, 0) (applied on the fly, never stored):
//   grad_x[b] = sum over the token's n_active * k slots, in slot order, of
//     grad_pre[s] * W_enc_flat[indices[s]]: the decode gather-sum (gather_sum_out,
//     decode.cu) with groups of n_active * k slots, since rows are token-major.
//   grad_W_enc[f] = sum over the slots of feature f, ascending, of grad_pre[s] *
//     (x[s / (k * n_active)] - b_dec), and grad_b_enc[f] = sum of grad_pre[s]: group the
//     slots by feature (group_by_key, dispatch.cu), then feature_sum_out
//     (decode_backward.cu), one block per feature.
// Launch: see the two shared kernels (one 256-thread block per token, then per feature).
// Memory traffic: grad_x reads batch * n_active * k * d_in W_enc elements and writes
//   batch * d_in; grad_W_enc reads rows * k * d_in x elements (gathered by slot) and
//   writes d_sae * (d_in + 1); plus the grouping of rows * k int64 indices.
#include "common.cuh"

namespace switch_sae::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> encode_backward_cuda(
    const at::Tensor& grad_values, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_dec, int64_t n_active) {
  check_encode_backward_args(grad_values, values, indices, x, W_enc, b_dec, n_active);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_experts = W_enc.size(0), d_expert = W_enc.size(1), d_in = W_enc.size(2);
  const int64_t d_sae = n_experts * d_expert;
  const int64_t k = values.size(1);
  const auto W_flat = W_enc.view({d_sae, d_in});  // feature f = e * d_expert + local

  auto grad_x = at::empty_like(x);  // [batch, d_in]
  gather_sum_out(grad_x, grad_values, /*mask=*/values, indices, W_flat, /*group=*/n_active * k);

  auto grad_W_enc = at::empty_like(W_enc);                     // [n_experts, d_expert, d_in]
  auto grad_b_enc = at::empty({n_experts, d_expert}, W_enc.options());  // [n_experts, d_expert]
  auto grad_W_flat = grad_W_enc.view({d_sae, d_in});
  auto grad_b_flat = grad_b_enc.view({d_sae});
  const auto [perm, bin_offsets] = group_by_key(indices, d_sae);  // [rows * k], [d_sae + 1]
  feature_sum_out(grad_W_flat, grad_b_flat, perm, bin_offsets, grad_values, /*mask=*/values,
                  /*src=*/x, /*center=*/b_dec, /*src_div=*/k * n_active);
  return {grad_x, grad_W_enc, grad_b_enc};
}

}  // namespace
}  // namespace switch_sae::cuda

TORCH_LIBRARY_IMPL(switch_sae, CUDA, m) {
  m.impl("encode_backward", &switch_sae::cuda::encode_backward_cuda);
}
