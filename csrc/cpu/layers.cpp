// CPU ops of the model's fused layers: astrobio::rmsnorm_forward_cpu, rmsnorm_backward_cpu, rotary_cpu,
// rotary_backward_cpu, silu_mul_cpu and silu_mul_backward_cpu (schemas in csrc/ops.cpp). They compute the
// specification of the Triton ops of the same names without "_cpu" (kernels/rmsnorm.py, rotary.py,
// swiglu.py) for fp32 and bf16 CPU tensors: argument checks, outputs allocated here, rows split over
// torch's threads (at::parallel_for, so torch.set_num_threads governs them), and the arithmetic in the
// SIMD path this CPU runs (layers_kernels.h; the same choice as adamw8bit_step's, cpu::simd_path()).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "layers_kernels.h"

namespace astrobio::cpu::layers::portable {
ASTROBIO_LAYER_KERNELS()
}  // namespace astrobio::cpu::layers::portable

namespace astrobio {

namespace {

using cpu::layers::Kernels;

// Elements per task: a few tens of microseconds of work, so small tensors stay on one thread.
constexpr int64_t kGrainElements = 1 << 15;

const Kernels& kernels() {
  const std::string path = cpu::simd_path();
#if defined(__x86_64__)
  if (path == "avx512") return cpu::layers::avx512::kKernels;
  if (path == "avx2") return cpu::layers::avx2::kKernels;
#endif
  return cpu::layers::portable::kKernels;
}

int64_t rows_per_task(int64_t row_elements) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements));
}

DType layer_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(),
              "; this op runs on CPU tensors (on a GPU the Triton op without \"_cpu\" serves)");
  if (t.scalar_type() == at::kFloat) return DType::kFloat32;
  if (t.scalar_type() == at::kBFloat16) return DType::kBFloat16;
  TORCH_CHECK(false, op, ": ", name, " must be float32 or bfloat16, got ", c10::toString(t.scalar_type()),
              "; convert it with .float() or .bfloat16()");
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  layer_dtype(op, name, t);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name, " has ",
              ref.sizes(), "; they must match");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " is ", c10::toString(t.scalar_type()),
              " but ", ref_name, " is ", c10::toString(ref.scalar_type()), "; convert them to one dtype");
}

