// CPU kernel of switch_sae::decode, the sparse gather-sum decoder:
// out[r] = sum_j values[r, j] * W_dec[indices[r, j]], O(rows * k * d_in).
//
// What it leaves out: adding b_dec and gating (done by the model), and the backward
// (decode_backward.cpp).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "checks.h"
#include "cpu/gather_sum.h"

namespace switch_sae {
namespace {

// ---- kernel

// values, indices [rows, k], W_dec [d_sae, d_in] -> out [rows, d_in]
template <typename scalar_t>
void decode_kernel(const scalar_t* values, const int64_t* indices, const scalar_t* W_dec,
                   scalar_t* out, int64_t rows, int64_t k, int64_t d_sae, int64_t d_in) {
  using acc_t = at::opmath_type<scalar_t>;
  // Checked up front, on the calling thread: the gather prefetches and reads rows ahead.
  for (int64_t s = 0; s < rows * k; ++s) {
    TORCH_CHECK(indices[s] >= 0 && indices[s] < d_sae, "switch_sae: indices[", s / k, ", ", s % k,
                "] = ", indices[s], " is out of range [0, ", d_sae, ") (W_dec.size(0) = d_sae)");
  }
  cpu::gather_sum<scalar_t>(
      indices, [&](int64_t s) { return static_cast<acc_t>(values[s]); }, W_dec, d_sae, out, rows, k, d_in);
}

// ---- launcher

at::Tensor decode_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec) {
  check_decode_args(values, indices, W_dec);
  const int64_t rows = values.size(0), k = values.size(1);
  const int64_t d_sae = W_dec.size(0), d_in = W_dec.size(1);
  at::Tensor out = at::empty({rows, d_in}, values.options());  // [rows, d_in]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "decode_cpu", [&] {
    decode_kernel<scalar_t>(values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
                            W_dec.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, k, d_sae,
                            d_in);
  });
  return out;
}

}  // namespace

// ---- registration

TORCH_LIBRARY_IMPL(switch_sae, CPU, m) {
  m.impl("decode", &decode_cpu);
}

}  // namespace switch_sae
