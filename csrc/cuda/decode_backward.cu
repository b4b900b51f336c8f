// switch_sae::decode_backward on CUDA, and feature_sum_out, the per-feature reduction it
// shares with encode_backward. CPU twins: csrc/cpu/decode_backward.cpp and
// csrc/cpu/feature_groups.{h,cpp} (group_by_feature + reduce_by_feature).
//
// Algorithm, as on the CPU, deterministic and without float atomics, in one pass by
// feature: group the rows * k slots by feature (group_by_key: histogram, scan, stable
// sort), then one block per feature f
//   grad_W_dec[f] = sum of values[s] * grad_out[s / k] over its slots in ascending slot
//     order, the CPU's order, in fp32 (fp64 for fp64);
//   grad_values[s] = <grad_out[s / k], W_dec[f]> for each of its slots: one warp per
//     staged slot, lanes stride over d_in, then a fixed shuffle tree (the same order every
//     run). W_dec[f] is read from memory once for all its slots, where a pass by row
//     would gather one W_dec row per slot.
// An atomics variant (scatter-add without grouping) would be nondeterministic; it is
// not written: it is worth having only where it is measurably faster, and
// that cannot be measured without a GPU.
//
// Launch:
//   feature_sum_kernel: one block of 256 threads per feature, grid-stride over features;
//     slots are staged 256 at a time in shared memory (slot, row id, weight: 6 KiB);
//     with a dot table (decode_backward), warp w forms the dot products of staged slots
//     w, w + 8, ... during the first pass; then
//     every thread accumulates kColumns columns (d_in up to 2048 in one pass, so each
//     slot is staged once; wider rows take one pass per 2048 columns). The weight sum
//     (grad_b_enc) is taken by thread 0 from the staged weights during the first pass,
//     in slot order. Static shared memory only.
// Memory traffic: reads each hit W_dec row once (at most d_sae * d_in elements) and
//   rows * k * d_in grad_out elements (gathered by slot, twice: dot and sum, the second
//   from L1/L2; grad_out is rows * d_in, L2-resident at training sizes), writes rows * k
//   grad_values and d_sae * d_in grad_W_dec (every row, zeros for features no slot hit),
//   plus the grouping (see dispatch.cu). About 2 * d_sae * d_in elements in all, where a
//   pass by row gathers rows * k * d_in W_dec elements (twice d_sae * d_in at the
//   benchmark's batch 4096, k 32, d_sae 65536) before writing grad_W_dec.
// Load balance: a feature hit by many slots is summed by one block; a very popular
// feature therefore bounds the kernel's duration (see csrc/cuda/README.md).
#include "common.cuh"

