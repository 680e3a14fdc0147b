// What the CPU layer driver asks of the machine: the CPU's vendor and family, the L2 cache's size, and how many
// CPUs the process may use. Internal (layer_loops.h).
#pragma once

#include <ATen/Parallel.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

namespace fusedrnn::cpu::loops {

// Whether the CPU is AMD's (or Hygon's, the same cores), from cpuid's vendor string.
inline bool cpu_is_amd() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool amd = [] {
    unsigned a, b, c, d;
    __asm__ __volatile__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
    char v[13];
    std::memcpy(v, &b, 4);
    std::memcpy(v + 4, &d, 4);
    std::memcpy(v + 8, &c, 4);
    v[12] = 0;
    return std::strcmp(v, "AuthenticAMD") == 0 || std::strcmp(v, "HygonGenuine") == 0;
  }();
  return amd;
#else
  return false;
#endif
}

// AMD's CPU family (cpuid leaf 1: base family, plus the extended family where the base is 0xF), 0 elsewhere.
// 0x19: Zen 3 and Zen 4 (AVX-512 as two 256-bit halves); 0x1A: Zen 5 (full 512-bit datapaths).
inline unsigned amd_family() {
#if defined(__x86_64__) || defined(_M_X64)
  static const unsigned fam = [] {
    if (!cpu_is_amd()) return 0u;
    unsigned a, b, c, d;
    __asm__ __volatile__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    const unsigned base = (a >> 8) & 0xF, ext = (a >> 20) & 0xFF;
    return base == 0xF ? base + ext : base;
  }();
  return fam;
#else
  return 0;
#endif
}

// Bytes of one core's L2 cache (as the OS reports it; 512 KiB where it does not).
inline int64_t l2_bytes() {
  static const int64_t l2 = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t(512) * 1024;
  }();
  return l2;
}

// Whether the batch-1 matrix-vector products (KernelTable::matvec_short) take 8 weight rows a block rather than
// 16 (AVX-512 float; each row of a block is a stream of W_hh from L2, and fewer streams run faster on an AMD
// Zen 4: a microbenchmark streamed a 512 KiB slice at 94-104 GB/s with 8 rows against 85-94 with 16). 2 threads,
// time 8 rows / 16, paired (benchmarks/knob_ab.py, 40 rounds): forward LSTM T100 B1 H256 0.90, H512 0.89, H128
// 0.975, H512 P128 0.91, GRU H256 0.94, RNN T200 H256 0.95; forward+backward (whose backward does not use it) LSTM
// H256 0.99, GRU 0.98. On an Intel Xeon with AMX (2 cores, 2 MiB of L2 each) too: the microbenchmark read a
// 512 KiB slice (K 256) in 3.40 us with 8 rows against 3.72 with 16 (a plain stream 2.76), and the modules,
// forward, 40 rounds, 8 / 16: LSTM T100 B1 H256 0.967-0.977, T400 0.959, H128 0.982, H512 0.990, H512 P128 0.968,
// GRU 0.947, RNN T200 0.955; forward+backward LSTM 0.989, H512 0.999, GRU 0.994. AMD Zen 5 (family 0x1A) was not
// measured and keeps 16 (its forward packs W_hh at batch 1-2 from 32 packed rows and runs the panels instead).
// FUSEDRNN_CPU_MATVEC_ROWS=8|16 overrides (tests run both).
inline bool short_matvec_blocks() {
  if (const char* e = std::getenv("FUSEDRNN_CPU_MATVEC_ROWS")) {
    if (std::strcmp(e, "8") == 0) return true;
    if (std::strcmp(e, "16") == 0) return false;
  }
  return !cpu_is_amd() || amd_family() == 0x19;
}

// CPUs this process can run on at once: its affinity mask, capped by a cgroup CPU quota where one is set (a
// container's --cpus: cgroup v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us), rounded up. Read once.
inline int64_t usable_cpus() {
  static const int64_t n = [] {
    int64_t c = 0;
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) c = CPU_COUNT(&set);
    auto cap = [&](int64_t quota, int64_t period) {
      if (quota > 0 && period > 0) c = std::min<int64_t>(c > 0 ? c : INT64_MAX, (quota + period - 1) / period);
    };
    std::string q;
    int64_t period = 0;
    if (std::ifstream f("/sys/fs/cgroup/cpu.max"); f >> q >> period) {
      if (q != "max") cap(std::atoll(q.c_str()), period);
    } else {
      std::ifstream fq("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), fp("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
      int64_t quota = 0;
      if (fq >> quota && fp >> period) cap(quota, period);
    }
#endif
    if (c <= 0) c = static_cast<int64_t>(std::thread::hardware_concurrency());
    return std::max<int64_t>(1, c);
  }();
  return n;
}

// Threads the persistent loops split into (slices or batch blocks that meet at a spin barrier every step, or a
// direction each): torch's intra-op threads, but no more than usable_cpus(). More than there are CPUs (torch set
// to 8 threads on 2 CPUs, or a container whose CPU quota is below the host's core count, which OpenMP and torch
// do not see) and every step waits for a descheduled thread: LSTM T100 B1 H256 forward took 19.6 ms at 8 threads
// on 2 CPUs against 2.1 ms at 2 (torch.nn 11.4 and 3.3). FUSEDRNN_CPU_THREADS=n overrides the CPU count (tests).
inline int64_t loop_threads() {
  int64_t cpus = usable_cpus();
  if (const char* e = std::getenv("FUSEDRNN_CPU_THREADS"); e && std::atoll(e) > 0) cpus = std::atoll(e);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), cpus));
}

}  // namespace fusedrnn::cpu::loops
