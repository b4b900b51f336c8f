// switch_sae::decode on CUDA, the sparse gather-sum decoder
// out[r] = sum_j values[r, j] * W_dec[indices[r, j]], and gather_sum_out, the kernel it
// shares with encode_backward (grad_x). CPU twin: csrc/cpu/decode.cpp.
//
// Algorithm: as on the CPU, one output row at a time, slots summed in order j = 0..k-1,
// fp32 accumulators for bf16/fp16/fp32 (fp64 for fp64), one rounding at the end.
// Launch: each thread owns VEC consecutive columns per pass (VEC = 16 bytes / element
// size when d_in and both base pointers allow 16-byte vector loads, else 1). A row gets
// ceil(d_in / VEC) threads rounded up to a warp (at most 256: more columns take more
// passes), and a block of 256 threads takes as many rows as fit (blockDim.y), so that
// no thread idles where d_in / VEC is not a multiple of 256: d_in = 768 is 96 threads
// per row in bf16 (2 rows per block), 192 in fp32 (1 row). Grid-stride over rows, grid
// capped at 2^16 blocks. The k (weight, index) pairs of a row are the same for all its
// threads, so they are broadcast loads served from L1. (The slot loop is not unrolled
// by hand: issuing 4 rows' loads before their sums made ptxas spill registers.)
// Memory traffic: reads k * d_in table elements per row (the gathered rows; L2 reuse
// when features repeat across rows), 16k B of weights and indices, writes d_in
// elements: ~rows * k * d_in * sizeof(scalar_t) in all, the minimum for a gather-sum.
#include "common.cuh"

namespace switch_sae::cuda {
namespace {

// VEC consecutive elements moved as one 16-byte (or smaller) memory transaction.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// blockDim.x threads per group (row), blockDim.y groups per block.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    gather_sum_kernel(const scalar_t* __restrict__ weights, const scalar_t* __restrict__ mask,
                      const int64_t* __restrict__ index, const scalar_t* __restrict__ table,
                      scalar_t* __restrict__ out, int64_t n_groups, int64_t group,
                      int64_t n_table, int64_t d_in) {
  using acc = acc_t<scalar_t>;
  using pack = Pack<scalar_t, VEC>;
  bool out_of_range = false;  // asserted once at the end, away from the hot loop
  const int64_t group_stride = int64_t{gridDim.x} * blockDim.y;
  for (int64_t g = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; g < n_groups; g += group_stride) {
    const int64_t first = g * group, last = first + group;
    for (int64_t c = int64_t{threadIdx.x} * VEC; c < d_in; c += int64_t{blockDim.x} * VEC) {
      acc sum[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        sum[v] = acc(0);
      }
      for (int64_t s = first; s < last; ++s) {
        const int64_t f = index[s];
        if (f < 0 || f >= n_table) {
          out_of_range = true;
          continue;
        }
        const acc w = slot_weight(weights, mask, s);
        const pack row = *reinterpret_cast<const pack*>(table + f * d_in + c);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          sum[v] += w * static_cast<acc>(row.v[v]);
        }
      }
      pack result;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        result.v[v] = static_cast<scalar_t>(sum[v]);
      }
      *reinterpret_cast<pack*>(out + g * d_in + c) = result;
    }
  }
  CUDA_KERNEL_ASSERT_MSG(!out_of_range,
                         "switch_sae: indices out of range [0, d_sae) (rows of W_dec, or of "
                         "W_enc viewed as [d_sae, d_in])");
}

template <typename scalar_t, int VEC>
void launch_gather_sum(at::Tensor& out, const at::Tensor& weights, const at::Tensor& mask,
                       const at::Tensor& index, const at::Tensor& table, int64_t group) {
  const int64_t n_groups = out.size(0), d_in = table.size(1);
  // Threads per row: its VEC-wide columns rounded up to a warp, at most one block.
  const int64_t columns = (d_in + VEC - 1) / VEC;
  const int threads_per_row =
      static_cast<int>(std::min<int64_t>(kThreads, (columns + kWarp - 1) / kWarp * kWarp));
  const int rows_per_block = kThreads / threads_per_row;
  const dim3 block(threads_per_row, rows_per_block);
  gather_sum_kernel<scalar_t, VEC>
      <<<grid_for(n_groups, rows_per_block), block, 0, c10::cuda::getCurrentCUDAStream()>>>(
          weights.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<scalar_t>() : nullptr,
          index.data_ptr<int64_t>(), table.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          n_groups, group, table.size(0), d_in);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool is_aligned(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

at::Tensor decode_cuda(const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& W_dec) {
  check_decode_args(values, indices, W_dec);
  const c10::cuda::CUDAGuard guard(values.device());
  auto out = at::empty({values.size(0), W_dec.size(1)}, values.options());  // [rows, d_in]
  gather_sum_out(out, values, at::Tensor(), indices, W_dec, /*group=*/values.size(1));
  return out;
}

}  // namespace

void gather_sum_out(at::Tensor& out, const at::Tensor& weights, const at::Tensor& mask,
                    const at::Tensor& index, const at::Tensor& table, int64_t group) {
  const int64_t d_in = table.size(1);
  if (out.numel() == 0) {
    return;  // no rows or no columns: nothing to launch (an empty grid is an error)
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, table.scalar_type(), "switch_sae_gather_sum", [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const int64_t vec_bytes = int64_t{kVec} * sizeof(scalar_t);
        if (d_in % kVec == 0 && is_aligned(table, vec_bytes) && is_aligned(out, vec_bytes)) {
          launch_gather_sum<scalar_t, kVec>(out, weights, mask, index, table, group);
        } else {
          launch_gather_sum<scalar_t, 1>(out, weights, mask, index, table, group);
        }
      });
}

}  // namespace switch_sae::cuda

TORCH_LIBRARY_IMPL(switch_sae, CUDA, m) { m.impl("decode", &switch_sae::cuda::decode_cuda); }
