// switch_sae::encode_topk on CUDA, the routed encoder: for the pairs sorted by expert
// (order/offsets from dispatch), pre = (x[token] - b_dec) @ W_enc[e].T (+ b_enc[e]),
// then TopK(k), ReLU, global ids e * d_expert + local.
// CPU twin: csrc/cpu/encode_topk.cpp (same gather and centre, GEMM, bias, TopK rule,
// ReLU, scatter).
//
// Both GEMM paths walk tiles of tile_rows consecutive sorted positions, which may span
// several experts; per tile: gather, GEMM into the tile's pre-activations, then for
// k <= 32 one fused kernel (bias, one-pass warp TopK, ReLU, scatter), for larger k one
// bias kernel, one at::topk, one rank-and-scatter kernel. They differ only in the GEMM:
//   grouped (no host sync): one at::_grouped_mm per tile, with every tile's group ends
//     (offsets clamped to the tile, int32) computed on the device by one kernel per
//     call. Used where torch's fast CUTLASS kernel runs: bf16 on compute capability
//     9.x/10.x, n_experts < 1024, d_in % 8 == 0 and a 16-byte aligned W_enc (torch's
//     GroupedBlas.cpp and GroupMM.cu: anywhere else _grouped_mm copies offsets to the
//     host itself, once per call of it).
//   per expert (one host sync per call): offsets are copied to the host once, because
//     the GEMM shapes depend on them; then each expert that intersects the tile gets one
//     at::mm_out of its rows into the tile's shared pre-activation buffer. Used for
//     fp32 (the default training dtype: torch has no grouped fp32/TF32 GEMM without a
//     host sync), fp16, fp64, other GPUs, and whenever SWITCH_SAE_DISABLE_GROUPED_MM=1
//     (so GPU tests can run both paths on one device).
// Launches per call: 2 per tile for k <= 32 (gather, select), else 4 (gather, bias, TopK
// (one radix-select kernel for d_expert below ~10^4, a few above), scatter) plus, grouped, one GEMM per tile and one
// tile-ends kernel; per expert, one GEMM per (expert, tile) intersection, at most
// n_experts + n_tiles - 1 of them. Plus the routing check and two output fills.
// Either way at most tile_rows x d_expert pre-activations exist at once: no
// [rows, d_sae] (nor [rows, d_expert]) tensor is materialised.
//
// TopK rule (csrc/topk_rule.h, shared with the CPU kernel and reference.topk): larger
// values first, NaN above every number, equal values by lower index. at::topk's radix select keeps, of
// the values equal to the k-th, those of lowest index, but tells -0.0 from +0.0 and
// does not order ties; so the bias kernel turns -0.0 into +0.0 and the scatter kernel
// places each chosen value at its rank under the rule (at::topk runs unsorted).
//
// Kernels here (256 threads per block, grid-stride, grid capped at 2^16 blocks):
//   check_routing_kernel: 1 block; device asserts that offsets split [0, rows).
//   tile_ends_kernel: one thread per (tile, expert) (grouped path only).
//   gather_centered_kernel: one block per tile row, threads over d_in.
//   finish_preactivations_kernel: one block per tile row (pre may have a padded row
//     stride), threads over d_expert.
//   select_topk_kernel (k <= 32): one warp per tile row, 8 rows per block.
//   scatter_topk_kernel: one thread per element of the [n, k] TopK result; each ranks
//     its value among the row's k (O(k) compares, from L1).
// Memory traffic per tile of n rows: gather reads n * d_in x elements + n order ids and
// writes n * d_in; the GEMM reads the tile and d_expert * d_in W_enc elements per expert
// it spans, writes n * d_expert; for k <= 32 the fused selection reads n * d_expert once
// (plus the bias rows, from L2) and writes n * k values and ids. For larger k, TopK reads
// n * d_expert a few times (radix passes), bias reads/writes n * d_expert, scatter moves
// n * k values and ids (n * k^2 compares). In all about rows * (2 d_in + d_expert)
// elements for k <= 32 (rows * (2 d_in + ~4 d_expert) above) + (n_tiles + n_experts) *
// d_expert * d_in weights, against rows * d_expert * d_in multiply-adds.
#include "common.cuh"
#include "topk_rule.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace switch_sae::cuda {
namespace {

// offsets must split the rows sorted pairs into n_experts runs (the CPU checks the same
// with TORCH_CHECKs; here the data is on the device). Also run when rows == 0.
__global__ void check_routing_kernel(const int64_t* __restrict__ offsets, int64_t n_experts,
                                     int64_t rows) {
  if (threadIdx.x == 0) {
    CUDA_KERNEL_ASSERT_MSG(offsets[0] == 0 && offsets[n_experts] == rows,
                           "switch_sae: offsets must start at 0 and end at rows = batch * "
                           "n_active");
  }
  for (int64_t e = threadIdx.x; e < n_experts; e += blockDim.x) {
    CUDA_KERNEL_ASSERT_MSG(offsets[e] <= offsets[e + 1], "switch_sae: offsets must be non-decreasing");
  }
}

// ends[t, e] = offsets[e + 1] - t * tile_rows clamped to [0, rows in tile t], as int32:
// the group ends of tile t for at::_grouped_mm (experts before the tile end at 0, those
// after it start at its end, so both are empty groups). All tiles in one launch.
__global__ void __launch_bounds__(kThreads)
    tile_ends_kernel(const int64_t* __restrict__ offsets, int64_t n_experts, int64_t rows,
                     int64_t tile_rows, int64_t n_tiles, int32_t* __restrict__ ends) {
  const int64_t total = n_tiles * n_experts;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t t = i / n_experts;
    const int64_t start = t * tile_rows;
    const int64_t n = rows - start < tile_rows ? rows - start : tile_rows;
    const int64_t end = offsets[i - t * n_experts + 1] - start;
    ends[i] = static_cast<int32_t>(end < 0 ? 0 : (end > n ? n : end));
  }
}

