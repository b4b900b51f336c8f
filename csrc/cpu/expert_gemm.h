// The encoder GEMM of one (expert, tile) item for float32 on CPUs with AVX-512F:
// pre[n, m] = x[n, K] . W[m, K]^T (+ bias[m]), where W holds one expert's encoder rows.
//
// Why not ATen's GEMM: a routed tile is small (about 64 tokens at 64 experts) while its
// expert's weights (m x K, 2 MiB at 1024 x 512) are new to the cache. A BLAS GEMM first
// copies ("packs") those weights into its own layout, then uses them for those few rows
// only; and MKL, torch's CPU BLAS, runs its AVX2 code path on AMD CPUs. This kernel
// reads W where it lies: each 4 x 4 block of pre is 16 dot products over K, 16 AVX-512
// accumulators fed by 4 rows of x and 4 rows of W, summed across lanes at the end.
//
// Every pre[i, j] is computed the same way whatever the shapes, the blocking or the
// thread count (lanes accumulate k = l mod 16 in order, then one fixed summation tree),
// so results are bitwise reproducible and independent of how the rows and features are
// split. They differ in the last bits from a BLAS GEMM's.
#pragma once
#include <cstdint>

namespace switch_sae::cpu {

// Whether expert_gemm can run on this CPU (x86-64 with AVX-512F).
bool expert_gemm_available();

// pre[i * ld_pre + j] = bias[j] + sum_k x[i * ld_x + k] * W[j * ld_w + k] for i < n and
// features j in [first, last); bias may be null (no bias). Requires
// expert_gemm_available().
void expert_gemm(const float* x, int64_t ld_x, const float* W, int64_t ld_w, const float* bias,
                 float* pre, int64_t ld_pre, int64_t n, int64_t first, int64_t last, int64_t K);

}  // namespace switch_sae::cpu