// The weight as contiguous fp32 (d entries: the copy, if any, costs nothing next to the rows).
at::Tensor float_weight(const char* op, const at::Tensor& weight, const at::Tensor& x) {
  layer_dtype(op, "weight", weight);
  TORCH_CHECK(weight.dim() == 1, op, ": weight must be 1-D [d], got shape ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(0), op, ": the rows have ", (x.dim() ? x.size(-1) : 0),
              " features but weight has ", weight.size(0), "; the last dimension must be weight's size");
  TORCH_CHECK(weight.size(0) > 0, op, ": rows of 0 features cannot be normalised");
  return weight.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_forward_cpu(const at::Tensor& x_in,
                                                                   const std::optional<at::Tensor>& residual_in,
                                                                   const at::Tensor& weight, double eps) {
  constexpr const char* op = "rmsnorm_forward_cpu";
  const DType dtype = layer_dtype(op, "x", x_in);
  const at::Tensor w = float_weight(op, weight, x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor residual;
  if (residual_in.has_value()) {
    check_like(op, "residual", *residual_in, "x", x);
    residual = residual_in->contiguous();
  }
  const int64_t cols = x.size(-1), rows = x.numel() / cols;
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor h = residual.defined() ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const cpu::layers::RmsnormForward args{x.data_ptr(), residual.defined() ? residual.data_ptr() : nullptr,
                                         w.data_ptr<float>(), y.data_ptr(), h.data_ptr(), rstd.data_ptr<float>(),
                                         cols, static_cast<float>(eps), dtype};
  const Kernels& k = kernels();
  at::parallel_for(0, rows, rows_per_task(cols),
                   [&](int64_t begin, int64_t end) { k.rmsnorm_forward(args, begin, end); });
  return {y, h, rstd};
}

// The weight gradient is summed per fixed block of rows into its own fp32 row, then over the blocks in
// order: the result does not depend on the number of threads.
std::tuple<at::Tensor, at::Tensor> rmsnorm_backward_cpu(const at::Tensor& dy_in, const std::optional<at::Tensor>& dh_in,
                                                        const at::Tensor& h_in, const at::Tensor& weight,
                                                        const at::Tensor& rstd_in) {
  constexpr const char* op = "rmsnorm_backward_cpu";
  const DType dtype = layer_dtype(op, "h", h_in);
  const at::Tensor w = float_weight(op, weight, h_in);
  check_like(op, "dy", dy_in, "h", h_in);
  if (dh_in.has_value()) check_like(op, "dh", *dh_in, "h", h_in);
  const int64_t cols = h_in.size(-1), rows = h_in.numel() / cols;
  TORCH_CHECK(rstd_in.device().is_cpu() && rstd_in.scalar_type() == at::kFloat && rstd_in.numel() == rows, op,
              ": rstd must be a float32 CPU tensor of one entry per row (", rows, "), got ", rstd_in.numel(),
              " entries of ", c10::toString(rstd_in.scalar_type()), " on ", rstd_in.device());
  const at::Tensor dy = dy_in.contiguous(), h = h_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor dh = dh_in.has_value() ? dh_in->contiguous() : at::Tensor();
  at::Tensor dx = at::empty(h.sizes(), h.options());
  const int64_t block = rows_per_task(cols), blocks = (rows + block - 1) / block;
  at::Tensor partial = at::zeros({std::max<int64_t>(blocks, 1), cols}, h.options().dtype(at::kFloat));
  const cpu::layers::RmsnormBackward args{dy.data_ptr(), dh.defined() ? dh.data_ptr() : nullptr, h.data_ptr(),
                                          w.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(), cols, dtype};
  const Kernels& k = kernels();
  float* sums = partial.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      k.rmsnorm_backward(args, b * block, std::min(rows, (b + 1) * block), sums + b * cols);
  });
  for (int64_t b = 1; b < blocks; ++b)
    for (int64_t j = 0; j < cols; ++j) sums[j] += sums[b * cols + j];
  return {dx, partial[0].to(weight.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> rotate(const char* op, const at::Tensor& q_in, const at::Tensor& k_in,
                                          const at::Tensor& cos_in, const at::Tensor& sin_in, float sign) {
  const DType dtype = layer_dtype(op, "q", q_in);
  check_like(op, "k", k_in, "q", q_in);
  TORCH_CHECK(q_in.dim() == 4, op, ": q and k must be [batch, seq, heads, head_dim], got shape ", q_in.sizes());
  const int64_t batch = q_in.size(0), seq = q_in.size(1), heads = q_in.size(2), head_dim = q_in.size(3);
  TORCH_CHECK(head_dim % 2 == 0, op, ": head_dim must be even (pairs rotate), got ", head_dim);
  for (const auto& [t, name] : {std::pair{&cos_in, "cos"}, std::pair{&sin_in, "sin"}}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, op, ": ", name,
                " must be a float32 CPU tensor, got ", c10::toString(t->scalar_type()), " on ", t->device(),
                "; the tables are fp32 (astrobio.model.transformer.rotary_tables)");
    TORCH_CHECK(t->dim() == 2 && t->size(0) == seq && t->size(1) == head_dim / 2, op, ": ", name, " has shape ",
                t->sizes(), ", expected [seq, head_dim / 2] = [", seq, ", ", head_dim / 2, "]");
  }
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  const cpu::layers::Rotary args{q.data_ptr(), k.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), cos.data_ptr<float>(),
                                 sin.data_ptr<float>(), seq, heads, head_dim / 2, sign, dtype};
  const Kernels& kk = kernels();
  at::parallel_for(0, batch * seq, rows_per_task(2 * heads * head_dim),
                   [&](int64_t begin, int64_t end) { kk.rotary(args, begin, end); });
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rotary_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                              const at::Tensor& sin) {
  return rotate("rotary_cpu", q, k, cos, sin, 1.0f);
}

std::tuple<at::Tensor, at::Tensor> rotary_backward_cpu(const at::Tensor& dq, const at::Tensor& dk,
                                                       const at::Tensor& cos, const at::Tensor& sin) {
  return rotate("rotary_backward_cpu", dq, dk, cos, sin, -1.0f);
}

at::Tensor silu_mul_cpu(const at::Tensor& gate_in, const at::Tensor& up_in) {
  constexpr const char* op = "silu_mul_cpu";
  const DType dtype = layer_dtype(op, "gate", gate_in);
  check_like(op, "up", up_in, "gate", gate_in);
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  const cpu::layers::SiluMul args{gate.data_ptr(), up.data_ptr(), out.data_ptr(), dtype};
  const Kernels& k = kernels();
  at::parallel_for(0, gate.numel(), kGrainElements, [&](int64_t begin, int64_t end) { k.silu_mul(args, begin, end); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_backward_cpu(const at::Tensor& dout_in, const at::Tensor& gate_in,
                                                         const at::Tensor& up_in) {
  constexpr const char* op = "silu_mul_backward_cpu";
  const DType dtype = layer_dtype(op, "gate", gate_in);
  check_like(op, "up", up_in, "gate", gate_in);
  check_like(op, "dout", dout_in, "gate", gate_in);
  const at::Tensor dout = dout_in.contiguous(), gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor dgate = at::empty(gate.sizes(), gate.options()), dup = at::empty(up.sizes(), up.options());
  const cpu::layers::SiluMulBackward args{dout.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(),
                                          dup.data_ptr(), dtype};
  const Kernels& k = kernels();
  at::parallel_for(0, gate.numel(), kGrainElements,
                   [&](int64_t begin, int64_t end) { k.silu_mul_backward(args, begin, end); });
  return {dgate, dup};
}

}  // namespace

}  // namespace astrobio

TORCH_LIBRARY_IMPL(astrobio, CPU, m) {
  m.impl("rmsnorm_forward_cpu", &astrobio::rmsnorm_forward_cpu);
  m.impl("rmsnorm_backward_cpu", &astrobio::rmsnorm_backward_cpu);
  m.impl("rotary_cpu", &astrobio::rotary_cpu);
  m.impl("rotary_backward_cpu", &astrobio::rotary_backward_cpu);
  m.impl("silu_mul_cpu", &astrobio::silu_mul_cpu);
  m.impl("silu_mul_backward_cpu", &astrobio::silu_mul_backward_cpu);
}