// out [n, d_in] = x[order[start + r] / n_active] - b_dec, rounded to x's dtype as in the
// reference's (x - b_dec). One block per row: the pair id is a broadcast load.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gather_centered_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ b_dec,
                           const int64_t* __restrict__ order, int64_t start, int64_t n,
                           int64_t d_in, int64_t n_active, int64_t rows,
                           scalar_t* __restrict__ out) {
  using acc = acc_t<scalar_t>;
  bool out_of_range = false;  // asserted once at the end, away from the hot loop
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const int64_t pair = order[start + r];
    if (pair < 0 || pair >= rows) {
      out_of_range = true;
      continue;
    }
    const scalar_t* src = x + (pair / n_active) * d_in;
    for (int64_t c = threadIdx.x; c < d_in; c += blockDim.x) {
      out[r * d_in + c] = static_cast<scalar_t>(static_cast<acc>(src[c]) - static_cast<acc>(b_dec[c]));
    }
  }
  CUDA_KERNEL_ASSERT_MSG(!out_of_range,
                         "switch_sae: order out of range [0, rows = batch * n_active)");
}

// pre[r, :] += b_enc[expert of sorted position start + r] (if b_enc is given), rounded
// like ATen's add; then -0.0 becomes +0.0 (x + 0.0 changes nothing else), because
// at::topk's radix select would rank -0.0 below +0.0 where the TopK rule has them equal.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    finish_preactivations_kernel(scalar_t* __restrict__ pre, int64_t ld, int64_t n,
                                 int64_t d_expert, const scalar_t* __restrict__ b_enc,
                                 const int64_t* __restrict__ offsets, int64_t n_experts,
                                 int64_t start) {
  using acc = acc_t<scalar_t>;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    // Every thread finds the same expert: broadcast loads, log2(n_experts) of them.
    const scalar_t* bias =
        b_enc == nullptr ? nullptr : b_enc + expert_of_position(offsets, n_experts, start + r) * d_expert;
    for (int64_t c = threadIdx.x; c < d_expert; c += blockDim.x) {
      scalar_t& p = pre[r * ld + c];
      acc v = static_cast<acc>(p);
      if (bias != nullptr) {
        v = static_cast<acc>(static_cast<scalar_t>(v + static_cast<acc>(bias[c])));
      }
      p = static_cast<scalar_t>(v + acc(0));
    }
  }
}

