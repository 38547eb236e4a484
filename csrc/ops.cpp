// The astrobio op library: op schemas (defined once), argument validation shared by every device,
// the CPU implementation's registration, and the pybind11 module for bindings that are not ops.
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "adamw8bit.h"
#include "ops.h"

namespace astrobio {

namespace {

// A dtype as Python spells it (torch.float32), for errors read by Python users.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kDouble: return "torch.float64";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

DType float_dtype(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat) return DType::kFloat32;
  if (t.scalar_type() == at::kBFloat16) return DType::kBFloat16;
  TORCH_CHECK(false, "adamw8bit_step: ", name, " must be float32 or bfloat16, got ", dtype_name(t.scalar_type()),
              "; convert it with .float() or .bfloat16()");
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& param) {
  TORCH_CHECK(t.device() == param.device(), "adamw8bit_step: ", name, " is on ", t.device(),
              " but param is on ", param.device(), "; move them to one device");
  TORCH_CHECK(t.is_contiguous(), "adamw8bit_step: ", name,
              " must be contiguous; call .contiguous() on it (the kernel updates memory in place)");
}

void check_numel(const at::Tensor& t, const char* name, int64_t expected, const char* why) {
  TORCH_CHECK(t.numel() == expected, "adamw8bit_step: ", name, " has ", t.numel(), " elements, expected ",
              expected, " (", why, ")");
}

}  // namespace

StepArgs make_step_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const at::Tensor& absmax1, const at::Tensor& absmax2,
                        const at::Tensor& qmap1, const at::Tensor& qmap2,
                        const std::optional<at::Tensor>& param_bf16, double lr, double beta1, double beta2,
                        double eps, double weight_decay, double grad_scale, int64_t step, int64_t seed) {
  TORCH_CHECK(step >= 1, "adamw8bit_step: step must be >= 1 (the count including this update), got ", step);
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "adamw8bit_step: lr must be >= 0 and finite, got ", lr);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0,
              "adamw8bit_step: weight_decay must be >= 0 and finite, got ", weight_decay);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
              "adamw8bit_step: betas must lie in [0, 1), got (", beta1, ", ", beta2, ")");
  TORCH_CHECK(eps > 0.0, "adamw8bit_step: eps must be > 0, got ", eps);
  TORCH_CHECK(std::isfinite(grad_scale), "adamw8bit_step: grad_scale must be finite, got ", grad_scale);

  const int64_t n = param.numel();
  check_tensor(param, "param", param);
  check_tensor(grad, "grad", param);
  check_tensor(exp_avg, "exp_avg", param);
  check_tensor(exp_avg_sq, "exp_avg_sq", param);
  check_numel(grad, "grad", n, "one gradient per parameter element");
  check_numel(exp_avg, "exp_avg", n, "one moment per parameter element");
  check_numel(exp_avg_sq, "exp_avg_sq", n, "one moment per parameter element");

  StepArgs a{};
  a.param = param.data_ptr();
  a.param_dtype = float_dtype(param, "param");
  a.grad = grad.data_ptr();
  a.grad_dtype = float_dtype(grad, "grad");
  a.exp_avg = exp_avg.data_ptr();
  a.exp_avg_sq = exp_avg_sq.data_ptr();
  a.numel = n;
  a.c = make_step_constants(lr, beta1, beta2, eps, weight_decay, grad_scale, step);
  a.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFull);

  TORCH_CHECK(exp_avg.scalar_type() == exp_avg_sq.scalar_type(), "adamw8bit_step: exp_avg is ",
              dtype_name(exp_avg.scalar_type()), " but exp_avg_sq is ", dtype_name(exp_avg_sq.scalar_type()),
              "; both must be uint8 or float32");
  a.quantized = exp_avg.scalar_type() == at::kByte;
  if (a.quantized) {
    const int64_t blocks = (n + kBlockSize - 1) / kBlockSize;
    const std::pair<const at::Tensor*, const char*> floats[] = {
        {&absmax1, "absmax1"}, {&absmax2, "absmax2"}, {&qmap1, "qmap1"}, {&qmap2, "qmap2"}};
    for (const auto& [t, name] : floats) {
      check_tensor(*t, name, param);
      TORCH_CHECK(t->scalar_type() == at::kFloat, "adamw8bit_step: ", name, " must be float32, got ",
                  dtype_name(t->scalar_type()));
    }
    check_numel(absmax1, "absmax1", blocks, "one absmax per block of 256 elements");
    check_numel(absmax2, "absmax2", blocks, "one absmax per block of 256 elements");
    check_numel(qmap1, "qmap1", kQmapSize, "a 256-entry quantization map");
    check_numel(qmap2, "qmap2", kQmapSize, "a 256-entry quantization map");
    a.absmax1 = absmax1.data_ptr<float>();
    a.absmax2 = absmax2.data_ptr<float>();
    a.qmap1 = qmap1.data_ptr<float>();
    a.qmap2 = qmap2.data_ptr<float>();
  } else {
    TORCH_CHECK(exp_avg.scalar_type() == at::kFloat, "adamw8bit_step: exp_avg must be uint8 codes or float32 ",
                "moments, got ", dtype_name(exp_avg.scalar_type()));
  }
  if (param_bf16.has_value()) {
    check_tensor(*param_bf16, "param_bf16", param);
    TORCH_CHECK(param_bf16->scalar_type() == at::kBFloat16, "adamw8bit_step: param_bf16 must be bfloat16, got ",
                dtype_name(param_bf16->scalar_type()));
    check_numel(*param_bf16, "param_bf16", n, "a bf16 copy of every parameter element");
    a.param_bf16 = reinterpret_cast<uint16_t*>(param_bf16->data_ptr());
  }
  return a;
}

