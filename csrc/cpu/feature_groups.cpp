// Stable counting sort of a sparse code's (row, slot) entries by feature id: histogram,
// exclusive scan, scatter. See feature_groups.h.
#include "cpu/feature_groups.h"

namespace switch_sae::cpu {

FeatureGroups group_by_feature(const at::Tensor& indices, int64_t n_features) {
  const int64_t k = indices.size(1);
  const int64_t n = indices.numel();
  const int64_t* idx = indices.data_ptr<int64_t>();
  FeatureGroups groups{std::vector<int64_t>(n_features + 1, 0), std::vector<int64_t>(n)};
  // Histogram, shifted by one so that the scan below is exclusive.
  for (int64_t s = 0; s < n; ++s) {
    const int64_t f = idx[s];
    TORCH_CHECK(f >= 0 && f < n_features, "switch_sae: indices[", s / k, ", ", s % k, "] = ", f,
                " is out of range [0, ", n_features, ") (d_sae features)");
    ++groups.offsets[f + 1];
  }
  for (int64_t f = 0; f < n_features; ++f) {
    groups.offsets[f + 1] += groups.offsets[f];
  }
  // Scatter in ascending entry order, which keeps each group sorted (stable).
  std::vector<int64_t> cursor(groups.offsets.begin(), groups.offsets.end() - 1);
  for (int64_t s = 0; s < n; ++s) {
    groups.slots[cursor[idx[s]]++] = s;
  }
  return groups;
}

}  // namespace switch_sae::cpu
