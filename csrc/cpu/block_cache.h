// A cache of CPU blocks for the layer's buffers of 64 KiB or more (the training forward's reserve and y, the
// backward's weight gradients and grad_x, the loops' workspaces and packed weights), which a training loop
// allocates at the same sizes at every step. glibc maps a block of 32 MiB or more afresh at every allocation (its
// largest mmap threshold) and returns it to the kernel when it is freed; smaller ones come from its heap, whose top
// it trims back to the kernel whenever more than its trim threshold lies free there, which a training step's frees
// do. Either way the kernel zeroes every page of a fresh mapping at first touch: at LSTM T500 B32 H128 (a 41 MB
// reserve) clear_page was 7.7% of a forward+backward's samples, at T100 B256 H512 (262 MB) 10%; at T100 B1 H256
// (1 MiB weight gradients, 0.5 MiB reserve) 130 page faults a step, 84% of them in the weight gradients' GEMMs, and
// the step 10-25% slower than with the blocks reused. A block that comes back here goes to the next request of
// about its size instead.
//
// The tensors are ordinary CPU tensors (resizable storage whose allocator is torch's CPU allocator; only their
// first block comes from here). Bounded: at most kCacheBlocks idle blocks and cache_limit() idle bytes, the least
// recently returned freed first; fusedrnn.cpu.empty_cache() frees the idle ones, FUSEDRNN_CPU_CACHE=0 (read at
// every call) bypasses the cache (blocks straight from the allocator, freed on return). Blocks are reported to the
// profiler as allocated while a tensor holds them and as freed when they come back, with the tensor's bytes, as
// torch's CPU allocator reports its own (a reused block may be up to a quarter larger, as a heap's chunk may be
// larger than asked for; the slack was held already, idle), so profiler-based memory figures count the buffers in
// use as they would without the cache. Internal.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "../common.h"

namespace fusedrnn::cpu {

constexpr size_t kCacheMinBytes = size_t(64) << 10;  // (below glibc's least trim threshold, 128 KiB)
constexpr size_t kCacheBlocks = 64;  // (a 4-layer bidirectional LSTM, T50 B4 H256: 30 idle between steps)

// Idle bytes the cache may hold: an eighth of the machine's memory, at most 2 GiB.
inline size_t cache_limit() {
  static const size_t limit = [] {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    const size_t phys = pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) : 0;
    return std::min(size_t(2) << 30, phys / 8);
  }();
  return limit;
}

inline bool block_cache_enabled() {
  const char* e = std::getenv("FUSEDRNN_CPU_CACHE");
  return !(e && std::strcmp(e, "0") == 0);
}

class BlockCache {
 public:
  // A contiguous CPU tensor of `size` whose storage starts on a block of at least its bytes (at most a quarter
  // more): an idle one, or a new one.
  at::Tensor empty(at::IntArrayRef size, const at::TensorOptions& options) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(size)) * options.dtype().itemsize();
    void* p = nullptr;
    size_t got = bytes;
    {
      std::lock_guard<std::mutex> g(m_);
      // The smallest fit, and of equal ones the most recently returned (the likeliest to be in the CPU's caches).
      size_t best = idle_.size();
      for (size_t i = idle_.size(); i-- > 0;) {
        const size_t s = idle_[i].bytes;
        if (s >= bytes && s - bytes <= bytes / 4 && (best == idle_.size() || s < idle_[best].bytes)) best = i;
      }
      if (best < idle_.size()) {
        p = idle_[best].ptr;
        got = idle_[best].bytes;
        live_[p] = {got, bytes};
        idle_bytes_ -= got;
        idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(best));
      }
    }
    if (!p) {
      p = c10::alloc_cpu(bytes);
      std::lock_guard<std::mutex> g(m_);
      live_[p] = {bytes, bytes};
    }
    report(p, static_cast<int64_t>(bytes));
    c10::DataPtr data(p, p, &BlockCache::release, c10::Device(c10::kCPU));
    auto storage = c10::make_intrusive<c10::StorageImpl>(c10::StorageImpl::use_byte_size_t(), bytes,
                                                         std::move(data), c10::GetCPUAllocator(), true);
    at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage),
                                                           c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                           options.dtype());
    t.unsafeGetTensorImpl()->set_sizes_contiguous(size);
    return t;
  }

  // Frees every idle block; returns their bytes.
  size_t clear() {
    std::vector<Block> drop;
    size_t n = 0;
    {
      std::lock_guard<std::mutex> g(m_);
      drop.swap(idle_);
      n = idle_bytes_;
      idle_bytes_ = 0;
    }
    for (const Block& b : drop) c10::free_cpu(b.ptr);
    return n;
  }

  // (idle bytes, idle blocks)
  std::pair<size_t, size_t> idle() {
    std::lock_guard<std::mutex> g(m_);
    return {idle_bytes_, idle_.size()};
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  static void release(void* p) { instance().give(p); }

  void give(void* p) {
    const bool keep = block_cache_enabled();
    std::vector<void*> drop;
    size_t bytes = 0, used = 0;
    {
      std::lock_guard<std::mutex> g(m_);
      auto it = live_.find(p);
      bytes = it->second.block;
      used = it->second.used;
      live_.erase(it);
      if (!keep || bytes > cache_limit()) {
        drop.push_back(p);
      } else {
        idle_.push_back({p, bytes});
        idle_bytes_ += bytes;
        while (idle_.size() > kCacheBlocks || idle_bytes_ > cache_limit()) {
          drop.push_back(idle_.front().ptr);
          idle_bytes_ -= idle_.front().bytes;
          idle_.erase(idle_.begin());
        }
      }
    }
    report(p, -static_cast<int64_t>(used));
    for (void* q : drop) c10::free_cpu(q);
  }

  void report(void* p, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    size_t used = 0, held = 0;
    {
      std::lock_guard<std::mutex> g(m_);
      for (const auto& kv : live_) {
        used += kv.second.used;
        held += kv.second.block;
      }
      held += idle_bytes_;
    }
    c10::reportMemoryUsageToProfiler(p, delta, used, held, c10::Device(c10::kCPU));
  }

  struct Live {
    size_t block;  // the block's bytes
    size_t used;   // the tensor's (what the profiler is told; a reused block may be up to a quarter larger)
  };

  std::mutex m_;
  std::vector<Block> idle_;  // oldest first
  std::unordered_map<void*, Live> live_;
  size_t idle_bytes_ = 0;

 public:
  static BlockCache& instance() {
    static BlockCache* cache = [] {
      auto* c = new BlockCache();  // never destroyed: tensors may give blocks back during exit
      // fork() while another thread holds the lock would leave the child's copy locked for good (a DataLoader
      // worker forked mid-call that then runs a layer would hang): the lock is taken around every fork.
      pthread_atfork([] { instance().m_.lock(); }, [] { instance().m_.unlock(); }, [] { instance().m_.unlock(); });
      return c;
    }();
    return *cache;
  }
};

// alloc() (common.h) through the cache for a CPU buffer of at least kCacheMinBytes (while FUSEDRNN_CPU_CACHE is
// not 0): for the layer's buffers, outputs and workspaces alike.
inline at::Tensor alloc_cached(at::IntArrayRef size, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(size)) * options.dtype().itemsize();
  if (bytes < kCacheMinBytes || !options.device().is_cpu() || !block_cache_enabled()) return alloc(size, options);
  return fresh_buffer(BlockCache::instance().empty(size, options));
}

}  // namespace fusedrnn::cpu
