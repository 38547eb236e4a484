// AVX2 path of the CPU layer kernels (layers_kernels.h): 8 fp32 lanes.
#if defined(__x86_64__)
#include "layers_kernels.h"

namespace astrobio::cpu::layers::avx2 {
ASTROBIO_LAYER_KERNELS(__attribute__((target("avx2"))))
}  // namespace astrobio::cpu::layers::avx2
#endif
