// The gather-sum shared by decode (out = values x W_dec rows) and encode_backward's
// grad_x (grad_pre x W_enc rows): each output row is a weighted sum of table rows picked
// by indices. The table (d_sae rows, 128 MiB at 65536 x 512 float32) is far larger than
// the caches and the rows are at random addresses, so the loop is bound by memory
// latency unless the rows are fetched ahead: it prefetches the rows kPrefetchSlots slots
// ahead of the one it sums.
//
// What it leaves out: validating indices (the callers do, before calling).
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/row_math.h"

namespace switch_sae::cpu {

// Table rows in flight ahead of the one being summed (measured on 2 Zen 5 cores with
// 2 KiB rows: 4 to 8 are equally fast, 1 noticeably slower).
constexpr int64_t kPrefetchSlots = 4;

// For r in [0, rows): out[r] = sum over s in [r * per_row, (r + 1) * per_row), in
// ascending order, of weight(s) * table[indices[s]] (rows of d_in). weight(s) returns
// acc_t. Parallel over output rows; each is written by one thread in a fixed order.
template <typename scalar_t, typename WeightFn>
void gather_sum(const int64_t* indices, WeightFn weight, const scalar_t* table, scalar_t* out,
                int64_t rows, int64_t per_row, int64_t d_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_bytes = d_in * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(per_row * d_in, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    with_best_isa([&] {
      std::vector<acc_t> acc(d_in);  // [d_in], one output row at a time
      const int64_t last = end * per_row;  // this chunk's slots: [begin * per_row, last)
      for (int64_t s = begin * per_row; s < std::min(begin * per_row + kPrefetchSlots, last); ++s) {
        prefetch(table + indices[s] * d_in, row_bytes);
      }
      for (int64_t r = begin; r < end; ++r) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t s = r * per_row; s < (r + 1) * per_row; ++s) {
          if (s + kPrefetchSlots < last) {
            prefetch(table + indices[s + kPrefetchSlots] * d_in, row_bytes);
          }
          axpy<scalar_t, acc_t>(acc.data(), weight(s), table + indices[s] * d_in, d_in);
        }
        store<scalar_t, acc_t>(out + r * d_in, acc.data(), d_in);
      }
    });
  });
}

}  // namespace switch_sae::cpu
