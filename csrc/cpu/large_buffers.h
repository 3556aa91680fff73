// Large CPU buffers of the MoE ops (the pre-activation saved for the backward, scratch, weight gradients): where they
// come from, and the process-wide allocator settings that keep every call alike. See large_buffers.cpp for why.
#pragma once

#include <ATen/core/Tensor.h>

namespace h3fusion::cpu {

// An uninitialised CPU tensor. Buffers of 32 MiB or more come from a small process-wide cache of blocks that earlier
// calls' tensors have released (so the kernel does not fault in and zero their pages again on every call), holding at
// most H3FUSION_CPU_BUFFER_CACHE_MB in all (default 1024; 0 turns the cache off). `huge` marks callers that fill the
// buffer in order from one place (serial mode): they get transparent huge pages when H3FUSION_HUGEPAGES=1.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options, bool huge);

// Fixes glibc's mmap and trim thresholds at the first call (H3FUSION_NO_MALLOC_TUNING=1 leaves them alone).
void tune_malloc_once();

}  // namespace h3fusion::cpu
