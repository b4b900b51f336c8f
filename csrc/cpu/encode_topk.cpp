// CPU kernel of switch_sae::encode_topk, the routed encoder: for each expert, the
// (token, expert) pairs it owns (order[offsets[e]:offsets[e+1]]) are encoded
// tile_rows at a time: gather (x - b_dec) rows, one GEMM against W_enc[e].T (+ b_enc[e];
// encoder_gemm below), TopK(k) sorted descending, ReLU, then scatter the values and
// global feature ids (e * d_expert + local) to the pairs' rows. One such (expert, tile) is a
// work item; items write disjoint output rows, so they are independent.
//
// Parallelism, chosen from the shapes only (never from the thread count, so a given
// input always takes the same path and the result is bitwise the same for any number
// of threads):
// - small items (mean rows * d_expert * d_in per item < kSmallItemMacs, e.g. many
//   experts of ~64 rows): ONE at::parallel_for over the items. Inside it the GEMM and
//   our TopK run single-threaded (in_parallel_region), so a call opens one parallel region
//   instead of two per item; with 64 experts the per-item fork/joins cost more than the
//   work itself, worse still on a busy machine.
// - large items (e.g. one expert holding the whole dictionary): items run one after
//   another and the GEMM and the TopK use the intra-op thread pool themselves, which splits
//   one big GEMM evenly where a few big items would not split evenly over threads.
// Either way the cheap gather around them is a serial loop per item; the TopK (our own
// one-pass selection, cpu/topk_select.h, for its tie rule and so that it reads each tile
// right after its GEMM) is parallel over rows on the large-item path only.
// (at::parallel_for only forks when the extension is compiled with OpenMP, as ATen is.)
//
// Memory: each parallel chunk (at most one per thread) owns scratch of at most
// tile_rows x (d_in + d_expert) elements and d_expert candidate ids, so at most
// n_threads times that is live (once in the serial path); the [rows, d_sae]
// pre-activations never exist.
//
// What it leaves out: routing and gating (the model), the backward (encode_backward.cpp).
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/expert_gemm.h"
#include "cpu/row_math.h"
#include "cpu/topk_select.h"

namespace switch_sae {
namespace {

// ---- kernel

// Fewest features per thread when one tile's GEMM is split over threads.
constexpr int64_t kGemmFeatureGrain = 64;

// offsets must describe a split of the rows sorted pairs into n_experts runs.
void check_offsets_values(const int64_t* offsets, int64_t n_experts, int64_t rows) {
  TORCH_CHECK(offsets[0] == 0, "switch_sae: offsets[0] must be 0, got ", offsets[0]);
  for (int64_t e = 0; e < n_experts; ++e) {
    TORCH_CHECK(offsets[e] <= offsets[e + 1], "switch_sae: offsets must be non-decreasing, got offsets[",
                e, "] = ", offsets[e], " > offsets[", e + 1, "] = ", offsets[e + 1]);
  }
  TORCH_CHECK(offsets[n_experts] == rows, "switch_sae: offsets[n_experts] must equal rows = ", rows,
              ", got ", offsets[n_experts]);
}

// order [rows] -> token of each sorted pair [rows]; checks that pair ids are in range.
std::vector<int64_t> tokens_of_pairs(const at::Tensor& order, int64_t n_active) {
  const int64_t rows = order.size(0);
  const int64_t* pairs = order.data_ptr<int64_t>();
  std::vector<int64_t> tokens(rows);
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(pairs[i] >= 0 && pairs[i] < rows, "switch_sae: order[", i, "] = ", pairs[i],
                " is out of range [0, ", rows, ") (rows = batch * n_active)");
    tokens[i] = pairs[i] / n_active;
  }
  return tokens;
}

// The gather before the GEMM is a plain serial loop: it is O(tile * d_in) next to the
// GEMM's O(tile * d_in * d_expert), and an ATen call would open one more parallel region
// per tile.

// x_tile[i] = x[tokens[i]] - b_dec, rounded to scalar_t like the reference's x - b_dec.
template <typename scalar_t>
void gather_centered(const scalar_t* x, const scalar_t* b_dec, const int64_t* tokens, int64_t n,
                     int64_t d_in, scalar_t* x_tile) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* row = x + tokens[i] * d_in;
    scalar_t* out = x_tile + i * d_in;
    for (int64_t d = 0; d < d_in; ++d) {
      out[d] = row[d] - b_dec[d];
    }
  }
}

// pre [n, d_expert] = xs [n, d_in] . W [d_expert, d_in]^T (+ b [d_expert]). float32 on
// an AVX-512 CPU: our expert_gemm (cpu/expert_gemm.h), split over features when called
// outside a parallel region (every element is computed the same way however the features
// are split); otherwise ATen's addmm/mm, which use the thread pool themselves.
template <typename scalar_t>
void encoder_gemm(const at::Tensor& xs, const at::Tensor& W, const std::optional<at::Tensor>& b,
                  at::Tensor pre) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (cpu::expert_gemm_available()) {
      const int64_t n = xs.size(0), d_in = xs.size(1);
      const float* bias = b.has_value() ? b->data_ptr<float>() : nullptr;
      at::parallel_for(0, W.size(0), /*grain_size=*/kGemmFeatureGrain, [&](int64_t first, int64_t last) {
        cpu::expert_gemm(xs.data_ptr<float>(), d_in, W.data_ptr<float>(), d_in, bias, pre.data_ptr<float>(),
                         pre.size(1), n, first, last, d_in);
      });
      return;
    }
  }
  if (b.has_value()) {
    at::addmm_out(pre, *b, xs, W.t());
  } else {
    at::mm_out(pre, xs, W.t());
  }
}

