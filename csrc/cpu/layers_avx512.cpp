// AVX-512 path of the CPU layer kernels (layers_kernels.h): 16 fp32 lanes.
#if defined(__x86_64__)
#include "layers_kernels.h"

namespace astrobio::cpu::layers::avx512 {
ASTROBIO_LAYER_KERNELS(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))))
}  // namespace astrobio::cpu::layers::avx512
#endif
