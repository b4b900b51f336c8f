// Input checks shared by every backend, so CPU and CUDA reject the same inputs with
// the same messages. Every message names the argument it is about.
#pragma once
#include <c10/util/safe_numerics.h>
#include <torch/extension.h>

#include <algorithm>

namespace switch_sae {

inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.defined(), "switch_sae: ", name, " is undefined");
  TORCH_CHECK(t.dim() == dim, "switch_sae: ", name, " must have ", dim, " dimensions, got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "switch_sae: ", name,
              " must be contiguous (call .contiguous() first); got strides ", t.strides());
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "switch_sae: ", name,
              " must be a floating-point tensor (float32, float64, bfloat16 or float16), got ",
              t.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, "switch_sae: ", name, " must be int64, got ",
              t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "switch_sae: ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
              "; they must match");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "switch_sae: ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; they must be on the same device");
}

inline void check_dim_size(const at::Tensor& t, int64_t dim, int64_t size, const char* name,
                           const char* what) {
  TORCH_CHECK(t.size(dim) == size, "switch_sae: ", name, ".size(", dim, ") must equal ", what,
              " = ", size, ", got shape ", t.sizes());
}

// a * b for a size or an element count; a product that does not fit in int64 is an
// error naming `what` (it would wrap around and index outside the buffers).
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t product = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &product), "switch_sae: ", what, " = ", a, " * ", b,
              " does not fit in int64");
  return product;
}

// The tile height encode_topk's kernels use: a tile_rows above rows computes the same
// tiles, and clamping it keeps `start + tile_rows` from overflowing.
inline int64_t effective_tile_rows(int64_t tile_rows, int64_t rows) {
  return std::max<int64_t>(1, std::min(tile_rows, rows));
}

// ---- per-op argument checks (shape relations between arguments) ----

void check_dispatch_args(const at::Tensor& experts, int64_t n_experts);

void check_encode_topk_args(const at::Tensor& x, const at::Tensor& W_enc,
                            const std::optional<at::Tensor>& b_enc, const at::Tensor& b_dec,
                            const at::Tensor& order, const at::Tensor& offsets, int64_t n_active,
                            int64_t k, int64_t tile_rows);

// order [rows] (in range, as checked by each kernel) must be a permutation of [0, rows),
// or some output rows would be written twice and others never. Runs on order's device
// with ATen ops and an asynchronous assert: an error at once on CPU, a device-side assert
// at the next synchronisation on CUDA (no host sync). O(rows).
void check_order_is_permutation(const at::Tensor& order);

void check_encode_backward_args(const at::Tensor& grad_values, const at::Tensor& values,
                                const at::Tensor& indices, const at::Tensor& x,
                                const at::Tensor& W_enc, const at::Tensor& b_dec,
                                int64_t n_active);

void check_decode_args(const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& W_dec);

void check_decode_backward_args(const at::Tensor& grad_out, const at::Tensor& values,
                                const at::Tensor& indices, const at::Tensor& W_dec);

}  // namespace switch_sae
