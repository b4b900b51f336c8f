// madvise(MADV_HUGEPAGE) for large CPU buffers; see huge_pages.h.
#include "cpu/huge_pages.h"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace switch_sae::cpu {
namespace {

// Below this size glibc's malloc recycles freed buffers within its heap (its mmap
// threshold adapts up to 32 MiB), so they fault only once; measured here, huge pages
// made an 8 MiB output slower, not faster.
constexpr size_t kFreshMappingBytes = size_t{32} << 20;

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (t.nbytes() < kFreshMappingBytes) {
    return;
  }
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) / kHugePage * kHugePage;
  const uintptr_t last = (begin + t.nbytes()) / kHugePage * kHugePage;
  if (last > first) {
    // The result is ignored on purpose: a refused hint leaves 4 KiB pages, as before.
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
}

}  // namespace

at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

}  // namespace switch_sae::cpu
