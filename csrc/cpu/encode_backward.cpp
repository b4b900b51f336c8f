// CPU kernel of switch_sae::encode_backward, the sparse backward of encode_topk.
// With grad_pre = grad_values where values > 0 (ReLU), else 0, and W_flat = W_enc
// viewed as [d_sae, d_in]:
//   grad_x[t]      = sum over the token's n_active pairs and k slots of grad_pre * W_flat[idx]
//   grad_W_enc[f]  = sum over entries hitting f of grad_pre * (x[token] - b_dec)
//   grad_b_enc[f]  = sum over entries hitting f of grad_pre
// grad_x is parallel over tokens; the per-feature sums group entries by feature
// (cpu/feature_groups.h) and are parallel over features. No atomics, fixed order,
// bitwise deterministic. O(rows * k * d_in + d_sae * d_in).
//
// What it leaves out: grad_b_dec = -grad_x.sum(0), formed by the autograd formula.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "checks.h"
#include "cpu/feature_groups.h"
#include "cpu/gather_sum.h"
#include "cpu/huge_pages.h"

namespace switch_sae {
namespace {

// ---- kernel

// grad_pre [rows * k] (masked, in acc_t), indices [rows, k], x_centered [batch, d_in],
// W_flat [d_sae, d_in] -> grad_x [batch, d_in], grad_W_flat [d_sae, d_in], grad_b_enc [d_sae]
template <typename scalar_t>
void encode_backward_kernel(const std::vector<at::opmath_type<scalar_t>>& grad_pre,
                            const int64_t* indices, const scalar_t* x_centered,
                            const scalar_t* W_flat, const cpu::FeatureGroups& groups,
                            scalar_t* grad_x, scalar_t* grad_W_flat, scalar_t* grad_b_enc,
                            int64_t batch, int64_t n_active, int64_t k, int64_t d_in) {
  const int64_t per_token = n_active * k;  // entries of one token, contiguous
  cpu::gather_sum<scalar_t>(
      indices, [&](int64_t s) { return grad_pre[s]; }, W_flat, static_cast<int64_t>(groups.offsets.size()) - 1, grad_x, batch,
      per_token, d_in);
  cpu::reduce_by_feature<scalar_t>(
      groups, d_in, grad_W_flat, grad_b_enc, [&](int64_t s) { return grad_pre[s]; },
      [&](int64_t s) { return x_centered + (s / per_token) * d_in; },
      /*on_slot=*/[](int64_t, int64_t, const scalar_t*) {}, /*feature_table=*/nullptr);
}

// ---- launcher

std::tuple<at::Tensor, at::Tensor, at::Tensor> encode_backward_cpu(
    const at::Tensor& grad_values, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_dec, int64_t n_active) {
  check_encode_backward_args(grad_values, values, indices, x, W_enc, b_dec, n_active);
  const int64_t batch = x.size(0), d_in = x.size(1), k = values.size(1);
  const int64_t n_experts = W_enc.size(0), d_expert = W_enc.size(1);
  const int64_t d_sae = n_experts * d_expert;
  // Validates every index before the kernel dereferences it.
  const cpu::FeatureGroups groups = cpu::group_by_feature(indices, d_sae);
  // Rounded to x's dtype first, as the forward computed it.
  const at::Tensor x_centered = x - b_dec;  // [batch, d_in]
  at::Tensor grad_x = at::empty_like(x);                            // [batch, d_in]
  at::Tensor grad_W_enc = cpu::empty_on_huge_pages(W_enc.sizes(), W_enc.options());                    // [n_experts, d_expert, d_in]
  at::Tensor grad_b_enc = at::empty({n_experts, d_expert}, W_enc.options());  // [n_experts, d_expert]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "encode_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v = values.data_ptr<scalar_t>();
    const scalar_t* g = grad_values.data_ptr<scalar_t>();
    std::vector<acc_t> grad_pre(values.numel());  // [rows * k], zero where ReLU was inactive
    for (size_t s = 0; s < grad_pre.size(); ++s) {
      grad_pre[s] = static_cast<acc_t>(v[s]) > acc_t(0) ? static_cast<acc_t>(g[s]) : acc_t(0);
    }
    encode_backward_kernel<scalar_t>(grad_pre, indices.data_ptr<int64_t>(),
                                     x_centered.data_ptr<scalar_t>(), W_enc.data_ptr<scalar_t>(),
                                     groups, grad_x.data_ptr<scalar_t>(),
                                     grad_W_enc.data_ptr<scalar_t>(),
                                     grad_b_enc.data_ptr<scalar_t>(), batch, n_active, k, d_in);
  });
  return {grad_x, grad_W_enc, grad_b_enc};
}

}  // namespace

// ---- registration

TORCH_LIBRARY_IMPL(switch_sae, CPU, m) {
  m.impl("encode_backward", &encode_backward_cpu);
}

}  // namespace switch_sae
