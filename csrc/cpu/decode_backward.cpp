// CPU kernel of switch_sae::decode_backward, the sparse backward of decode:
//   grad_values[r, j] = <grad_out[r], W_dec[indices[r, j]]>
//   grad_W_dec[f]     = sum over entries (r, j) hitting f of values[r, j] * grad_out[r]
// Both in one pass that groups entries by feature (cpu/feature_groups.h), parallel over
// features: each grad_values entry and each grad_W_dec row is written by one thread, no
// atomics, fixed order, bitwise deterministic. O(rows * k * d_in + d_sae * d_in).
//
// What it leaves out: grad_b_dec (a plain sum over rows, done by autograd).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "checks.h"
#include "cpu/feature_groups.h"
#include "cpu/huge_pages.h"
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
  // One pass by feature: each W_dec row is read once, in order, for all the dot products
  // of the slots that hit it, while their grad_out rows (rows x d_in, cache-resident) are
  // summed into grad_W_dec. A pass by row would gather W_dec once per slot (k times the
  // rows' share of it, at random addresses).
  cpu::reduce_by_feature<scalar_t>(
      groups, d_in, grad_W_dec, /*weight_sums=*/nullptr,
      [&](int64_t s) { return static_cast<acc_t>(values[s]); },
      [&](int64_t s) { return grad_out + (s / k) * d_in; },
      [&](int64_t f, int64_t s, const scalar_t* grad_out_row) {
        grad_values[s] = static_cast<scalar_t>(cpu::dot<scalar_t, acc_t>(grad_out_row, W_dec + f * d_in, d_in));
      },
      /*feature_table=*/W_dec);
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
  at::Tensor grad_W_dec = cpu::empty_on_huge_pages({d_sae, d_in}, W_dec.options());  // [d_sae, d_in], every row written
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
