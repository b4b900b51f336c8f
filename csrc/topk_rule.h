// The TopK rule of every switch_sae kernel (and of reference.topk): larger values first,
// NaN above every number (as torch.topk), and between equal values (-0.0 == +0.0) the
// lower feature id. A strict total order, so the k chosen features and their order are
// fully determined, and the CPU and CUDA kernels choose the same features even where
// bf16 rounding makes many pre-activations tie exactly. Host and device code share it.
#pragma once
#include <c10/macros/Macros.h>

#include <cstdint>

namespace switch_sae {

// Whether (va, ia) comes before (vb, ib): values in the accumulator type (exact for
// every input dtype), ids within one row.
template <typename acc_t>
C10_HOST_DEVICE inline bool topk_precedes(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  const bool nan_a = va != va, nan_b = vb != vb;  // NOLINT: x != x is the NaN test
  if (nan_a != nan_b) {
    return nan_a;
  }
  if (!nan_a && va != vb) {
    return va > vb;
  }
  return ia < ib;
}

}  // namespace switch_sae