// For each of the n rows of pre [n, d_expert]: the top k features (topk_rule.h), best
// first; values[pairs[i]] = ReLU(their values), indices[pairs[i]] = first_feature + their
// local ids. Parallel over rows when called outside a parallel region (the large-item
// path, where one tile can be 1024 x 65536); inline inside one, right after the GEMM
// that wrote pre, while it is still in cache.
template <typename scalar_t>
void scatter_topk(const scalar_t* pre, int64_t n, int64_t d_expert, int64_t k,
                  const int64_t* pairs, int64_t first_feature, scalar_t* values,
                  int64_t* indices) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / d_expert);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    cpu::with_best_isa([&] {
      cpu::RowTopk<scalar_t> topk(k);
      for (int64_t i = begin; i < end; ++i) {
        topk.select(pre + i * d_expert, d_expert);
        for (int64_t j = 0; j < k; ++j) {
          const auto v = static_cast<scalar_t>(topk.value(j));  // exact: it came from scalar_t
          // ReLU as at::relu: NaN propagates.
          values[pairs[i] * k + j] = (v > scalar_t(0) || at::_isnan(v)) ? v : scalar_t(0);
          indices[pairs[i] * k + j] = first_feature + topk.id(j);
        }
      }
    });
  });
}

// ---- launcher

// Items below this mean GEMM size (multiply-adds, ~10 ms of one core) run in one
// parallel region; measured on 2 cores, batch 4096, d_in 512, d_sae 65536: 16 experts
// (0.5e9 per item) and more gain from it, 4 experts (8.6e9) do not need it.
constexpr double kSmallItemMacs = 1 << 30;

std::tuple<at::Tensor, at::Tensor> encode_topk_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                   const std::optional<at::Tensor>& b_enc,
                                                   const at::Tensor& b_dec, const at::Tensor& order,
                                                   const at::Tensor& offsets, int64_t n_active,
                                                   int64_t k, int64_t requested_tile_rows) {
  check_encode_topk_args(x, W_enc, b_enc, b_dec, order, offsets, n_active, k, requested_tile_rows);
  const int64_t n_experts = W_enc.size(0), d_expert = W_enc.size(1), d_in = x.size(1);
  const int64_t rows = order.size(0);
  const int64_t tile_rows = effective_tile_rows(requested_tile_rows, rows);
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets_values(off, n_experts, rows);
  const std::vector<int64_t> tokens = tokens_of_pairs(order, n_active);  // [rows], sorted order
  check_order_is_permutation(order);
  // Pairs not covered by any expert cannot occur after the checks; zeros match the reference.
  at::Tensor values = at::zeros({rows, k}, x.options());                    // [rows, k]
  at::Tensor indices = at::zeros({rows, k}, x.options().dtype(at::kLong));  // [rows, k]

  // Work items (expert, first sorted pair) of at most tile_rows pairs each.
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t e = 0; e < n_experts; ++e) {
    for (int64_t start = off[e]; start < off[e + 1]; start += tile_rows) {
      items.emplace_back(e, start);
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const auto item_rows = [&](int64_t i) {
    const auto [e, start] = items[i];
    return std::min(tile_rows, off[e + 1] - start);
  };

  // Worker threads start with default thread-local state (grad mode on, no dispatch
  // exclusions); the ATen calls below must see the caller's, as on the calling thread.
  const at::ThreadLocalState caller_state;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "encode_topk_cpu", [&] {
    // Encodes items [begin, end) one after another with scratch sized for the largest.
    const auto encode_items = [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard state_guard(caller_state);
      int64_t tile = 0;
      for (int64_t i = begin; i < end; ++i) {
        tile = std::max(tile, item_rows(i));
      }
      at::Tensor x_tile = at::empty({tile, d_in}, x.options());  // [tile, d_in]
      at::Tensor pre = at::empty({tile, d_expert}, x.options());  // [tile, d_expert]
      for (int64_t i = begin; i < end; ++i) {
        const auto [e, start] = items[i];
        const int64_t n = item_rows(i);
        gather_centered<scalar_t>(x.data_ptr<scalar_t>(), b_dec.data_ptr<scalar_t>(),
                                  tokens.data() + start, n, d_in, x_tile.data_ptr<scalar_t>());
        encoder_gemm<scalar_t>(x_tile.narrow(0, 0, n), W_enc[e],
                               b_enc.has_value() ? std::optional<at::Tensor>((*b_enc)[e]) : std::nullopt,
                               pre.narrow(0, 0, n));
        scatter_topk<scalar_t>(pre.data_ptr<scalar_t>(), n, d_expert, k,
                               order.data_ptr<int64_t>() + start, e * d_expert,
                               values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
      }
    };
    const double mean_item_macs =
        n_items == 0 ? 0.0 : static_cast<double>(rows) / n_items * d_expert * d_in;
    if (mean_item_macs < kSmallItemMacs) {
      at::parallel_for(0, n_items, /*grain_size=*/1, encode_items);
    } else {
      encode_items(0, n_items);
    }
  });
  return {values, indices};
}

}  // namespace

// ---- registration

TORCH_LIBRARY_IMPL(switch_sae, CPU, m) {
  m.impl("encode_topk", &encode_topk_cpu);
}

}  // namespace switch_sae
