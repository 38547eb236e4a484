// AVX-512 path of causal attention on the CPU (attention_kernels.h): 16 fp32 lanes, a * b + c contracted
// into fused multiply-adds.
#if defined(__x86_64__)
#pragma GCC optimize("fp-contract=fast")
#include "attention_kernels.h"

namespace astrobio::cpu::attention::avx512 {
ASTROBIO_ATTENTION_KERNELS(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))))
}  // namespace astrobio::cpu::attention::avx512
#endif
