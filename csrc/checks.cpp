// Per-op argument checks shared by the CPU and CUDA kernels: dtypes, devices,
// contiguity and the shape relations between arguments.
//
// Every product of sizes that a kernel later forms (rows = batch * n_active, rows * k,
// tile * d_in, d_sae = n_experts * d_expert, ...) is formed here first with checked_mul,
// so the kernels' own index arithmetic stays inside int64 without checks of its own.
//
// What it leaves out: anything that reads tensor data (expert ids, feature indices,
// offsets). Reading values would force a device-to-host sync on CUDA, so each
// backend checks value ranges inside its own kernels (and the order permutation check
// below is an asynchronous device assert there).
#include "checks.h"

#include <limits>

namespace switch_sae {

namespace {

void check_positive(int64_t value, const char* name) {
  TORCH_CHECK(value >= 1, "switch_sae: ", name, " must be >= 1, got ", value);
}

// Routing sends each token to n_active distinct experts.
void check_n_active(int64_t n_active, int64_t n_experts) {
  check_positive(n_active, "n_active");
  TORCH_CHECK(n_active <= n_experts, "switch_sae: n_active = ", n_active,
              " must be <= n_experts = W_enc.size(0) = ", n_experts,
              ": each token goes to n_active distinct experts");
}

}  // namespace

void check_dispatch_args(const at::Tensor& experts, int64_t n_experts) {
  check_tensor(experts, "experts", 1);
  check_index(experts, "experts");
  check_positive(n_experts, "n_experts");
  // Expert ids are sorted as int32 on CUDA; the bound also keeps n_experts + 1 in range.
  TORCH_CHECK(n_experts <= std::numeric_limits<int32_t>::max(), "switch_sae: n_experts = ",
              n_experts, " must be <= 2^31 - 1");
}

void check_encode_topk_args(const at::Tensor& x, const at::Tensor& W_enc,
                            const std::optional<at::Tensor>& b_enc, const at::Tensor& b_dec,
                            const at::Tensor& order, const at::Tensor& offsets, int64_t n_active,
                            int64_t k, int64_t tile_rows) {
  check_tensor(x, "x", 2);  // [batch, d_in]
  check_float(x, "x");
  check_tensor(W_enc, "W_enc", 3);  // [n_experts, d_expert, d_in]
  check_same_dtype(W_enc, x, "W_enc", "x");
  check_same_device(W_enc, x, "W_enc", "x");
  const int64_t n_experts = W_enc.size(0);
  const int64_t d_expert = W_enc.size(1);
  const int64_t d_in = x.size(1);
  check_positive(n_experts, "W_enc.size(0) (n_experts)");
  check_dim_size(W_enc, 2, d_in, "W_enc", "x.size(1) (d_in)");
  checked_mul(n_experts, d_expert, "d_sae = n_experts * d_expert");
  if (b_enc.has_value()) {
    check_tensor(*b_enc, "b_enc", 2);  // [n_experts, d_expert]
    check_same_dtype(*b_enc, x, "b_enc", "x");
    check_same_device(*b_enc, x, "b_enc", "x");
    check_dim_size(*b_enc, 0, n_experts, "b_enc", "W_enc.size(0) (n_experts)");
    check_dim_size(*b_enc, 1, d_expert, "b_enc", "W_enc.size(1) (d_expert)");
  }
  check_tensor(b_dec, "b_dec", 1);  // [d_in]
  check_same_dtype(b_dec, x, "b_dec", "x");
  check_same_device(b_dec, x, "b_dec", "x");
  check_dim_size(b_dec, 0, d_in, "b_dec", "x.size(1) (d_in)");
  check_n_active(n_active, n_experts);
  check_positive(k, "k");
  TORCH_CHECK(k <= d_expert, "switch_sae: k = ", k,
              " must be <= d_expert = W_enc.size(1) = ", d_expert,
              ": each expert must supply k features");
  check_positive(tile_rows, "tile_rows");
  const int64_t rows = checked_mul(x.size(0), n_active, "rows = batch * n_active");
  checked_mul(rows, k, "rows * k (elements of values and indices)");
  const int64_t tile = effective_tile_rows(tile_rows, rows);
  checked_mul(tile, d_in, "tile_rows * d_in (elements of an x tile)");
  checked_mul(tile, d_expert, "tile_rows * d_expert (elements of a pre-activation tile)");
  check_tensor(order, "order", 1);  // [rows]
  check_index(order, "order");
  check_same_device(order, x, "order", "x");
  check_dim_size(order, 0, rows, "order", "rows = batch * n_active");
  check_tensor(offsets, "offsets", 1);  // [n_experts + 1]
  check_index(offsets, "offsets");
  check_same_device(offsets, x, "offsets", "x");
  check_dim_size(offsets, 0, n_experts + 1, "offsets", "n_experts + 1");
}

void check_order_is_permutation(const at::Tensor& order) {
  const int64_t rows = order.size(0);
  if (rows == 0) {
    return;
  }
  // rows ids in [0, rows) are a permutation exactly when every id is seen. Clamped, so
  // an id out of range (which the kernels report) cannot index outside `seen`.
  at::Tensor seen = at::zeros({rows}, order.options().dtype(at::kBool));  // [rows]
  seen.index_fill_(0, order.clamp(0, rows - 1), true);
  at::_assert_async(seen.all(),
                    "switch_sae: order must be a permutation of [0, rows = batch * n_active), "
                    "as dispatch returns it: some pair id appears twice and another never");
}

void check_encode_backward_args(const at::Tensor& grad_values, const at::Tensor& values,
                                const at::Tensor& indices, const at::Tensor& x,
                                const at::Tensor& W_enc, const at::Tensor& b_dec,
                                int64_t n_active) {
  check_tensor(values, "values", 2);  // [rows, k]
  check_float(values, "values");
  check_tensor(grad_values, "grad_values", 2);
  check_same_dtype(grad_values, values, "grad_values", "values");
  check_same_device(grad_values, values, "grad_values", "values");
  TORCH_CHECK(grad_values.sizes() == values.sizes(), "switch_sae: grad_values has shape ",
              grad_values.sizes(), " but values has shape ", values.sizes(), "; they must match");
  check_tensor(indices, "indices", 2);
  check_index(indices, "indices");
  check_same_device(indices, values, "indices", "values");
  TORCH_CHECK(indices.sizes() == values.sizes(), "switch_sae: indices has shape ",
              indices.sizes(), " but values has shape ", values.sizes(), "; they must match");
  check_tensor(x, "x", 2);  // [batch, d_in]
  check_same_dtype(x, values, "x", "values");
  check_same_device(x, values, "x", "values");
  check_tensor(W_enc, "W_enc", 3);  // [n_experts, d_expert, d_in]
  check_same_dtype(W_enc, values, "W_enc", "values");
  check_same_device(W_enc, values, "W_enc", "values");
  check_dim_size(W_enc, 2, x.size(1), "W_enc", "x.size(1) (d_in)");
  checked_mul(W_enc.size(0), W_enc.size(1), "d_sae = n_experts * d_expert");
  check_n_active(n_active, W_enc.size(0));
  const int64_t rows = checked_mul(x.size(0), n_active, "rows = batch * n_active");
  check_dim_size(values, 0, rows, "values", "rows = batch * n_active");
  // Entries of one token: the kernels step through the code n_active * k at a time.
  checked_mul(n_active, values.size(1), "n_active * k (entries of one token)");
  check_tensor(b_dec, "b_dec", 1);  // [d_in]
  check_same_dtype(b_dec, values, "b_dec", "values");
  check_same_device(b_dec, values, "b_dec", "values");
  check_dim_size(b_dec, 0, x.size(1), "b_dec", "x.size(1) (d_in)");
}

void check_decode_args(const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& W_dec) {
  check_tensor(values, "values", 2);  // [rows, k]
  check_float(values, "values");
  check_tensor(indices, "indices", 2);
  check_index(indices, "indices");
  check_same_device(indices, values, "indices", "values");
  TORCH_CHECK(indices.sizes() == values.sizes(), "switch_sae: indices has shape ",
              indices.sizes(), " but values has shape ", values.sizes(), "; they must match");
  check_tensor(W_dec, "W_dec", 2);  // [d_sae, d_in]
  check_same_dtype(W_dec, values, "W_dec", "values");
  check_same_device(W_dec, values, "W_dec", "values");
  checked_mul(values.size(0), W_dec.size(1), "rows * d_in (elements of the output)");
}

void check_decode_backward_args(const at::Tensor& grad_out, const at::Tensor& values,
                                const at::Tensor& indices, const at::Tensor& W_dec) {
  check_decode_args(values, indices, W_dec);
  check_tensor(grad_out, "grad_out", 2);  // [rows, d_in]
  check_same_dtype(grad_out, values, "grad_out", "values");
  check_same_device(grad_out, values, "grad_out", "values");
  check_dim_size(grad_out, 0, values.size(0), "grad_out", "values.size(0) (rows)");
  check_dim_size(grad_out, 1, W_dec.size(1), "grad_out", "W_dec.size(1) (d_in)");
}

}  // namespace switch_sae
