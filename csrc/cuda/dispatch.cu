// switch_sae::dispatch on CUDA, and group_by_key, the stable grouping that dispatch and
// both sparse backward ops share. CPU twin: csrc/cpu/dispatch.cpp (a counting sort).
//
// Algorithm: the same grouping as the CPU counting sort, with the same result.
//   1. histogram of the keys (privatised in shared memory when n_bins <= kSharedBins,
//      global int64 atomics otherwise; integer atomics, so counts are exact and the
//      result deterministic), which also checks every key's range on the device;
//   2. exclusive scan of the counts (at::cumsum on the device) -> bin_offsets;
//   3. stable scatter: at::sort(stable=true) of the keys as int32, i.e. CUB's LSD radix
//      sort, itself a sequence of stable counting sorts (one per 8-bit digit). Its
//      permutation is exactly the counting sort's: by key, ties in ascending position.
//      A one-pass scatter with per-block ranks would save the extra radix passes; it is
//      worth writing once it can be measured on a GPU (see csrc/cuda/README.md).
// No host synchronisation anywhere: every size is known on the host from the shapes.
//
// Launch: histogram grid = min(ceil(n / 256), 2^16) blocks x 256 threads, grid-stride;
// when privatised (dynamic shared memory 4 * n_bins bytes), at most kBlocksPerSm blocks
// per SM, because each block zeroes and flushes all n_bins counters: with one block per
// 256 keys that set-up would cost more than the counting.
// Memory traffic, n keys: histogram reads 8n B; int32 conversion 12n B; radix sort of
// 32-bit keys with int64 values ~4 passes x 2 x (4 + 8)n B ~ 100n B; output 8n B +
// 8 (n_bins + 1) B. For dispatch (n = batch * n_active) this is small next to the encoder.
#include "common.cuh"

#include <limits>

namespace switch_sae::cuda {
namespace {

// Bins counted in shared memory per block (32 KiB of counters) before falling back to
// global atomics: covers every realistic n_experts; d_sae-sized histograms (the backward
// ops) spread over many addresses, so global atomics rarely collide there.
constexpr int64_t kSharedBins = 8192;

// Privatised histogram blocks per SM: enough resident blocks to hide atomic latency,
// few enough that each block counts many keys per counter it zeroes and flushes.
constexpr int64_t kBlocksPerSm = 4;

template <bool kShared>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const int64_t* __restrict__ keys, int64_t n, int64_t n_bins,
                     unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned int block_counts[];  // [n_bins], only when kShared
  if constexpr (kShared) {
    for (int64_t b = threadIdx.x; b < n_bins; b += blockDim.x) {
      block_counts[b] = 0;
    }
    __syncthreads();
  }
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  bool out_of_range = false;  // asserted once at the end, away from the hot loop
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t key = keys[i];
    if (key < 0 || key >= n_bins) {
      out_of_range = true;
      continue;
    }
    if constexpr (kShared) {
      atomicAdd(&block_counts[key], 1u);
    } else {
      atomicAdd(&counts[key], 1ull);
    }
  }
  if constexpr (kShared) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < n_bins; b += blockDim.x) {
      if (block_counts[b] != 0) {
        atomicAdd(&counts[b], static_cast<unsigned long long>(block_counts[b]));
      }
    }
  }
  CUDA_KERNEL_ASSERT_MSG(!out_of_range,
                         "switch_sae: an expert id or feature index is out of range (experts "
                         "must be in [0, n_experts), indices in [0, d_sae))");
}

std::tuple<at::Tensor, at::Tensor> dispatch_cuda(const at::Tensor& experts, int64_t n_experts) {
  check_dispatch_args(experts, n_experts);
  const c10::cuda::CUDAGuard guard(experts.device());
  return group_by_key(experts, n_experts);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> group_by_key(const at::Tensor& keys, int64_t n_bins) {
  TORCH_CHECK(n_bins <= std::numeric_limits<int32_t>::max(),
              "switch_sae: at most 2^31 - 1 experts or features are supported, got ", n_bins);
  const int64_t n = keys.numel();
  const auto flat_keys = keys.reshape({n});  // [n] (a view: keys are contiguous)
  auto counts = at::zeros({n_bins}, keys.options());  // [n_bins] int64
  if (n > 0 && n_bins > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
    const unsigned int grid = grid_for(n, kThreads);
    if (n_bins <= kSharedBins) {
      const size_t shared_bytes = sizeof(unsigned int) * static_cast<size_t>(n_bins);
      const auto capped = static_cast<unsigned int>(
          std::min<int64_t>(grid, kBlocksPerSm * multiprocessor_count(keys.device().index())));
      histogram_kernel<true><<<capped, kThreads, shared_bytes, stream>>>(
          flat_keys.data_ptr<int64_t>(), n, n_bins, counts_ptr);
    } else {
      histogram_kernel<false><<<grid, kThreads, 0, stream>>>(flat_keys.data_ptr<int64_t>(), n,
                                                             n_bins, counts_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto bin_offsets = at::zeros({n_bins + 1}, keys.options());  // [n_bins + 1]
  auto bin_ends = bin_offsets.narrow(0, 1, n_bins);  // [n_bins], a view
  at::cumsum_out(bin_ends, counts, 0);
  // int32 keys: half the radix passes of int64 (keys fit: n_bins <= INT32_MAX, checked).
  auto perm = std::get<1>(at::sort(flat_keys.to(at::kInt), /*stable=*/true, /*dim=*/0,
                                   /*descending=*/false));  // [n] int64
  return {perm, bin_offsets};
}

}  // namespace switch_sae::cuda

TORCH_LIBRARY_IMPL(switch_sae, CUDA, m) { m.impl("dispatch", &switch_sae::cuda::dispatch_cuda); }
