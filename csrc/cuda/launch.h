// Launch variants of the CUDA kernel of astrobio::adamw8bit_step, selectable at run time so that one
// GPU session can time them all (benchmarks/tune_adamw8bit_gpu.py; docs/GPU.md lists them). Every
// variant computes the same bits; they differ in quantization blocks per warp iteration and in the
// register cap (thread blocks resident per SM).
#pragma once

namespace astrobio::cuda {

constexpr int kLaunchVariants = 3;
constexpr int kDefaultLaunchVariant = 0;

// Selects the variant of later launches in this process and returns the previous one; -1 only
// reads it. Throws std::invalid_argument for any other value outside [0, kLaunchVariants).
int launch_variant(int variant);

}  // namespace astrobio::cuda
