// AVX2+FMA build of the vectorised kernels. setup.py compiles this one file with -mavx2 -mfma -mf16c (x86-64
// only); the driver calls into it only when at::get_cpu_capability() reports AVX2 or better, so a CPU without
// AVX2 never executes it. Built without those flags it provides no table.
#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
#else
namespace fusedrnn::cpu::AVX2 {
const KernelTable<float>* kernels_float() { return nullptr; }
const KernelTable<double>* kernels_double() { return nullptr; }
}  // namespace fusedrnn::cpu::AVX2
#endif
