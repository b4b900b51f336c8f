// CPU kernel of switch_sae::decode, the sparse gather-sum decoder:
// out[r] = sum_j values[r, j] * W_dec[indices[r, j]], O(rows * k * d_in).
//
// What it leaves out: adding b_dec and gating (done by the model), and the backward
// (decode_backward.cpp).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "checks.h"
#include "cpu/row_math.h"

namespace switch_sae {
namespace {

// ---- kernel

// values, indices [rows, k], W_dec [d_sae, d_in] -> out [rows, d_in]
template <typename scalar_t>
void decode_kernel(const scalar_t* values, const int64_t* indices, const scalar_t* W_dec,
                   scalar_t* out, int64_t rows, int64_t k, int64_t d_sae, int64_t d_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(k * d_in, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    cpu::with_best_isa([&] {
      std::vector<acc_t> acc(d_in);  // [d_in], one row at a time
      for (int64_t r = begin; r < end; ++r) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t f = indices[r * k + j];
          TORCH_CHECK(f >= 0 && f < d_sae, "switch_sae: indices[", r, ", ", j, "] = ", f,
                      " is out of range [0, ", d_sae, ") (W_dec.size(0) = d_sae)");
          cpu::axpy<scalar_t, acc_t>(acc.data(), static_cast<acc_t>(values[r * k + j]),
                                     W_dec + f * d_in, d_in);
        }
        cpu::store<scalar_t, acc_t>(out + r * d_in, acc.data(), d_in);
      }
    });
  });
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
