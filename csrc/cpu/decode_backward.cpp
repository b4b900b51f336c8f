// CPU kernel of switch_sae::decode_backward, the sparse backward of decode:
//   grad_values[r, j] = <grad_out[r], W_dec[indices[r, j]]>          (parallel over rows)
//   grad_W_dec[f]     = sum over entries (r, j) hitting f of values[r, j] * grad_out[r]
// The second sum groups entries by feature (cpu/feature_groups.h) and is parallel over
// features: no atomics, fixed order, bitwise deterministic. O(rows * k * d_in + d_sae * d_in).
//
// What it leaves out: grad_b_dec (a plain sum over rows, done by autograd).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "checks.h"
#include "cpu/feature_groups.h"
#include "cpu/row_math.h"

namespace switch_sae {
namespace {

// ---- kernel

// grad_out [rows, d_in], values/indices [rows, k], W_dec [d_sae, d_in]
// -> grad_values [rows, k], grad_W_dec [d_sae, d_in]
template <typename scalar_t>
void decode_backward_kernel(const scalar_t* grad_out, const scalar_t* values,
                            const int64_t* indices, const scalar_t* W_dec,
                            const cpu::FeatureGroups& groups, scalar_t* grad_values,
                            scalar_t* grad_W_dec, int64_t rows, int64_t k, int64_t d_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(k * d_in, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    cpu::with_best_isa([&] {
      for (int64_t s = begin * k; s < end * k; ++s) {
        const acc_t g = cpu::dot<scalar_t, acc_t>(grad_out + (s / k) * d_in, W_dec + indices[s] * d_in, d_in);
        grad_values[s] = static_cast<scalar_t>(g);
      }
    });
  });
  cpu::reduce_by_feature<scalar_t>(
      groups, d_in, grad_W_dec, /*weight_sums=*/nullptr,
      [&](int64_t s) { return static_cast<acc_t>(values[s]); },
      [&](int64_t s) { return grad_out + (s / k) * d_in; });
}

// ---- launcher

std::tuple<at::Tensor, at::Tensor> decode_backward_cpu(const at::Tensor& grad_out,
                                                       const at::Tensor& values,
                                                       const at::Tensor& indices,
                                                       const at::Tensor& W_dec) {
  check_decode_backward_args(grad_out, values, indices, W_dec);
  const int64_t rows = values.size(0), k = values.size(1);
  const int64_t d_sae = W_dec.size(0), d_in = W_dec.size(1);
  // Validates every index before the kernel dereferences it.
  const cpu::FeatureGroups groups = cpu::group_by_feature(indices, d_sae);
  at::Tensor grad_values = at::empty({rows, k}, values.options());  // [rows, k]
  at::Tensor grad_W_dec = at::empty({d_sae, d_in}, W_dec.options());  // [d_sae, d_in], every row written
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "decode_backward_cpu", [&] {
    decode_backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(),
                                     indices.data_ptr<int64_t>(), W_dec.data_ptr<scalar_t>(),
                                     groups, grad_values.data_ptr<scalar_t>(),
                                     grad_W_dec.data_ptr<scalar_t>(), rows, k, d_in);
  });
  return {grad_values, grad_W_dec};
}

}  // namespace

// ---- registration

TORCH_LIBRARY_IMPL(switch_sae, CPU, m) {
  m.impl("decode_backward", &decode_backward_cpu);
}

}  // namespace switch_sae
