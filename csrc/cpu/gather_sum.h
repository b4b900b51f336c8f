// The gather-sum shared by decode (out = values x W_dec rows) and encode_backward's
// grad_x (grad_pre x W_enc rows): each output row is a weighted sum of table rows picked
// by indices. The table (d_sae rows, 128 MiB at 65536 x 512 float32) is far larger than
// the caches and the rows are at random addresses, so the loop is bound by memory
// latency unless the rows are fetched ahead: it prefetches the rows kPrefetchSlots slots
// ahead of the one it sums, and it computes the output rows grouped by the part of the
// table they read, so that under routing most rows come from cache.
//
// What it leaves out: validating indices (the callers do, before calling).
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "cpu/row_math.h"

namespace switch_sae::cpu {

// Table rows in flight ahead of the one being summed (measured on 2 Zen 5 cores with
// 2 KiB rows: 4 to 8 are equally fast, 1 noticeably slower).
constexpr int64_t kPrefetchSlots = 4;

// Bytes of table rows that one bucket of gather_sum_order spans: about one core's L2.
constexpr int64_t kBucketBytes = int64_t{1} << 20;

// The output rows of gather_sum in the order they are computed: stably sorted by the
// table block (kBucketBytes of rows) that their first slot reads. Under routing all
// slots of a row lie in one expert's slice of the table, so consecutive rows then read
// the same slice, from cache, instead of each row fetching its rows from memory. The
// order changes no value: each output row is still its own sum in slot order.
inline std::vector<int64_t> gather_sum_order(const int64_t* indices, int64_t rows, int64_t per_row,
                                             int64_t n_table, int64_t row_bytes) {
  std::vector<int64_t> order(rows);
  if (per_row == 0) {
    std::iota(order.begin(), order.end(), int64_t{0});
    return order;
  }
  const int64_t per_bucket = std::max<int64_t>(1, kBucketBytes / std::max<int64_t>(row_bytes, 1));
  const int64_t n_buckets = (n_table + per_bucket - 1) / per_bucket;
  std::vector<int64_t> start(n_buckets + 1, 0);  // counting sort: histogram, scan, scatter
  for (int64_t r = 0; r < rows; ++r) {
    ++start[indices[r * per_row] / per_bucket + 1];
  }
  for (int64_t b = 0; b < n_buckets; ++b) {
    start[b + 1] += start[b];
  }
  for (int64_t r = 0; r < rows; ++r) {
    order[start[indices[r * per_row] / per_bucket]++] = r;
  }
  return order;
}

// For r in [0, rows): out[r] = sum over s in [r * per_row, (r + 1) * per_row), in
// ascending order, of weight(s) * table[indices[s]] (table [n_table, d_in]). weight(s)
// returns acc_t. Parallel over output rows (in gather_sum_order); each is written by one
// thread in a fixed order.
template <typename scalar_t, typename WeightFn>
void gather_sum(const int64_t* indices, WeightFn weight, const scalar_t* table, int64_t n_table,
                scalar_t* out, int64_t rows, int64_t per_row, int64_t d_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_bytes = d_in * static_cast<int64_t>(sizeof(scalar_t));
  const std::vector<int64_t> order = gather_sum_order(indices, rows, per_row, n_table, row_bytes);
  // Slot t of the computation order (t / per_row-th row of order, its t % per_row-th slot).
  const auto slot_at = [&](int64_t t) { return order[t / per_row] * per_row + t % per_row; };
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(per_row * d_in, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    with_best_isa([&] {
      std::vector<acc_t> acc(d_in);  // [d_in], one output row at a time
      const int64_t last = end * per_row;  // this chunk's slots in order: [begin * per_row, last)
      for (int64_t t = begin * per_row; t < std::min(begin * per_row + kPrefetchSlots, last); ++t) {
        prefetch(table + indices[slot_at(t)] * d_in, row_bytes);
      }
      for (int64_t p = begin; p < end; ++p) {
        const int64_t r = order[p];
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < per_row; ++j) {
          const int64_t t = p * per_row + j;
          if (t + kPrefetchSlots < last) {
            prefetch(table + indices[slot_at(t + kPrefetchSlots)] * d_in, row_bytes);
          }
          const int64_t s = r * per_row + j;
          axpy<scalar_t, acc_t>(acc.data(), weight(s), table + indices[s] * d_in, d_in);
        }
        store<scalar_t, acc_t>(out + r * d_in, acc.data(), d_in);
      }
    });
  });
}

}  // namespace switch_sae::cpu
