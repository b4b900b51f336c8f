// TopK of one row of pre-activations under the rule of topk_rule.h, for encode_topk's
// CPU kernel: it reads the row right after the GEMM that wrote it, while the row is still
// in cache, and touches most features with a few vector instructions, instead of a
// selection over every candidate id.
//
// Wide rows (at least kBlock * k features), two passes:
//   1. the largest number in each block of kBlock features (NaN skipped); the k-th
//      largest of these block maxima is a lower bound of the k-th best feature (k
//      distinct features are at least that large), so
//   2. only features >= that bound or NaN are candidates (about k to 2k of them, found
//      with vector compares), and the k best candidates are picked and sorted exactly.
// Narrow rows: the first k features seed a heap whose root is the worst of them; a later
// feature (higher id) beats the root exactly when its value is greater, or NaN while the
// root is a number, tested for kBlock features at once into a bit mask; a feature that
// enters replaces the root and sifts down (log k). Once the root is NaN nothing can enter.
//
// Candidates are ranked by integer keys, not floats: each value maps to an unsigned key
// whose order is the rule's order of values (-0.0 and +0.0 one key, every NaN one key
// above +inf), so a comparison is two integer compares instead of topk_precedes' NaN
// tests. The chosen set and order are those of the rule's strict total order, so the
// result is the same bits as any other exact selection (and as reference.topk),
// whatever the path, block size or ISA.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace switch_sae::cpu {

// Order-preserving map of float/double values to unsigned keys, and back. Values are
// first made canonical: -0.0 -> +0.0, any NaN -> the quiet NaN (so all NaN share a key).
template <typename acc_t>
struct TopkKey {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  static constexpr bits_t kSign = bits_t{1} << (8 * sizeof(acc_t) - 1);

  static uint64_t of(acc_t v) {
    v = v != v ? std::numeric_limits<acc_t>::quiet_NaN() : v + acc_t(0);
    bits_t b;
    std::memcpy(&b, &v, sizeof(b));
    // Negative numbers: flip every bit (larger magnitude -> smaller key); others: set the
    // sign bit so they rank above every negative.
    return (b & kSign) ? static_cast<bits_t>(~b) : static_cast<bits_t>(b | kSign);
  }

  static acc_t value(uint64_t key) {
    const auto k = static_cast<bits_t>(key);
    const bits_t b = (k & kSign) ? static_cast<bits_t>(k & ~kSign) : static_cast<bits_t>(~k);
    acc_t v;
    std::memcpy(&v, &b, sizeof(v));
    return v;
  }
};

template <typename scalar_t>
class RowTopk {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  explicit RowTopk(int64_t k) : best_(k) {}

  // Selects the top k of row[0:n] (k <= n); then value(j) and id(j), j < k, are the j-th
  // best's value and local feature id.
  void select(const scalar_t* row, int64_t n) {
    if (n >= kBlock * static_cast<int64_t>(best_.size())) {
      select_wide(row, n);
    } else {
      select_narrow(row, n);
    }
  }

  acc_t value(int64_t j) const { return Key::value(best_[j].key); }
  int64_t id(int64_t j) const { return best_[j].id; }

 private:
  using Key = TopkKey<acc_t>;
  static constexpr int64_t kBlock = 16;

  struct Entry {
    uint64_t key;
    int64_t id;  // local feature id in the row
  };

  // The TopK rule (topk_rule.h) on keys: larger value first, then lower id.
  static bool better(const Entry& a, const Entry& b) {
    return a.key > b.key || (a.key == b.key && a.id < b.id);
  }

  void select_wide(const scalar_t* row, int64_t n) {
    const int64_t k = static_cast<int64_t>(best_.size());
    const int64_t n_blocks = n / kBlock;
    maxima_.resize(n_blocks);
    for (int64_t b = 0; b < n_blocks; ++b) {
      maxima_[b] = block_max(row + b * kBlock);
    }
    // No NaN among the maxima (block_max skips them), so greater<> is a strict order.
    std::nth_element(maxima_.begin(), maxima_.begin() + (k - 1), maxima_.end(), std::greater<acc_t>());
    const acc_t bound = maxima_[k - 1];
    candidates_.clear();
    int64_t i = 0;
    for (; i + kBlock <= n; i += kBlock) {
      for (uint32_t bits = past</*kStrict=*/false>(row + i, bound); bits != 0; bits &= bits - 1) {
        const int64_t id = i + __builtin_ctz(bits);
        candidates_.push_back({Key::of(static_cast<acc_t>(row[id])), id});
      }
    }
    for (; i < n; ++i) {
      const auto v = static_cast<acc_t>(row[i]);
      if (!(v < bound)) {
        candidates_.push_back({Key::of(v), i});
      }
    }
    std::nth_element(candidates_.begin(), candidates_.begin() + (k - 1), candidates_.end(), better);
    std::sort(candidates_.begin(), candidates_.begin() + k, better);
    std::copy(candidates_.begin(), candidates_.begin() + k, best_.begin());
  }