void check_found_inf(const at::Tensor& found_inf, const at::Tensor& param) {
  TORCH_CHECK(found_inf.numel() == 1 && found_inf.scalar_type() == at::kFloat,
              "adamw8bit_step: found_inf must be a one-element float32 tensor, got ", found_inf.numel(),
              " elements of ", dtype_name(found_inf.scalar_type()));
  TORCH_CHECK(found_inf.device() == param.device(), "adamw8bit_step: found_inf is on ", found_inf.device(),
              " but param is on ", param.device(), "; keep found_inf on the parameter's device");
}

namespace {

void adamw8bit_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const at::Tensor& absmax1, const at::Tensor& absmax2,
                        const at::Tensor& qmap1, const at::Tensor& qmap2,
                        const std::optional<at::Tensor>& param_bf16, const std::optional<at::Tensor>& found_inf,
                        double lr, double beta1, double beta2, double eps, double weight_decay,
                        double grad_scale, int64_t step, int64_t seed) {
  StepArgs a = make_step_args(param, grad, exp_avg, exp_avg_sq, absmax1, absmax2, qmap1, qmap2, param_bf16, lr,
                              beta1, beta2, eps, weight_decay, grad_scale, step, seed);
  if (found_inf.has_value()) {
    check_found_inf(*found_inf, param);
    if (found_inf->item<float>() != 0.0f) return;
  }
  cpu::adamw8bit_step(a);
}

}  // namespace

void check_adamw8bit_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                          const at::Tensor& exp_avg_sq, const at::Tensor& absmax1, const at::Tensor& absmax2,
                          const at::Tensor& qmap1, const at::Tensor& qmap2,
                          const std::optional<at::Tensor>& param_bf16, const std::optional<at::Tensor>& found_inf,
                          double lr, double beta1, double beta2, double eps, double weight_decay, double grad_scale,
                          int64_t step, int64_t seed) {
  make_step_args(param, grad, exp_avg, exp_avg_sq, absmax1, absmax2, qmap1, qmap2, param_bf16, lr, beta1, beta2,
                 eps, weight_decay, grad_scale, step, seed);
  if (found_inf.has_value()) check_found_inf(*found_inf, param);
}

bool any_non_finite(const std::vector<at::Tensor>& tensors) {
  std::vector<FloatSpan> spans;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "any_non_finite: tensor ", i, " is on ", t.device(),
                "; this scan reads CPU tensors (on a GPU, compute the flag there)");
    TORCH_CHECK(t.is_contiguous(), "any_non_finite: tensor ", i, " must be contiguous; call .contiguous() on it");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "any_non_finite: tensor ", i,
                " is ", dtype_name(t.scalar_type()), "; only float32 and bfloat16 are scanned");
    spans.push_back({t.data_ptr(), t.numel(), t.scalar_type() == at::kFloat ? DType::kFloat32 : DType::kBFloat16});
  }
  py::gil_scoped_release no_gil;
  return cpu::any_non_finite(spans);
}

