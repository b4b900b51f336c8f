// The switch_sae ops under torch.autocast: they run in their inputs' dtype, on every
// device, with autocast switched off for everything they call.
//
// Why a kernel is needed at all: a custom op has no Autocast kernel of its own, and the
// Autocast keys' fallthrough passes the call on without excluding them. The ATen calls
// made inside our kernels (at::mm, at::_grouped_mm, at::topk, ...) would then be
// autocast themselves: under torch.autocast("cuda", torch.bfloat16) with fp32 weights an
// inner at::mm returns bf16 while the op's other tensors are fp32. Excluding the autocast
// keys here, once for every op and device, makes every nested call (present and future)
// run in the dtype the kernel chose, instead of relying on each call being an out=
// variant, which autocast happens to leave alone.
//
// What it leaves out: casting. Inputs are never cast (mixed-dtype inputs are rejected by
// the shared checks); the trainer keeps master weights and activations in one dtype.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace switch_sae {
namespace {

// Runs the op below the Autocast keys, with every autocast key excluded for the calls it
// makes.
void without_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                      torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // AutocastCPU is the lowest-priority autocast key: FULL_AFTER it leaves none of them.
  const c10::DispatchKeySet below_autocast(c10::DispatchKeySet::FULL_AFTER,
                                           c10::DispatchKey::AutocastCPU);
  op.redispatchBoxed(keys & below_autocast, stack);
}

// Every op except with_cuda, which takes no tensor and so never sees an autocast key.
constexpr const char* kTensorOps[] = {"dispatch", "encode_topk", "encode_backward", "decode",
                                      "decode_backward"};

void register_without_autocast(torch::Library& m) {
  for (const char* name : kTensorOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
  }
}

}  // namespace
}  // namespace switch_sae

// The CUDA key is registered in CPU-only builds too: it is only a dispatcher entry.
TORCH_LIBRARY_IMPL(switch_sae, AutocastCPU, m) { switch_sae::register_without_autocast(m); }
TORCH_LIBRARY_IMPL(switch_sae, AutocastCUDA, m) { switch_sae::register_without_autocast(m); }
