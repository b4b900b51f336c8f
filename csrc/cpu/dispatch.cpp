// CPU kernel of switch_sae::dispatch: group the (token, expert) pairs by expert with a
// stable counting sort (histogram, exclusive scan, scatter), O(rows + n_experts).
//
// What it leaves out: routing itself (which experts a token goes to) is decided by
// the model; this only orders the pairs so each expert's rows are contiguous.
#include <torch/extension.h>

#include <vector>

#include "checks.h"

namespace switch_sae {
namespace {

// ---- kernel

// experts [rows] -> order [rows], offsets [n_experts + 1]
void dispatch_kernel(const int64_t* experts, int64_t rows, int64_t n_experts, int64_t* order,
                     int64_t* offsets) {
  std::fill(offsets, offsets + n_experts + 1, int64_t(0));
  // Histogram, shifted by one so that the scan below is exclusive.
  for (int64_t p = 0; p < rows; ++p) {
    const int64_t e = experts[p];
    TORCH_CHECK(e >= 0 && e < n_experts, "switch_sae: experts[", p, "] = ", e,
                " is out of range [0, ", n_experts, ") (n_experts)");
    ++offsets[e + 1];
  }
  for (int64_t e = 0; e < n_experts; ++e) {
    offsets[e + 1] += offsets[e];
  }
  // Scatter pairs in ascending order: equal experts keep their relative order (stable).
  std::vector<int64_t> cursor(offsets, offsets + n_experts);
  for (int64_t p = 0; p < rows; ++p) {
    order[cursor[experts[p]]++] = p;
  }
}

// ---- launcher

std::tuple<at::Tensor, at::Tensor> dispatch_cpu(const at::Tensor& experts, int64_t n_experts) {
  check_dispatch_args(experts, n_experts);
  const int64_t rows = experts.size(0);
  at::Tensor order = at::empty({rows}, experts.options());               // [rows]
  at::Tensor offsets = at::empty({n_experts + 1}, experts.options());    // [n_experts + 1]
  dispatch_kernel(experts.data_ptr<int64_t>(), rows, n_experts, order.data_ptr<int64_t>(),
                  offsets.data_ptr<int64_t>());
  return {order, offsets};
}

}  // namespace

// ---- registration

TORCH_LIBRARY_IMPL(switch_sae, CPU, m) {
  m.impl("dispatch", &dispatch_cpu);
}

}  // namespace switch_sae
