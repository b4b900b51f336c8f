// Grouping of the (row, slot) entries of a sparse code by feature, and the
// per-feature reductions built on it. Both backward ops (decode_backward for
// grad_W_dec, encode_backward for grad_W_enc and grad_b_enc) sum contributions of
// every entry that hit a feature; grouping first lets one thread own each output row,
// so there are no atomics and the summation order is fixed (deterministic).
//
// What it leaves out: how a contribution is formed (the callers pass weight and row
// functions) and the parallel loops over rows or tokens.
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "cpu/gather_sum.h"
#include "cpu/row_math.h"

namespace switch_sae::cpu {

// Features ahead whose feature_table row reduce_by_feature fetches: rows are read in
// feature order, but the slots' scattered rows in between keep the hardware prefetcher
// from following that stream.
constexpr int64_t kPrefetchFeatures = 2;

// A stable counting sort of the rows * k entries of a code by feature id.
struct FeatureGroups {
  // [n_features + 1]: feature f owns slots[offsets[f]:offsets[f + 1]] (maybe none).
  std::vector<int64_t> offsets;
  // [rows * k] flat entry ids r * k + j, ascending within each feature.
  std::vector<int64_t> slots;
};

// indices [rows, k] int64 (contiguous, CPU); every value must lie in [0, n_features),
// otherwise a RuntimeError names `indices`. O(rows * k + n_features).
FeatureGroups group_by_feature(const at::Tensor& indices, int64_t n_features);

// For every feature f: out[f, :] = sum over its slots s, in ascending order, of
// weight(s) * row(s)[:] (zero if f owns no slot), and, if weight_sums is not null,
// weight_sums[f] = sum of weight(s). weight(s) returns acc_t, row(s) a pointer to
// d_in scalar_t. on_slot(f, s, row(s)) runs for each slot just before its row is added,
// while that row is in L1: decode_backward forms its per-slot dot product there, with
// feature_table (W_dec, [n_features, d_in], or null) the rows it reads per feature, which
// are then fetched a few features ahead.
// Parallel over features; each output row is written by one thread, once, with streaming
// stores (out is d_sae rows, far larger than the caches, and not read back here).
template <typename scalar_t, typename WeightFn, typename RowFn, typename SlotFn>
void reduce_by_feature(const FeatureGroups& groups, int64_t d_in, scalar_t* out,
                       scalar_t* weight_sums, WeightFn weight, RowFn row, SlotFn on_slot,
                       const scalar_t* feature_table) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_features = static_cast<int64_t>(groups.offsets.size()) - 1;
  const int64_t row_bytes = d_in * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(d_in, 1));
  at::parallel_for(0, n_features, grain, [&](int64_t begin, int64_t end) {
    with_best_isa([&] {
      std::vector<acc_t> acc(d_in);  // [d_in]
      // The rows are scattered (one per slot): fetch them kPrefetchSlots slots ahead.
      const int64_t last = groups.offsets[end];
      for (int64_t i = groups.offsets[begin]; i < std::min(groups.offsets[begin] + kPrefetchSlots, last); ++i) {
        prefetch(row(groups.slots[i]), row_bytes);
      }
      for (int64_t f = begin; f < end; ++f) {
        if (feature_table != nullptr && f + kPrefetchFeatures < end) {
          prefetch(feature_table + (f + kPrefetchFeatures) * d_in, row_bytes);
        }
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t total = 0;
        for (int64_t i = groups.offsets[f]; i < groups.offsets[f + 1]; ++i) {
          if (i + kPrefetchSlots < last) {
            prefetch(row(groups.slots[i + kPrefetchSlots]), row_bytes);
          }
          const int64_t s = groups.slots[i];
          const scalar_t* r = row(s);
          on_slot(f, s, r);
          const acc_t w = weight(s);
          total += w;
          axpy<scalar_t, acc_t>(acc.data(), w, r, d_in);
        }
        store_streaming<scalar_t, acc_t>(out + f * d_in, acc.data(), d_in);
        if (weight_sums != nullptr) {
          weight_sums[f] = static_cast<scalar_t>(total);
        }
      }
      stream_fence();
    });
  });
}

}  // namespace switch_sae::cpu
