// CUDA registration of astrobio::adamw8bit_step (schema in csrc/ops.cpp): the shared validation,
// then the kernel (adamw8bit.cu) on the current stream. found_inf stays on the device: the kernel
// reads it, so the step never waits for the host.
// NOTE: the device guard and the current stream come through c10's device-generic interface, so
// this file needs no CUDA header: the host compiler then finds everything in torch's own include
// folders, whichever CUDA toolkit layout the build machine has.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <optional>

#include "adamw8bit.h"
#include "cuda/launch.h"
#include "ops.h"

namespace astrobio {
namespace {

void adamw8bit_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                         const at::Tensor& exp_avg_sq, const at::Tensor& absmax1, const at::Tensor& absmax2,
                         const at::Tensor& qmap1, const at::Tensor& qmap2,
                         const std::optional<at::Tensor>& param_bf16, const std::optional<at::Tensor>& found_inf,
                         double lr, double beta1, double beta2, double eps, double weight_decay,
                         double grad_scale, int64_t step, int64_t seed) {
  TORCH_CHECK(param.is_cuda(), "adamw8bit_step (CUDA): param is on ", param.device(),
              "; move every tensor of the step to one CUDA device");
  const c10::DeviceGuard device_guard(param.device());
  StepArgs a = make_step_args(param, grad, exp_avg, exp_avg_sq, absmax1, absmax2, qmap1, qmap2, param_bf16, lr,
                              beta1, beta2, eps, weight_decay, grad_scale, step, seed);
  if (found_inf.has_value()) {
    check_found_inf(*found_inf, param);
    a.found_inf = found_inf->data_ptr<float>();
  }
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(param.device());
  cuda::adamw8bit_step(a, stream.native_handle());
}

int64_t adamw8bit_cuda_launch_variant(int64_t variant) {
  TORCH_CHECK(variant >= -1 && variant < cuda::kLaunchVariants, "adamw8bit_cuda_launch_variant: variant ", variant,
              " does not exist; choose one of 0..", cuda::kLaunchVariants - 1, " (docs/GPU.md), or -1 to read it");
  return cuda::launch_variant(static_cast<int>(variant));
}

}  // namespace
}  // namespace astrobio

TORCH_LIBRARY_IMPL(astrobio, CUDA, m) { m.impl("adamw8bit_step", &astrobio::adamw8bit_step_cuda); }

// The CUDA kernel's launch variant for this process (csrc/cuda/launch.h); returns the previous one,
// -1 only reads it. For benchmarks/tune_adamw8bit_gpu.py: every variant computes the same bits.
TORCH_LIBRARY_FRAGMENT(astrobio, m) {
  m.def("adamw8bit_cuda_launch_variant(int variant) -> int", &astrobio::adamw8bit_cuda_launch_variant);
}