  void select_narrow(const scalar_t* row, int64_t n) {
    const int64_t k = static_cast<int64_t>(best_.size());
    for (int64_t i = 0; i < k; ++i) {
      best_[i] = {Key::of(static_cast<acc_t>(row[i])), i};
    }
    std::make_heap(best_.begin(), best_.end(), better);  // the worst at the front
    acc_t threshold = Key::value(best_.front().key);
    int64_t i = k;
    // Below, `threshold != threshold` (the root is NaN) ends the scan: nothing can enter.
    for (; i + kBlock <= n && threshold == threshold; i += kBlock) {
      // Set bits in id order; an earlier one may raise the threshold above a later one,
      // which offer() re-tests.
      for (uint32_t bits = past</*kStrict=*/true>(row + i, threshold); bits != 0; bits &= bits - 1) {
        const int64_t l = __builtin_ctz(bits);
        offer(static_cast<acc_t>(row[i + l]), i + l, threshold);
      }
    }
    for (; i < n && threshold == threshold; ++i) {
      offer(static_cast<acc_t>(row[i]), i, threshold);
    }
    std::sort_heap(best_.begin(), best_.end(), better);
  }

#if defined(__x86_64__)
  // float and bfloat16 rows are tested 4 values at a time with SSE (baseline x86-64,
  // VEX-encoded in the AVX2 build) into bit masks, with no branch per feature; other
  // types use the plain loops.
  static constexpr bool kSse = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>;

  // row[0:4] as floats (exact: a bfloat16 is the top half of its float).
  static __m128 load4(const scalar_t* row) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return _mm_loadu_ps(row);
    } else {
      const __m128i half = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row));
      return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), half));
    }
  }
#endif

  // The largest number in row[0:kBlock], NaN skipped (-inf if all are NaN). With SSE,
  // _mm_max_ps(v, m) returns m when v is NaN, and m never is.
  static acc_t block_max(const scalar_t* row) {
#if defined(__x86_64__)
    if constexpr (kSse) {
      __m128 m = _mm_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t q = 0; q < kBlock / 4; ++q) {
        m = _mm_max_ps(load4(row + 4 * q), m);
      }
      m = _mm_max_ps(m, _mm_movehl_ps(m, m));
      m = _mm_max_ps(m, _mm_shuffle_ps(m, m, 1));
      return _mm_cvtss_f32(m);
    }
#endif
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t l = 0; l < kBlock; ++l) {
      const auto v = static_cast<acc_t>(row[l]);
      m = v > m ? v : m;
    }
    return m;
  }

  // Bit l set where row[l] (l < kBlock) is NaN or past bar: > bar if kStrict, >= bar
  // otherwise, i.e. !(v <= bar) or !(v < bar).
  template <bool kStrict>
  static uint32_t past(const scalar_t* row, acc_t bar) {
    uint32_t bits = 0;
#if defined(__x86_64__)
    if constexpr (kSse) {
      const __m128 b = _mm_set1_ps(bar);
      for (int64_t q = 0; q < kBlock / 4; ++q) {
        const __m128 v = load4(row + 4 * q);
        const __m128 hit = kStrict ? _mm_cmpnle_ps(v, b) : _mm_cmpnlt_ps(v, b);
        bits |= static_cast<uint32_t>(_mm_movemask_ps(hit)) << (4 * q);
      }
      return bits;
    }
#endif
    for (int64_t l = 0; l < kBlock; ++l) {
      const auto v = static_cast<acc_t>(row[l]);
      bits |= static_cast<uint32_t>(kStrict ? !(v <= bar) : !(v < bar)) << l;
    }
    return bits;
  }

  // Feature (v, id), id above every id held, replaces the root if it beats it: if v is
  // greater, or NaN while the root is not (a NaN root means all k held are NaN).
  void offer(acc_t v, int64_t id, acc_t& threshold) {
    if (v <= threshold || threshold != threshold) {
      return;
    }
    // The new entry goes in at the root and sifts down: the worse child moves up while
    // it is worse than the entry.
    const Entry entry{Key::of(v), id};
    const size_t n = best_.size();
    size_t i = 0;
    for (size_t c = 1; c < n; c = 2 * i + 1) {
      if (c + 1 < n && better(best_[c], best_[c + 1])) {
        ++c;
      }
      if (!better(entry, best_[c])) {
        break;
      }
      best_[i] = best_[c];
      i = c;
    }
    best_[i] = entry;
    threshold = Key::value(best_.front().key);
  }

  std::vector<Entry> best_;        // [k]: the result, sorted best first (a heap meanwhile)
  std::vector<acc_t> maxima_;      // [n / kBlock], wide rows
  std::vector<Entry> candidates_;  // wide rows: features at or above the bound
};

}  // namespace switch_sae::cpu