namespace switch_sae::cuda {
namespace {

// Columns each thread of feature_sum_kernel accumulates per staging of the slots.
constexpr int kColumns = 8;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    feature_sum_kernel(const int64_t* __restrict__ perm, const int64_t* __restrict__ bin_offsets,
                       const scalar_t* __restrict__ weights, const scalar_t* __restrict__ mask,
                       const scalar_t* __restrict__ src, const scalar_t* __restrict__ center,
                       int64_t src_div, int64_t n_features, int64_t d_in,
                       scalar_t* __restrict__ out, scalar_t* __restrict__ bias_out,
                       const scalar_t* __restrict__ dot_table, scalar_t* __restrict__ dot_out) {
  using acc = acc_t<scalar_t>;
  __shared__ int64_t staged_slot[kThreads];  // slot id of each staged slot
  __shared__ int64_t staged_row[kThreads];   // its source row
  __shared__ acc staged_weight[kThreads];    // its weight
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int n_warps = blockDim.x / kWarp;
  const int64_t pass_columns = int64_t{kColumns} * blockDim.x;
  for (int64_t f = blockIdx.x; f < n_features; f += gridDim.x) {
    const int64_t begin = bin_offsets[f];
    const int64_t end = bin_offsets[f + 1];
    // Passes are block-uniform (the loop bounds do not depend on the thread), so every
    // thread reaches every __syncthreads below. At least one pass runs, for the weight
    // sum when d_in == 0.
    for (int64_t base = 0; base == 0 || base < d_in; base += pass_columns) {
      // Thread t owns columns base + u * blockDim.x + t, u < kColumns.
      acc sum[kColumns];
      acc shift[kColumns];
#pragma unroll
      for (int u = 0; u < kColumns; ++u) {
        const int64_t c = base + u * int64_t{blockDim.x} + threadIdx.x;
        sum[u] = acc(0);
        shift[u] = center != nullptr && c < d_in ? static_cast<acc>(center[c]) : acc(0);
      }
      const bool sums_bias = bias_out != nullptr && base == 0 && threadIdx.x == 0;
      acc total = acc(0);
      for (int64_t chunk = begin; chunk < end; chunk += blockDim.x) {
        const int64_t n = end - chunk < int64_t{blockDim.x} ? end - chunk : int64_t{blockDim.x};
        if (threadIdx.x < n) {
          const int64_t s = perm[chunk + threadIdx.x];
          staged_slot[threadIdx.x] = s;
          staged_row[threadIdx.x] = s / src_div;
          staged_weight[threadIdx.x] = slot_weight(weights, mask, s);
        }
        __syncthreads();
        if (dot_out != nullptr && base == 0) {
          // dot_out[s] = <src row of s, dot_table[f]>: warp w takes staged slots w, w + 8,
          // ...; dot_table[f] is read from memory once per feature, then from L1/L2.
          for (int64_t i = warp; i < n; i += n_warps) {
            const scalar_t* row = src + staged_row[i] * d_in;
            acc dot = acc(0);
            for (int64_t c = lane; c < d_in; c += kWarp) {
              dot += static_cast<acc>(row[c]) * static_cast<acc>(dot_table[f * d_in + c]);
            }
#pragma unroll
            for (int offset = kWarp / 2; offset > 0; offset /= 2) {
              dot += __shfl_down_sync(0xffffffffu, dot, offset);
            }
            if (lane == 0) {
              dot_out[staged_slot[i]] = static_cast<scalar_t>(dot);
            }
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* row = src + staged_row[i] * d_in;
          const acc w = staged_weight[i];
#pragma unroll
          for (int u = 0; u < kColumns; ++u) {
            const int64_t c = base + u * int64_t{blockDim.x} + threadIdx.x;
            if (c < d_in) {
              acc v = static_cast<acc>(row[c]);
              if (center != nullptr) {
                // (x - b_dec) is rounded to x's dtype in the reference before the product.
                v = static_cast<acc>(static_cast<scalar_t>(v - shift[u]));
              }
              sum[u] += w * v;
            }
          }
          if (sums_bias) {
            total += w;
          }
        }
        __syncthreads();  // staged slots are overwritten by the next chunk
      }
#pragma unroll
      for (int u = 0; u < kColumns; ++u) {
        const int64_t c = base + u * int64_t{blockDim.x} + threadIdx.x;
        if (c < d_in) {
          out[f * d_in + c] = static_cast<scalar_t>(sum[u]);
        }
      }
      if (sums_bias) {
        bias_out[f] = static_cast<scalar_t>(total);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> decode_backward_cuda(const at::Tensor& grad_out,
                                                        const at::Tensor& values,
                                                        const at::Tensor& indices,
                                                        const at::Tensor& W_dec) {
  check_decode_backward_args(grad_out, values, indices, W_dec);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t rows = values.size(0), k = values.size(1);
  const int64_t d_sae = W_dec.size(0), d_in = W_dec.size(1);
  auto grad_values = at::empty_like(values);  // [rows, k]
  auto grad_W_dec = at::empty_like(W_dec);    // [d_sae, d_in]
  const auto [perm, bin_offsets] = group_by_key(indices, d_sae);  // [rows * k], [d_sae + 1]
  at::Tensor no_bias;
  feature_sum_out(grad_W_dec, no_bias, perm, bin_offsets, values, /*mask=*/at::Tensor(),
                  grad_out, /*center=*/at::Tensor(), /*src_div=*/k, /*dot_table=*/W_dec,
                  /*dot_out=*/grad_values);
  return {grad_values, grad_W_dec};
}

}  // namespace

void feature_sum_out(at::Tensor& out, at::Tensor& bias_out, const at::Tensor& perm,
                     const at::Tensor& bin_offsets, const at::Tensor& weights,
                     const at::Tensor& mask, const at::Tensor& src, const at::Tensor& center,
                     int64_t src_div, const at::Tensor& dot_table, const at::Tensor& dot_out) {
  const int64_t n_features = out.size(0), d_in = out.size(1);
  if (n_features == 0) {
    return;  // an empty grid is a launch error
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, out.scalar_type(), "switch_sae_feature_sum", [&] {
        feature_sum_kernel<scalar_t>
            <<<grid_for(n_features, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                perm.data_ptr<int64_t>(), bin_offsets.data_ptr<int64_t>(),
                weights.data_ptr<scalar_t>(),
                mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, src.data_ptr<scalar_t>(),
                center.defined() ? center.data_ptr<scalar_t>() : nullptr, src_div, n_features,
                d_in, out.data_ptr<scalar_t>(),
                bias_out.defined() ? bias_out.data_ptr<scalar_t>() : nullptr,
                dot_table.defined() ? dot_table.data_ptr<scalar_t>() : nullptr,
                dot_out.defined() ? dot_out.data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace switch_sae::cuda

TORCH_LIBRARY_IMPL(switch_sae, CUDA, m) {
  m.impl("decode_backward", &switch_sae::cuda::decode_backward_cuda);
}
