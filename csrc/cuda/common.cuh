// Shared pieces of the switch_sae CUDA kernels: launch sizing, the accumulator type, the
// device-side expert lookup, and the three sparse primitives that more than one op
// uses. Each primitive is implemented in the .cu of the op it was first written for:
//   group_by_key    (dispatch.cu)         stable grouping of positions by an int64 key
//   gather_sum_out  (decode.cu)           out[g] = sum of weighted table rows, per group
//   feature_sum_out (decode_backward.cu)  out[f] = sum of weighted source rows, per key
// What it leaves out: op-specific kernels, argument checks (csrc/checks.h, shared with
// the CPU kernels) and registration (each op's .cu).
//
// Error reporting: shape, dtype and device errors are TORCH_CHECKs on the host (same
// messages as the CPU kernels). Data-dependent errors (an index out of range) can only
// be seen on the device: a kernel skips a bad entry (never reading or writing out of
// bounds) and asserts once at its end (CUDA_KERNEL_ASSERT_MSG, kept in release builds;
// at the end, not in the loop, because the assert's call would otherwise make ptxas
// spill registers in the hot loop). The assert surfaces as a CUDA error at the next
// synchronisation, as with ATen's own index kernels; reporting it as a TORCH_CHECK with
// the CPU's message would need a host sync.
#pragma once

// c10's stream header, not ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS, cuSPARSE
// and cuSOLVER headers, which an nvcc-only toolkit (torch ships those libraries in its
// own wheels) does not have. c10::cuda::getCurrentCUDAStream is the stream that
// at::cuda::getCurrentCUDAStream returns.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "checks.h"

namespace switch_sae::cuda {

// Threads per block for every kernel here: 8 warps, enough to cover d_in = 768..4096
// columns in 1..4 passes and small enough for several resident blocks per SM.
constexpr int kThreads = 256;
constexpr int kWarp = 32;

// Grids stride over their work, so the grid is capped well below gridDim.x's limit; 2^16
// blocks already oversubscribe every current GPU many times.
inline unsigned int grid_for(int64_t n_items, int64_t items_per_block) {
  const int64_t blocks = (n_items + items_per_block - 1) / items_per_block;
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, int64_t{1} << 16));
}

// Streaming multiprocessors of a device: an attribute query, no synchronisation.
inline int multiprocessor_count(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Accumulator: fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 (at::opmath_type).
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// The expert owning sorted position pos, i.e. the e with offsets[e] <= pos < offsets[e+1]
// (the last such e when experts are empty). Binary search over offsets[n_experts + 1];
// the result is always in [0, n_experts) whatever offsets hold, so it is safe to index
// with even before offsets have been validated.
__device__ __forceinline__ int64_t expert_of_position(const int64_t* offsets, int64_t n_experts,
                                                      int64_t pos) {
  int64_t lo = 0;
  int64_t hi = n_experts;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= pos) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Weight of slot s in the sparse sums: weights[s], or 0 where a mask is given and
// mask[s] <= 0 (the ReLU mask of encode_backward: where(values > 0, grad_values, 0)).
template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> slot_weight(const scalar_t* weights,
                                                       const scalar_t* mask, int64_t s) {
  if (mask != nullptr && !(static_cast<acc_t<scalar_t>>(mask[s]) > 0)) {
    return acc_t<scalar_t>(0);
  }
  return static_cast<acc_t<scalar_t>>(weights[s]);
}

// keys [n] int64, each in [0, n_bins) -> perm [n] int64 (positions 0..n-1 sorted stably by
// key: within a key, ascending position), bin_offsets [n_bins + 1] int64 (key b owns
// perm[bin_offsets[b]:bin_offsets[b+1]]). A key out of range is a device-side assert.
std::tuple<at::Tensor, at::Tensor> group_by_key(const at::Tensor& keys, int64_t n_bins);

// out [n_groups, d_in] = for each group g: sum over slots s in [g*group, (g+1)*group), in
// order, of slot_weight(weights, mask, s) * table[index[s]]. weights, index: [n_groups *
// group] (any shape with that many contiguous elements); mask: same or undefined;
// table [n_table, d_in]. fp32 accumulation for reduced precision.
void gather_sum_out(at::Tensor& out, const at::Tensor& weights, const at::Tensor& mask,
                    const at::Tensor& index, const at::Tensor& table, int64_t group);

// For each key f (from group_by_key's perm/bin_offsets over n_slots slots):
//   out[f] = sum over its slots s, in ascending s, of slot_weight(weights, mask, s) *
//            (src[s / src_div] - center)   (center undefined: no subtraction; with a center
//            the difference is rounded to src's dtype first, as (x - b_dec) is in the
//            reference)
//   bias_out[f] = sum over its slots of slot_weight(...)   (if bias_out is defined)
//   dot_out[s] = <src[s / src_div], dot_table[f]>, for each slot s of key f (if dot_out
//            is defined; center must then be undefined): decode_backward's grad_values,
//            formed while the slot's source row is loaded and reading each table row once
// out [n_keys, d_in], src [*, d_in], center [d_in] or undefined, bias_out [n_keys] or
// undefined, dot_table [n_keys, d_in] and dot_out [n_slots] (any shape) both or neither.
// Every row of out is written (zeros for keys without slots).
void feature_sum_out(at::Tensor& out, at::Tensor& bias_out, const at::Tensor& perm,
                     const at::Tensor& bin_offsets, const at::Tensor& weights,
                     const at::Tensor& mask, const at::Tensor& src, const at::Tensor& center,
                     int64_t src_div, const at::Tensor& dot_table = at::Tensor(),
                     const at::Tensor& dot_out = at::Tensor());

}  // namespace switch_sae::cuda
