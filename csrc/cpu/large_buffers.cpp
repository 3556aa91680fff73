// Large CPU buffers: a cache of released blocks, opt-in transparent huge pages, and glibc's thresholds.
//
// Why a cache: glibc serves every block above its mmap threshold (at most 32 MiB) with fresh pages, which the kernel
// faults in and zeroes on first touch, and unmaps again on free. A training step at T4096 H1024 F2816 E8 k2 makes a
// 184 MiB fp32 pre-activation and ~300 MiB of backward scratch and weight gradients, so every step paid the page
// faults anew, while the eager loop's per-expert blocks (< 32 MiB each) came back warm from glibc's heap: measured on
// this project's 2-core machine, our training forward ran 15-25% slower than eager's there while our no-grad forward
// (whose blocks are < 32 MiB) ran at its speed. Blocks released by our tensors now go back to this cache (by exact
// size, rounded up to 2 MiB) and the next call of the same shape reuses them.
//
// The profiler sees a block handed out as an allocation and a block returned as a free, with its alloc_size, like
// any CPU allocation (the running totals it is given are the cache's own).
#include "large_buffers.h"

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace h3fusion::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// glibc's largest mmap threshold (tune_malloc_once sets it): smaller blocks are reused from its heap already.
constexpr size_t kCachedBufferMinBytes = size_t(32) << 20;

// Transparent huge pages (MADV_HUGEPAGE) on the whole 2 MiB pages of [p, p + n): one fault per 2 MiB instead of per
// 4 KiB on first touch. Opt-in (H3FUSION_HUGEPAGES=1): with the kernel's default "madvise" defrag policy a madvised
// fault compacts memory synchronously when no free huge page is at hand, and on a machine up for hours that stalled
// the T4096 bf16 training forward from ~450 to ~700 ms. Speed must not depend on the state of the machine's memory.
void advise_huge(void* p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = std::getenv("H3FUSION_HUGEPAGES") != nullptr;  // read once
  const auto begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = (begin + n) & ~(kHugePage - 1);
  if (enabled && last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

size_t cache_capacity_bytes() {
  const char* env = std::getenv("H3FUSION_CPU_BUFFER_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(1024) << 20;
  long long mb = -1;
  try {
    size_t used = 0;
    mb = std::stoll(env, &used);
    if (used != std::string(env).size()) mb = -1;
  } catch (const std::exception&) {
  }
  TORCH_CHECK(mb >= 0, "H3FUSION_CPU_BUFFER_CACHE_MB must be a whole number of MiB >= 0, got '", env, "'");
  return static_cast<size_t>(mb) << 20;
}

class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache(cache_capacity_bytes());  // never destroyed: tensors may outlive exit
    return *cache;
  }

  size_t capacity() const { return capacity_; }

  // A block of exactly `bytes` (a multiple of 2 MiB): a cached one, else a new one.
  void* take(size_t bytes, bool huge) {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].bytes == bytes) {
          p = free_[i].ptr;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          cached_ -= bytes;
          break;
        }
    }
    if (p == nullptr) {
      p = std::aligned_alloc(kHugePage, bytes);
      if (p == nullptr) throw std::bad_alloc();
      if (huge) advise_huge(p, bytes);
    }
    std::lock_guard<std::mutex> lock(mu_);
    in_use_ += bytes;
    report(p, static_cast<int64_t>(bytes));
    return p;
  }

  // Back from a tensor: cached (the oldest blocks make room), or freed when it alone exceeds the capacity.
  void give(void* p, size_t bytes) {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use_ -= bytes;
      report(p, -static_cast<int64_t>(bytes));
      if (bytes > capacity_) {
        to_free.push_back(p);
      } else {
        while (cached_ + bytes > capacity_) {
          to_free.push_back(free_.front().ptr);
          cached_ -= free_.front().bytes;
          free_.erase(free_.begin());
        }
        free_.push_back({p, bytes});
        cached_ += bytes;
      }
    }
    for (void* q : to_free) std::free(q);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  explicit BlockCache(size_t capacity) : capacity_(capacity) {}

  // Called with mu_ held: what the CPU allocator tells the profiler about its own blocks.
  void report(void* p, int64_t delta) {
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(p, delta, in_use_, in_use_ + cached_, c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mu_;
  std::vector<Block> free_;
  size_t cached_ = 0, in_use_ = 0;
  const size_t capacity_;
};

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options, bool huge) {
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (nbytes < kCachedBufferMinBytes || !options.device().is_cpu() || BlockCache::get().capacity() == 0) {
    at::Tensor t = at::empty(sizes, options);
    if (huge && t.device().is_cpu()) advise_huge(t.data_ptr(), t.nbytes());
    return t;
  }
  const size_t bytes = (nbytes + kHugePage - 1) & ~(kHugePage - 1);
  void* p = BlockCache::get().take(bytes, huge);
  return at::from_blob(p, sizes, [bytes](void* q) { BlockCache::get().give(q, bytes); }, options);
}

void tune_malloc_once() {
  // Why speed used to depend on warm-up and on what ran before in the process: glibc serves blocks above a *dynamic*
  // threshold (128 KiB at start, raised to the size of every large block freed, up to 32 MiB) with fresh mmap'ed
  // pages that fault in on first touch, and returns freed heap tops to the OS above a trim threshold that moves with
  // it. So the first calls of a process paid page faults on every buffer, and later ones (or ones after another
  // implementation had freed big blocks) reused heap memory. Fixing both thresholds once, at the first call, makes
  // every call alike (blocks up to 32 MiB are reused from the heap from the start; larger ones come from the cache
  // above). Process-wide, like any allocator setting.
#if defined(__GLIBC__)
  static const bool done = [] {
    if (std::getenv("H3FUSION_NO_MALLOC_TUNING") == nullptr) {
      mallopt(M_MMAP_THRESHOLD, 32 << 20);
      mallopt(M_TRIM_THRESHOLD, 256 << 20);
    }
    return true;
  }();
  (void)done;
#endif
}

}  // namespace h3fusion::cpu
