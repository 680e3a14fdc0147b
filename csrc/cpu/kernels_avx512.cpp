// AVX-512 build of the vectorised kernels (16 float lanes, 32 vector registers). setup.py compiles this one file
// with ATen's AVX-512 flags (-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma, x86-64 only); the driver calls into
// it only when at::get_cpu_capability() reports AVX512, so a CPU without it never executes it. Built without those
// flags it provides no table.
#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
#else
namespace fusedrnn::cpu::AVX512 {
const KernelTable<float>* kernels_float() { return nullptr; }
const KernelTable<double>* kernels_double() { return nullptr; }
}  // namespace fusedrnn::cpu::AVX512
#endif