std::vector<std::pair<std::string, int64_t>> nearest_code_mismatches(const at::Tensor& qmap,
                                                                     const at::Tensor& threshold) {
  TORCH_CHECK(qmap.device().is_cpu() && qmap.scalar_type() == at::kFloat && qmap.is_contiguous() &&
                  qmap.numel() == kQmapSize,
              "nearest_code_mismatches: qmap must be a contiguous CPU float32 tensor of 256 entries");
  TORCH_CHECK(threshold.device().is_cpu() && threshold.scalar_type() == at::kFloat && threshold.is_contiguous() &&
                  threshold.numel() == kQmapSize - 1,
              "nearest_code_mismatches: threshold must be a contiguous CPU float32 tensor of 255 entries");
  py::gil_scoped_release no_gil;
  return cpu::nearest_code_mismatches(qmap.data_ptr<float>(), threshold.data_ptr<float>());
}

}  // namespace astrobio

// found_inf (optional): a one-element float32 tensor on the parameters' device; nonzero skips the step
// (nothing is written). Device kernels read it where it lies, so a caller never synchronises to decide.
TORCH_LIBRARY(astrobio, m) {
  m.def(
      "adamw8bit_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!) absmax1, Tensor(e!) absmax2, Tensor qmap1, Tensor qmap2, Tensor(f!)? param_bf16, "
      "Tensor? found_inf, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float grad_scale, int step, int seed) -> ()");
  // The model's fused layers on the CPU (csrc/cpu/layers.cpp): the specification of the Triton ops of the
  // same names without "_cpu" (kernels/rmsnorm.py, rotary.py, swiglu.py), fp32 and bf16, new tensors out.
  // rmsnorm: y, h (x + residual; empty without a residual), rstd (fp32, one per row of the last dimension).
  m.def("rmsnorm_forward_cpu(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rmsnorm_backward_cpu(Tensor dy, Tensor? dh, Tensor h, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  // q, k [batch, seq, heads, head_dim]; cos, sin fp32 [seq, head_dim / 2]; the backward rotates back.
  m.def("rotary_cpu(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("rotary_backward_cpu(Tensor dq, Tensor dk, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("silu_mul_cpu(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_mul_backward_cpu(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // Causal self-attention on the CPU (csrc/cpu/attention.cpp), fp32 q, k, v [batch, seq, heads, head_dim],
  // scale 1 / sqrt(head_dim): out [batch, seq, heads, head_dim] and logsumexp [batch, heads, seq]; the
  // backward gives dq, dk, dv from dout and the forward's inputs and outputs.
  m.def("causal_attention_cpu(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  m.def("causal_attention_backward_cpu(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(astrobio, CPU, m) { m.impl("adamw8bit_step", &astrobio::adamw8bit_step_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "astrobio kernels: the astrobio:: torch ops register on import; these are the non-op bindings.";
  m.def("adamw8bit_step_nogil", &astrobio::adamw8bit_step_cpu, py::call_guard<py::gil_scoped_release>(),
        "The CPU adamw8bit_step with the GIL released (for host worker threads).");
  m.def("check_adamw8bit_args", &astrobio::check_adamw8bit_args,
        "Validate adamw8bit_step's arguments (the op's own checks, for every backend) without stepping; "
        "raises RuntimeError naming the bad argument and the fix.");
  m.def("any_non_finite", &astrobio::any_non_finite, py::arg("tensors"),
        "Whether any element of these contiguous CPU float32/bfloat16 tensors is inf or NaN "
        "(one multi-threaded pass, GIL released).");
  m.def("nearest_code_mismatches", &astrobio::nearest_code_mismatches, py::arg("qmap"), py::arg("threshold"),
        "Test hook: per SIMD path, the number of fp32 values n with |n| < 2 whose table-lookup code differs from "
        "#{i : threshold[i] < n}.");
  m.def("simd_path", &astrobio::cpu::simd_path,
        "The SIMD path the CPU kernel takes (ASTROBIO_CPU_SIMD=portable|avx2|avx512 forces one).");
  m.def("cpu_simd_paths", &astrobio::cpu::simd_paths, "The SIMD paths this CPU can run, portable first.");
  m.def("triad_bandwidth", &astrobio::cpu::triad_bandwidth, py::call_guard<py::gil_scoped_release>(),
        py::arg("n"), py::arg("repeats"), "Triad a[i] = b[i] + s * c[i] over n floats, in GB/s.");
  m.def("inplace_rmw_bandwidth", &astrobio::cpu::inplace_rmw_bandwidth, py::call_guard<py::gil_scoped_release>(),
        py::arg("n"), py::arg("reads"), py::arg("writes"), py::arg("repeats"),
        "In-place read-modify-write over `reads` arrays of n floats, writing `writes` of them back, in GB/s.");
  m.def("cuda_built", []() {
#ifdef ASTROBIO_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build includes the CUDA kernels.");
}