// For the unsorted TopK (top_values, top_local [n, k]) of sorted positions
// [start, start + n): values[pair, rank] = relu(v), indices[pair, rank] = e * d_expert +
// local, for pair = order[start + r], e its expert and rank the place of (v, local)
// among the row's k under the TopK rule.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scatter_topk_kernel(const scalar_t* __restrict__ top_values,
                        const int64_t* __restrict__ top_local, const int64_t* __restrict__ order,
                        const int64_t* __restrict__ offsets, int64_t n_experts, int64_t d_expert,
                        int64_t start, int64_t n, int64_t k, int64_t rows,
                        scalar_t* __restrict__ values, int64_t* __restrict__ indices) {
  using acc = acc_t<scalar_t>;
  const int64_t total = n * k;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / k;
    const int64_t pair = order[start + r];
    if (pair < 0 || pair >= rows) {
      continue;  // already asserted by gather_centered_kernel
    }
    const scalar_t v = top_values[i];
    const int64_t local = top_local[i];
    int64_t rank = 0;
    for (int64_t q = r * k; q < (r + 1) * k; ++q) {
      rank += topk_precedes(static_cast<acc>(top_values[q]), top_local[q], static_cast<acc>(v), local);
    }
    const int64_t e = expert_of_position(offsets, n_experts, start + r);
    // v < 0 rather than !(v > 0): a NaN stays NaN, as with torch.relu.
    values[pair * k + rank] = static_cast<acc>(v) < 0 ? scalar_t(0) : v;
    indices[pair * k + rank] = e * d_expert + local;
  }
}

// The TopK of k <= 32 in one pass over a tile's pre-activations, fused with the bias,
// ReLU and scatter (the GPU form of the CPU kernel's streaming selection,
// csrc/cpu/topk_select.h). One warp per tile row: lane j holds the j-th best
// (value, local id) so far, sorted by the TopK rule. The row is read 32 features at a
// time; one ballot finds the features that beat the current k-th best, and each such
// feature (in id order) is inserted with a ballot for its place and one shuffle that
// moves the entries after it down a lane. On random rows about k * ln(d_expert / k)
// features are ever inserted, so the pass costs about one coalesced read of the row.
// (-inf, INT64_MAX) fills the list at first: every feature, -inf included, precedes it.
// Then values[pair, j] = ReLU(j-th value) (NaN stays NaN, -0.0 becomes +0.0, as on the
// CPU), indices[pair, j] = e * d_expert + its id, for pair = order[start + r].
constexpr int64_t kMaxWarpTopk = kWarp;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    select_topk_kernel(const scalar_t* __restrict__ pre, int64_t ld, int64_t n, int64_t d_expert,
                       const scalar_t* __restrict__ b_enc, const int64_t* __restrict__ order,
                       const int64_t* __restrict__ offsets, int64_t n_experts, int64_t start,
                       int64_t k, int64_t rows, scalar_t* __restrict__ values,
                       int64_t* __restrict__ indices) {
  using acc = acc_t<scalar_t>;
  constexpr unsigned int kAll = 0xffffffffu;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t n_warps = int64_t{gridDim.x} * warps_per_block;
  for (int64_t r = int64_t{blockIdx.x} * warps_per_block + threadIdx.x / kWarp; r < n; r += n_warps) {
    const int64_t e = expert_of_position(offsets, n_experts, start + r);
    const scalar_t* row = pre + r * ld;
    const scalar_t* bias = b_enc == nullptr ? nullptr : b_enc + e * d_expert;
    acc held_v = static_cast<acc>(-INFINITY);  // this lane's entry of the sorted list
    int64_t held_id = INT64_MAX;
    acc bar_v = held_v;  // the k-th best so far (lane k - 1's entry), warp-uniform
    int64_t bar_id = held_id;
    for (int64_t base = 0; base < d_expert; base += kWarp) {  // warp-uniform bounds
      const int64_t c = base + lane;
      acc v = acc(0);
      bool beats = false;
      if (c < d_expert) {
        v = static_cast<acc>(row[c]);
        if (bias != nullptr) {
          // Rounded to scalar_t like the reference's pre + b_enc[e].
          v = static_cast<acc>(static_cast<scalar_t>(v + static_cast<acc>(bias[c])));
        }
        beats = topk_precedes(v, c, bar_v, bar_id);
      }
      for (unsigned int pending = __ballot_sync(kAll, beats); pending != 0; pending &= pending - 1) {
        const int src = __ffs(pending) - 1;
        const acc cand_v = __shfl_sync(kAll, v, src);
        const int64_t cand_id = base + src;
        // Re-tested against the bar raised by this chunk's earlier insertions (uniform).
        if (!topk_precedes(cand_v, cand_id, bar_v, bar_id)) {
          continue;
        }
        const bool before = lane < k && topk_precedes(held_v, held_id, cand_v, cand_id);
        const int place = __popc(__ballot_sync(kAll, before));  // < k: it beats the bar
        const acc up_v = __shfl_up_sync(kAll, held_v, 1);
        const int64_t up_id = __shfl_up_sync(kAll, held_id, 1);
        if (lane == place) {
          held_v = cand_v;
          held_id = cand_id;
        } else if (lane > place) {
          held_v = up_v;
          held_id = up_id;
        }
        bar_v = __shfl_sync(kAll, held_v, static_cast<int>(k - 1));
        bar_id = __shfl_sync(kAll, held_id, static_cast<int>(k - 1));
      }
    }
    const int64_t pair = order[start + r];
    if (lane < k && pair >= 0 && pair < rows) {  // a bad pair is asserted by the gather
      values[pair * k + lane] = held_v > acc(0) || held_v != held_v ? static_cast<scalar_t>(held_v) : scalar_t(0);
      indices[pair * k + lane] = e * d_expert + held_id;
    }
  }
}

