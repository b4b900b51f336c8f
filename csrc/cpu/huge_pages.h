// Transparent huge pages for the large buffers the CPU kernels allocate and then write
// in full (the d_sae x d_in gradients, 128 MiB at 65536 x 512 float32).
//
// Why: a buffer above glibc's largest mmap threshold (32 MiB) comes from a fresh mapping
// on every call, and on Linux the first write to each 4 KiB page is a page fault in
// which the kernel zeroes the page: measured here, about 40 ms for 128 MiB, ten times the
// 4 ms it takes to write it. With 2 MiB pages there are 512 times fewer faults (the
// zeroing stays: about 5 ms for 128 MiB in all). ATen does the same for every
// allocation when THP_MEM_ALLOC_ENABLE=1 is set before torch starts; this applies it to
// the buffers where it matters, whatever the environment.
#pragma once
#include <torch/extension.h>

namespace switch_sae::cpu {

// at::empty(sizes, options), with the kernel asked to back its memory with transparent
// huge pages on first touch (madvise MADV_HUGEPAGE on the 2 MiB-aligned pages inside
// it). Only a hint: it changes no value, and does nothing below 32 MiB, off Linux, or
// where THP is disabled. For buffers the caller then writes in full.
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace switch_sae::cpu
