// Baseline build of the vectorised kernels: no instruction-set flags beyond the compiler's default, so it runs on
// any CPU of the target architecture.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernels_impl.h"
