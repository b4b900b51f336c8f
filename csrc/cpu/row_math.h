// Row arithmetic shared by the CPU gather-sum kernels (decode, decode_backward,
// encode_backward): accumulate scaled rows, dot products, and the final cast.
//
// Accumulation is in at::opmath_type<scalar_t>: float for bfloat16/float16, the type
// itself for float32/float64. Loops are plain so the compiler vectorises them; every sum
// runs in a fixed order, so results are bitwise reproducible run to run and independent
// of the thread count.
//
// ISA: the extension is compiled for the baseline x86-64 ISA (SSE2) so that one build
// runs on any CPU. with_best_isa(fn) runs fn compiled a second time for AVX2+FMA when
// the CPU has them (about 1.5x faster on these gather-sums). Results may then differ in
// the last bits from a machine without AVX2 (fused multiply-add), never run to run.
#pragma once
#include <ATen/OpMathType.h>

#include <cstdint>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace switch_sae::cpu {

#if defined(__GNUC__) && defined(__x86_64__)
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// flatten inlines everything fn calls, so the whole body is compiled for AVX2+FMA.
template <typename Fn>
__attribute__((target("avx2,fma"), flatten)) void call_avx2_fma(const Fn& fn) {
  fn();
}
#endif

// Runs fn() in its fastest compiled form for this CPU.
template <typename Fn>
inline void with_best_isa(const Fn& fn) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (cpu_has_avx2_fma()) {
    call_avx2_fma(fn);
    return;
  }
#endif
  fn();
}

// acc[0:n] += scale * row[0:n]
template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* __restrict__ acc, acc_t scale, const scalar_t* __restrict__ row,
                 int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    acc[d] += scale * static_cast<acc_t>(row[d]);
  }
}

// Partial sums of dot(): 32 lanes are four independent AVX2 (two AVX-512) accumulators,
// so the adds overlap instead of waiting on one register's latency (with a single
// accumulator a 512-long dot is latency-bound, not bandwidth-bound).
constexpr int64_t kDotLanes = 32;

// <a, b> accumulated in acc_t. kDotLanes independent partial sums let the compiler
// vectorise the reduction without -ffast-math, in an order fixed by n alone.
template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  acc_t partial[kDotLanes] = {};
  int64_t d = 0;
  for (; d + kDotLanes <= n; d += kDotLanes) {
    for (int64_t l = 0; l < kDotLanes; ++l) {
      partial[l] += static_cast<acc_t>(a[d + l]) * static_cast<acc_t>(b[d + l]);
    }
  }
  acc_t sum = 0;
  for (int64_t l = 0; l < kDotLanes; ++l) {
    sum += partial[l];
  }
  for (; d < n; ++d) {
    sum += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  }
  return sum;
}

// Hints the CPU to start loading bytes [p, p + n_bytes) into cache. The gather-sums
// read rows at addresses known ahead (from the indices) but random to the hardware
// prefetcher, so without this each row's first lines wait a full memory latency.
inline void prefetch(const void* p, int64_t n_bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < n_bytes; b += 64) {
    __builtin_prefetch(c + b);
  }
}

// out[0:n] = acc[0:n], rounded to the output type.
template <typename scalar_t, typename acc_t>
inline void store(scalar_t* __restrict__ out, const acc_t* __restrict__ acc, int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    out[d] = static_cast<scalar_t>(acc[d]);
  }
}

// store() for rows written once and not read again by the op (the per-feature gradient
// rows, d_sae * d_in in all): float32 rows go out with non-temporal stores, which skip
// reading each line into cache before overwriting it (a third of such a row's memory
// traffic). Other types, or a row not 16-byte aligned, use store(). Call stream_fence()
// before the thread's streamed rows may be read.
template <typename scalar_t, typename acc_t>
inline void store_streaming(scalar_t* __restrict__ out, const acc_t* __restrict__ acc, int64_t n) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (reinterpret_cast<uintptr_t>(out) % 16 == 0) {
      int64_t d = 0;
      for (; d + 4 <= n; d += 4) {
        _mm_stream_ps(out + d, _mm_loadu_ps(acc + d));
      }
      for (; d < n; ++d) {
        out[d] = acc[d];
      }
      return;
    }
  }
#endif
  store<scalar_t, acc_t>(out, acc, n);
}

// Orders this thread's streamed stores before its later stores (and its chunk's end).
inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace switch_sae::cpu