// Everything encode_topk needs, so the two GEMM paths share one tile loop.
struct EncodeArgs {
  const at::Tensor& x;                  // [batch, d_in]
  const at::Tensor& W_enc;              // [n_experts, d_expert, d_in]
  const std::optional<at::Tensor>& b_enc;  // [n_experts, d_expert] or None
  const at::Tensor& b_dec;              // [d_in]
  const at::Tensor& order;              // [rows]
  const at::Tensor& offsets;            // [n_experts + 1]
  int64_t n_active, k, tile_rows;
  at::Tensor values;                    // [rows, k] output
  at::Tensor indices;                   // [rows, k] output
};

// x_tile [n, d_in] <- centred x rows of sorted positions [start, start + n).
void gather_centered(const EncodeArgs& a, at::Tensor& x_tile, int64_t start) {
  const int64_t n = x_tile.size(0), d_in = x_tile.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.x.scalar_type(), "switch_sae_gather_centered", [&] {
        gather_centered_kernel<scalar_t>
            <<<grid_for(n, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                a.x.data_ptr<scalar_t>(), a.b_dec.data_ptr<scalar_t>(),
                a.order.data_ptr<int64_t>(), start, n, d_in, a.n_active, a.order.size(0),
                x_tile.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// pre [n, d_expert] (unit column stride, any row stride) of sorted positions
// [start, start + n) -> bias, TopK, ReLU, scatter into a.values / a.indices.
void finish_tile(const EncodeArgs& a, at::Tensor& pre, int64_t start) {
  const int64_t n = pre.size(0), d_expert = pre.size(1);
  const int64_t n_experts = a.W_enc.size(0);
  TORCH_INTERNAL_ASSERT(pre.stride(1) == 1, "switch_sae: GEMM output must have unit column stride");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (a.k <= kMaxWarpTopk) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, pre.scalar_type(), "switch_sae_select_topk", [&] {
          select_topk_kernel<scalar_t><<<grid_for(n, kThreads / kWarp), kThreads, 0, stream>>>(
              pre.data_ptr<scalar_t>(), pre.stride(0), n, d_expert,
              a.b_enc.has_value() ? a.b_enc->data_ptr<scalar_t>() : nullptr,
              a.order.data_ptr<int64_t>(), a.offsets.data_ptr<int64_t>(), n_experts, start, a.k,
              a.order.size(0), a.values.data_ptr<scalar_t>(), a.indices.data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    return;
  }
  // k > 32: bias, at::topk's radix select, rank and scatter.
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, pre.scalar_type(), "switch_sae_finish_preactivations", [&] {
        finish_preactivations_kernel<scalar_t><<<grid_for(n, 1), kThreads, 0, stream>>>(
            pre.data_ptr<scalar_t>(), pre.stride(0), n, d_expert,
            a.b_enc.has_value() ? a.b_enc->data_ptr<scalar_t>() : nullptr,
            a.offsets.data_ptr<int64_t>(), n_experts, start);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  // Unsorted: the scatter kernel orders the k by the TopK rule itself.
  const auto [top_values, top_local] =
      at::topk(pre, a.k, /*dim=*/1, /*largest=*/true, /*sorted=*/false);  // [n, k] each
  const auto top_v = top_values.contiguous();
  const auto top_i = top_local.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, pre.scalar_type(), "switch_sae_scatter_topk", [&] {
        scatter_topk_kernel<scalar_t><<<grid_for(n * a.k, kThreads), kThreads, 0, stream>>>(
            top_v.data_ptr<scalar_t>(), top_i.data_ptr<int64_t>(), a.order.data_ptr<int64_t>(),
            a.offsets.data_ptr<int64_t>(), n_experts, d_expert, start, n, a.k, a.order.size(0),
            a.values.data_ptr<scalar_t>(), a.indices.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// Whether at::_grouped_mm would take its fast, sync-free CUTLASS path for these inputs
// (its conditions in torch 2.10-2.14); otherwise it loops over groups with offsets
// copied to the host, and our per-expert path does the same with one copy per call.
bool grouped_mm_is_fast(const at::Tensor& x, const at::Tensor& W_enc) {
  const char* disabled = std::getenv("SWITCH_SAE_DISABLE_GROUPED_MM");
  if (disabled != nullptr && std::string(disabled) == "1") {
    return false;
  }
  if (x.scalar_type() != at::kBFloat16) {
    return false;
  }
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                        x.device().index()));
  const bool sm9x_or_sm10x = major == 9 || major == 10;
  const bool aligned = reinterpret_cast<uintptr_t>(W_enc.data_ptr()) % 16 == 0;
  return sm9x_or_sm10x && W_enc.size(0) < 1024 && x.size(1) % 8 == 0 && aligned;
}

// Runs the tiles of tile_rows sorted positions: gather, gemm(x_tile, start, tile) ->
// pre-activations [n, d_expert] (unit column stride), finish_tile.
template <typename Gemm>
void encode_tiles(const EncodeArgs& a, const Gemm& gemm) {
  const int64_t rows = a.order.size(0), d_in = a.x.size(1);
  auto x_buffer = at::empty({std::min(a.tile_rows, rows), d_in}, a.x.options());
  for (int64_t start = 0, tile = 0; start < rows; start += a.tile_rows, ++tile) {
    auto x_tile = x_buffer.narrow(0, 0, std::min(a.tile_rows, rows - start));  // [n, d_in]
    gather_centered(a, x_tile, start);
    auto pre = gemm(x_tile, start, tile);
    finish_tile(a, pre, start);
  }
}

void encode_grouped(const EncodeArgs& a) {
  const int64_t rows = a.order.size(0), n_experts = a.W_enc.size(0);
  const int64_t n_tiles = (rows + a.tile_rows - 1) / a.tile_rows;
  const auto W_t = a.W_enc.transpose(1, 2);  // [n_experts, d_in, d_expert], column-major
  auto tile_ends = at::empty({n_tiles, n_experts}, a.offsets.options().dtype(at::kInt));
  tile_ends_kernel<<<grid_for(n_tiles * n_experts, kThreads), kThreads, 0,
                     c10::cuda::getCurrentCUDAStream()>>>(
      a.offsets.data_ptr<int64_t>(), n_experts, rows, a.tile_rows, n_tiles,
      tile_ends.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  encode_tiles(a, [&](const at::Tensor& x_tile, int64_t /*start*/, int64_t tile) {
    // [n, d_expert], padded row stride
    return at::_grouped_mm(x_tile, W_t, tile_ends.select(0, tile));
  });
}

void encode_per_expert(const EncodeArgs& a) {
  const int64_t rows = a.order.size(0), n_experts = a.W_enc.size(0);
  const int64_t d_expert = a.W_enc.size(1);
  // Known host sync point (once per call): the per-expert row counts decide the GEMM
  // shapes. Bounds are clamped to [0, rows] so bad offsets cannot make us read outside
  // order; check_routing_kernel has already asserted on them.
  const auto offsets_host = a.offsets.to(at::kCPU);
  const int64_t* off = offsets_host.data_ptr<int64_t>();
  std::vector<int64_t> bound(n_experts + 1);  // clamped, non-decreasing offsets
  for (int64_t e = 0; e <= n_experts; ++e) {
    bound[e] = std::clamp<int64_t>(off[e], e == 0 ? 0 : bound[e - 1], rows);
  }
  auto pre_buffer = at::empty({std::min(a.tile_rows, rows), d_expert}, a.x.options());
  int64_t first = 0;  // first expert that may intersect the current tile
  encode_tiles(a, [&](const at::Tensor& x_tile, int64_t start, int64_t /*tile*/) {
    const int64_t end = start + x_tile.size(0);
    auto pre = pre_buffer.narrow(0, 0, x_tile.size(0));  // [n, d_expert], contiguous
    while (first < n_experts && bound[first + 1] <= start) {
      ++first;
    }
    for (int64_t e = first; e < n_experts && bound[e] < end; ++e) {
      const int64_t lo = std::max(bound[e], start), hi = std::min(bound[e + 1], end);
      if (lo < hi) {  // rows [lo, hi) of the tile belong to expert e
        auto out = pre.narrow(0, lo - start, hi - lo);  // contiguous rows
        at::mm_out(out, x_tile.narrow(0, lo - start, hi - lo), a.W_enc[e].t());
      }
    }
    return pre;
  });
}

std::tuple<at::Tensor, at::Tensor> encode_topk_cuda(const at::Tensor& x, const at::Tensor& W_enc,
                                                    const std::optional<at::Tensor>& b_enc,
                                                    const at::Tensor& b_dec,
                                                    const at::Tensor& order,
                                                    const at::Tensor& offsets, int64_t n_active,
                                                    int64_t k, int64_t tile_rows) {
  check_encode_topk_args(x, W_enc, b_enc, b_dec, order, offsets, n_active, k, tile_rows);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = order.size(0);
  // Offsets are checked first, also when there are no rows, as on the CPU.
  check_routing_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      offsets.data_ptr<int64_t>(), W_enc.size(0), rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Zeros, as on the CPU, so a pair that no expert covers (a bad order) reads as empty.
  EncodeArgs a{x,        W_enc,     b_enc,
               b_dec,    order,     offsets,
               n_active, k,         effective_tile_rows(tile_rows, rows),
               at::zeros({rows, k}, x.options()), at::zeros({rows, k}, order.options())};
  if (rows == 0) {
    return {a.values, a.indices};
  }
  check_order_is_permutation(order);
  if (grouped_mm_is_fast(x, W_enc)) {
    encode_grouped(a);
  } else {
    encode_per_expert(a);
  }
  return {a.values, a.indices};
}

}  // namespace
}  // namespace switch_sae::cuda

TORCH_LIBRARY_IMPL(switch_sae, CUDA, m) {
  m.impl("encode_topk", &switch_sae::cuda::encode_topk_cuda);
}
