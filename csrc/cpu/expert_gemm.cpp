// AVX-512F encoder GEMM for routed tiles; see expert_gemm.h.
#include "cpu/expert_gemm.h"

#include <algorithm>
#include <cstdlib>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define SWITCH_SAE_AVX512 1
#endif

namespace switch_sae::cpu {

#if SWITCH_SAE_AVX512
namespace {

// Rows of x and rows of W (features) per block of pre: 16 accumulators and 8 operand
// registers, within the 32 vector registers, at 2 loads per 4 multiply-adds.
constexpr int64_t kRows = 4;
constexpr int64_t kFeatures = 4;
// Features whose W rows (8 KiB each way at K = 512) stay in L1 while every row block of
// x passes over them; measured on Zen 5 with 1024 x 512 experts: 8 is fastest, 32 is
// 10-20% slower (W and x blocks no longer fit L1 together).
constexpr int64_t kFeatureBlock = 8;

#define SWITCH_SAE_AVX512_FN __attribute__((target("avx512f"), always_inline)) inline

// v[0..15] -> one vector whose lane i is the sum of v[i]'s 16 lanes: pairs of vectors are
// interleaved and added (4, then 2, then 1 sums per 128-bit lane), then the four 128-bit
// lanes are added, 45 instructions instead of 16 separate reductions' ~130.
SWITCH_SAE_AVX512_FN __m512 lane_sums(const __m512* v) {
  __m512 quad[4];  // quad[g], 128-bit lane q: partial sums of v[4g..4g+3] over lane q
  for (int g = 0; g < 4; ++g) {
    const __m512* w = v + 4 * g;
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    const __m512d a = _mm512_castps_pd(s01), b = _mm512_castps_pd(s23);
    quad[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  constexpr int kEven = _MM_SHUFFLE(2, 0, 2, 0), kOdd = _MM_SHUFFLE(3, 1, 3, 1);
  const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], kEven),
                                  _mm512_shuffle_f32x4(quad[0], quad[1], kOdd));
  const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], kEven),
                                  _mm512_shuffle_f32x4(quad[2], quad[3], kOdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, kEven), _mm512_shuffle_f32x4(lo, hi, kOdd));
}

// acc[kFeatures * r + f] += x[r][k:k+16] * w[f][k:k+16], lane by lane, for the lanes in mask.
SWITCH_SAE_AVX512_FN void multiply_add(__m512* acc, const float* const* x, const float* const* w, int64_t k,
                                       __mmask16 mask) {
  __m512 wv[kFeatures];
  for (int64_t f = 0; f < kFeatures; ++f) {
    wv[f] = _mm512_maskz_loadu_ps(mask, w[f] + k);
  }
  for (int64_t r = 0; r < kRows; ++r) {
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x[r] + k);
    for (int64_t f = 0; f < kFeatures; ++f) {
      acc[kFeatures * r + f] = _mm512_fmadd_ps(xv, wv[f], acc[kFeatures * r + f]);
    }
  }
}

// Lane kFeatures * r + f of the result: sum_k x[r][k] * w[f][k].
SWITCH_SAE_AVX512_FN __m512 block_dots(const float* const* x, const float* const* w, int64_t K) {
  __m512 acc[kRows * kFeatures];
  for (auto& a : acc) {
    a = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    multiply_add(acc, x, w, k, 0xFFFF);
  }
  if (k < K) {  // the tail lanes load zeros, which add nothing
    multiply_add(acc, x, w, k, static_cast<__mmask16>((1u << (K - k)) - 1));
  }
  return lane_sums(acc);
}

__attribute__((target("avx512f"))) void expert_gemm_avx512(const float* x, int64_t ld_x, const float* W,
                                                             int64_t ld_w, const float* bias, float* pre,
                                                             int64_t ld_pre, int64_t n, int64_t first,
                                                             int64_t last, int64_t K) {
  for (int64_t block = first; block < last; block += kFeatureBlock) {
    const int64_t block_end = std::min(last, block + kFeatureBlock);
    for (int64_t r0 = 0; r0 < n; r0 += kRows) {
      const int64_t rows = std::min(kRows, n - r0);
      // A short block repeats its last row (or feature) and stores only the real ones.
      const float* xr[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        xr[r] = x + (r0 + std::min(r, rows - 1)) * ld_x;
      }
      for (int64_t f0 = block; f0 < block_end; f0 += kFeatures) {
        const int64_t features = std::min(kFeatures, block_end - f0);
        const float* wf[kFeatures];
        alignas(16) float b[kFeatures];
        for (int64_t f = 0; f < kFeatures; ++f) {
          const int64_t j = f0 + std::min(f, features - 1);
          wf[f] = W + j * ld_w;
          b[f] = bias != nullptr ? bias[j] : 0.0f;
        }
        // + bias after the sum, as addmm's beta * bias + x W^T.
        const __m512 sums = _mm512_add_ps(block_dots(xr, wf, K), _mm512_broadcast_f32x4(_mm_load_ps(b)));
        alignas(64) float out[kRows * kFeatures];
        _mm512_store_ps(out, sums);
        for (int64_t r = 0; r < rows; ++r) {
          std::copy_n(out + kFeatures * r, features, pre + (r0 + r) * ld_pre + f0);
        }
      }
    }
  }
}

}  // namespace

bool expert_gemm_available() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

void expert_gemm(const float* x, int64_t ld_x, const float* W, int64_t ld_w, const float* bias,
                 float* pre, int64_t ld_pre, int64_t n, int64_t first, int64_t last, int64_t K) {
  expert_gemm_avx512(x, ld_x, W, ld_w, bias, pre, ld_pre, n, first, last, K);
}

#else

bool expert_gemm_available() { return false; }

// Unreachable: callers check expert_gemm_available() first.
void expert_gemm(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                 int64_t, int64_t, int64_t) {
  std::abort();
}

#endif

}  // namespace switch_sae::cpu
