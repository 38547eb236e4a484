// CPU ops of causal attention: astrobio::causal_attention_cpu and causal_attention_backward_cpu (schemas in
// csrc/ops.cpp), for fp32 CPU tensors q, k, v [batch, seq, heads, head_dim] (the layout of the model's
// projections: no transposes), scale 1 / sqrt(head_dim). Argument checks, outputs allocated here, the
// (batch, head) pairs split over torch's threads (at::parallel_for, so torch.set_num_threads governs them),
// and the arithmetic in the SIMD path this CPU runs (attention_kernels.h; the choice of cpu::simd_path()).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

#include "attention_kernels.h"

namespace astrobio::cpu::attention::portable {
ASTROBIO_ATTENTION_KERNELS()
}  // namespace astrobio::cpu::attention::portable

namespace astrobio {

namespace {

using cpu::attention::Kernels;

// Multiply-adds per task (a pair costs about seq^2 head_dim): some tens of microseconds of work, so small
// tensors stay on one thread.
constexpr int64_t kGrainWork = 1 << 18;

const Kernels& kernels() {
  const std::string path = cpu::simd_path();
#if defined(__x86_64__)
  if (path == "avx512") return cpu::attention::avx512::kKernels;
  if (path == "avx2") return cpu::attention::avx2::kKernels;
#endif
  return cpu::attention::portable::kKernels;
}

void check_float_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(),
              "; this op runs on CPU tensors (on a GPU the model uses PyTorch's scaled_dot_product_attention)");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              c10::toString(t.scalar_type()), "; convert q, k, v with .float() (the model does under autocast)");
}

// The checked shape of q, k, v (and of the backward's out and dout, passed in `more`).
cpu::attention::Shape check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                std::initializer_list<std::pair<const at::Tensor*, const char*>> more = {}) {
  check_float_cpu(op, "q", q);
  TORCH_CHECK(q.dim() == 4, op, ": q, k and v must be [batch, seq, heads, head_dim], got q of shape ", q.sizes());
  std::vector<std::pair<const at::Tensor*, const char*>> others{{&k, "k"}, {&v, "v"}};
  others.insert(others.end(), more.begin(), more.end());
  for (const auto& [t, name] : others) {
    check_float_cpu(op, name, *t);
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": ", name, " has shape ", t->sizes(), " but q has ", q.sizes(),
                "; causal self-attention needs one shape [batch, seq, heads, head_dim] for all");
  }
  TORCH_CHECK(q.size(3) > 0, op, ": head_dim must be positive, got shape ", q.sizes());
  return {q.size(1), q.size(2), q.size(3), static_cast<float>(1.0 / std::sqrt(static_cast<double>(q.size(3))))};
}

int64_t pairs_per_task(const cpu::attention::Shape& s) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, s.seq * s.seq * s.head_dim));
}

std::tuple<at::Tensor, at::Tensor> causal_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in) {
  const cpu::attention::Shape shape = check_qkv("causal_attention_cpu", q_in, k_in, v_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t batch = q.size(0), pairs = batch * shape.heads;
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({batch, shape.heads, shape.seq}, q.options());
  if (q.numel() == 0) return {out, lse};
  const cpu::attention::Forward args{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                                     out.data_ptr<float>(), lse.data_ptr<float>(), shape};
  const Kernels& kk = kernels();
  at::parallel_for(0, pairs, pairs_per_task(shape), [&](int64_t begin, int64_t end) { kk.forward(args, begin, end); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in) {
  constexpr const char* op = "causal_attention_backward_cpu";
  const cpu::attention::Shape shape = check_qkv(op, q_in, k_in, v_in, {{&out_in, "out"}, {&dout_in, "dout"}});
  check_float_cpu(op, "lse", lse_in);
  const int64_t batch = q_in.size(0), pairs = batch * shape.heads;
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({batch, shape.heads, shape.seq}), op, ": lse has shape ",
              lse_in.sizes(), ", expected [batch, heads, seq] = [", batch, ", ", shape.heads, ", ", shape.seq,
              "] (the forward's second output)");
  const at::Tensor dout = dout_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  const cpu::attention::Backward args{dout.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(),
                                      v.data_ptr<float>(), out.data_ptr<float>(), lse.data_ptr<float>(),
                                      dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(), shape};
  const Kernels& kk = kernels();
  at::parallel_for(0, pairs, pairs_per_task(shape), [&](int64_t begin, int64_t end) { kk.backward(args, begin, end); });
  return {dq, dk, dv};
}

}  // namespace

}  // namespace astrobio

TORCH_LIBRARY_IMPL(astrobio, CPU, m) {
  m.impl("causal_attention_cpu", &astrobio::causal_attention_cpu);
  m.impl("causal_attention_backward_cpu", &astrobio::causal_attention_backward_cpu);
}
