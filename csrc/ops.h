// Validation shared by the CPU and CUDA registrations of astrobio::adamw8bit_step.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "adamw8bit.h"

namespace astrobio {

// Checks devices, dtypes, sizes, contiguity and hyperparameters (a clear error names the bad
// argument and the fix) and returns the kernel's arguments.
StepArgs make_step_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const at::Tensor& absmax1, const at::Tensor& absmax2,
                        const at::Tensor& qmap1, const at::Tensor& qmap2,
                        const std::optional<at::Tensor>& param_bf16, double lr, double beta1, double beta2,
                        double eps, double weight_decay, double grad_scale, int64_t step, int64_t seed);

// found_inf: one float32 element on the parameter's device (device kernels read it there, no sync).
void check_found_inf(const at::Tensor& found_inf, const at::Tensor& param);

}  // namespace astrobio
