// Row arithmetic shared by the CPU gather-sum kernels (decode, decode_backward,
// encode_backward): accumulate scaled rows, dot products, and the final cast.
//
// Accumulation is in at::opmath_type<scalar_t>: float for bfloat16/float16, the type
// itself for float32/float64. Loops are plain so the compiler vectorises them for the
// baseline ISA of the build; every sum runs in a fixed order, so results are
// bitwise reproducible run to run and independent of the thread count.
#pragma once
#include <ATen/OpMathType.h>

#include <cstdint>

namespace switch_sae::cpu {

// acc[0:n] += scale * row[0:n]
template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* __restrict__ acc, acc_t scale, const scalar_t* __restrict__ row,
                 int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    acc[d] += scale * static_cast<acc_t>(row[d]);
  }
}

// <a, b> accumulated in acc_t. kLanes independent partial sums let the compiler
// vectorise the reduction without -ffast-math, in an order fixed by n alone.
template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  constexpr int64_t kLanes = 8;
  acc_t partial[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      partial[l] += static_cast<acc_t>(a[d + l]) * static_cast<acc_t>(b[d + l]);
    }
  }
  acc_t sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    sum += partial[l];
  }
  for (; d < n; ++d) {
    sum += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  }
  return sum;
}

// out[0:n] = acc[0:n], rounded to the output type.
template <typename scalar_t, typename acc_t>
inline void store(scalar_t* __restrict__ out, const acc_t* __restrict__ acc, int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    out[d] = static_cast<scalar_t>(acc[d]);
  }
}

}  // namespace switch_sae::cpu
