// Streaming TopK of one row of pre-activations under the rule of topk_rule.h, for
// encode_topk's CPU kernel: one pass over the row while it is still in cache, right
// after the GEMM that wrote it, instead of a selection over candidate ids.
//
// How: the first k features seed a heap whose root is the worst of them (the one every
// other precedes); every later feature is compared with that root's value only. Later
// features have higher ids, so one beats the root exactly when its value is greater, or
// NaN while the root is a number (ties keep the lower id already held). That test is
// `!(v <= threshold)`, branch-free over a block of kBlock values, so the common case (no
// value in the block beats the k-th best so far) costs a few vector compares; a hit
// replaces the root and sifts it down (log k). On random rows about
// k * ln(d_expert / k) features ever enter. Once the root is NaN all k held are NaN and
// nothing later can enter. Finally the heap is sorted best first.
//
// The chosen set and order are those of the strict total order, so the result is the
// same bits as any other exact selection (and as reference.topk), whatever the block
// size or ISA.
#pragma once
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "topk_rule.h"

namespace switch_sae::cpu {

template <typename scalar_t>
class RowTopk {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  explicit RowTopk(int64_t k) : heap_(k) {}

  // Selects the top k of row[0:n] (k <= n); then entry(j), j < k, is the j-th best.
  void select(const scalar_t* row, int64_t n) {
    const int64_t k = static_cast<int64_t>(heap_.size());
    for (int64_t i = 0; i < k; ++i) {
      heap_[i] = {static_cast<acc_t>(row[i]), i};
    }
    std::make_heap(heap_.begin(), heap_.end(), precedes);
    acc_t threshold = heap_.front().value;
    int64_t i = k;
    // Below, `threshold != threshold` (the root is NaN) ends the scan: nothing can enter.
    for (; i + kBlock <= n && threshold == threshold; i += kBlock) {
      bool any = false;
      for (int64_t l = 0; l < kBlock; ++l) {
        any |= !(static_cast<acc_t>(row[i + l]) <= threshold);
      }
      if (any) {
        for (int64_t l = 0; l < kBlock; ++l) {
          offer(static_cast<acc_t>(row[i + l]), i + l, threshold);
        }
      }
    }
    for (; i < n && threshold == threshold; ++i) {
      offer(static_cast<acc_t>(row[i]), i, threshold);
    }
    std::sort_heap(heap_.begin(), heap_.end(), precedes);
  }

  struct Entry {
    acc_t value;
    int64_t id;  // local feature id in the row
  };

  const Entry& entry(int64_t j) const { return heap_[j]; }

 private:
  static constexpr int64_t kBlock = 16;

  static bool precedes(const Entry& a, const Entry& b) {
    return topk_precedes(a.value, a.id, b.value, b.id);
  }

  // Feature (v, id), id above every id held, replaces the root if it beats it: if v is
  // greater, or NaN while the root is not (a NaN root means all k held are NaN).
  void offer(acc_t v, int64_t id, acc_t& threshold) {
    if (v <= threshold || threshold != threshold) {
      return;
    }
    // Replace the root and restore the heap: pop moves the root to the back.
    std::pop_heap(heap_.begin(), heap_.end(), precedes);
    heap_.back() = {v, id};
    std::push_heap(heap_.begin(), heap_.end(), precedes);
    threshold = heap_.front().value;
  }

  std::vector<Entry> heap_;  // [k], a max-heap under precedes: the worst at the front
};

}  // namespace switch_sae::cpu
