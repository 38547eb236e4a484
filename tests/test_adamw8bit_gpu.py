"""The GPU backends of astrobio::adamw8bit_step (the CUDA kernel and the Triton kernel) against the
specification. Everything but the first check needs a CUDA GPU and is skipped without one:

- the CUDA kernel's own source, compiled for the host with csrc/cuda/host_emulation.h (a thread per
  CUDA thread) and run on the CPU against the reference: its indexing, tails, unaligned path, warp
  reduction, code search and grid-stride loop are checked in CI, where there is no GPU
  (the hardware itself, its vector accesses and the PTX, only on a GPU);
- every backend against astrobio/spec/adamw8bit.py (run on the CPU) over 50 calls, bit for bit:
  sizes that do not divide the 256-element block, fp32/bf16 gradients, fp32 or bf16 stochastic-
  rounding masters, the bf16 copy, fp32 moments, tensors not aligned to 16 bytes, and found_inf on
  the device (one call is skipped);
- state_dict portability through astrobio.optim.AdamW8bit: saved on CUDA, continued on the CPU kernel
  and on Triton, and back, all bit for bit;
- convergence next to torch.optim.AdamW; torch.library.opcheck on CUDA tensors.
"""

import ctypes
import functools
import io
import pathlib
import shutil
import subprocess

import pytest
import torch
from _adamw8bit_cases import edge_gradients
from _adamw8bit_cases import initial_state as shared_initial_state

from astrobio import ops
from astrobio.spec import adamw8bit as R
from astrobio.optim.adamw8bit import AdamW8bit


def on_gpu(test):
    """Marks a test `gpu` and skips it without a GPU."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")
    return pytest.mark.gpu(skip(test))


GPU_BACKENDS = ("cuda", "triton")
DEVICE = "cuda"
STEPS = 50
SKIPPED_CALL = 10  # this call gets found_inf = 1 on the device
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_scale=0.5)
SIZES = (1, 255, 256, 257, 4095, 4097)
LARGE = 1_000_003
# name: (8-bit moments, param dtype, grad dtype, bf16 copy, element offset into the buffers)
VARIANTS = {
    "q8-fp32grad-fp32master": (True, torch.float32, torch.float32, False, 0),
    "q8-bf16grad-fp32master-copy": (True, torch.float32, torch.bfloat16, True, 0),
    "q8-bf16grad-bf16sr": (True, torch.bfloat16, torch.bfloat16, False, 0),
    "q8-fp32grad-bf16sr-copy": (True, torch.bfloat16, torch.float32, True, 0),
    "fp32moments-bf16grad-fp32master": (False, torch.float32, torch.bfloat16, False, 0),
    "q8-unaligned-bf16grad-fp32master-copy": (True, torch.float32, torch.bfloat16, True, 1),
    "q8-edge-fp32grad-fp32master-copy": (True, torch.float32, torch.float32, True, 0),
}
EDGE = "q8-edge-fp32grad-fp32master-copy"  # NaN weights and gradients, an inf gradient, block 0 subnormal
CASES = ([(n, v) for n in SIZES for v in VARIANTS]
         + [(LARGE, "q8-bf16grad-fp32master-copy"), (LARGE, "q8-bf16grad-bf16sr")])


def require(backend: str) -> None:
    try:
        ops.resolve_backend(backend, DEVICE)
    except RuntimeError as error:
        pytest.skip(str(error))


def calls(steps: int = STEPS) -> list[tuple[int, float, int]]:
    """(step, found_inf, seed) per call: found_inf is 0 except on the skipped call (a found_inf of None,
    the other compiled variant of the Triton kernel, is what AdamW8bit passes in the tests below), and
    the seeds use all 32 bits."""
    out, step = [], 0
    for call in range(1, steps + 1):
        flag = 1.0 if call == SKIPPED_CALL else 0.0
        step += flag != 1.0
        out.append((max(step, 1), flag, (call * 0x9E3779B1) & 0xFFFFFFFF))
    return out


def initial_state(n: int, variant: str) -> dict:
    quantized, param_dtype, _, copy, _ = VARIANTS[variant]
    return shared_initial_state(n, quantized, param_dtype, copy, variant == EDGE, torch.Generator().manual_seed(n))


def gradients(n: int, variant: str, steps: int = STEPS):
    """One gradient per call, spanning five decades, so blocks use the whole range of the maps."""
    grad_dtype = VARIANTS[variant][2]
    gen = torch.Generator().manual_seed(10_000 + n)
    for _ in range(steps):
        grad = torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-4, 1, generator=gen)
        if variant == EDGE:
            edge_gradients(grad)
        yield grad.to(grad_dtype)


def on_device(t: torch.Tensor | None, offset: int, device: str = DEVICE) -> torch.Tensor | None:
    """A contiguous copy of t on `device` that starts `offset` elements into a larger buffer."""
    if t is None:
        return None
    buffer = torch.empty(t.numel() + offset, dtype=t.dtype, device=device)
    view = buffer[offset:]
    view.copy_(t)
    return view


def run(backend: str, n: int, variant: str, steps: int = STEPS, step_fn=None, device: str = DEVICE) -> dict:
    """All calls with one backend (or `step_fn`, with the op's arguments) on tensors on `device` that
    start at the variant's offset; the reference runs on the CPU, from the buffers' start."""
    step_fn = step_fn or functools.partial(ops.adamw8bit_step, backend)
    device, offset = ("cpu", 0) if backend == "reference" else (device, VARIANTS[variant][4])
    state = {k: on_device(v, offset if k not in ("absmax1", "absmax2") else 0, device)
             for k, v in initial_state(n, variant).items()}
    qmap1, qmap2 = R.dynamic_map(True).to(device), R.dynamic_map(False).to(device)
    for (step, flag, seed), grad in zip(calls(steps), gradients(n, variant, steps)):
        step_fn(state["param"], on_device(grad, offset, device), state["exp_avg"], state["exp_avg_sq"],
                state["absmax1"], state["absmax2"], qmap1, qmap2, state["param_bf16"],
                torch.tensor([flag], device=device), *HYPER.values(), step, seed)
    return {k: (v.cpu() if v is not None else None) for k, v in state.items()}


@functools.cache
def reference_result(n: int, variant: str, steps: int = STEPS) -> dict:
    return run("reference", n, variant, steps)


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    differ = got.view(torch.uint8) != want.view(torch.uint8)
    if bool(differ.any()):
        where = differ.nonzero().flatten()
        raise AssertionError(f"{what}: {where.numel()} bytes differ, first at byte "
                             f"{where[:6].tolist()}")


@on_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n, variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_matches_reference_bit_for_bit(backend, n, variant):
    require(backend)
    want = reference_result(n, variant)
    got = run(backend, n, variant)
    for key, value in want.items():
        if value is None:
            assert got[key] is None
        else:
            assert_bitwise_equal(got[key], value, f"{backend} {key}")
    finite = want["param"].float().isfinite()  # the comparison saw real numbers
    if variant != EDGE:
        assert bool(finite.all())
    elif n > 1:  # at n = 1 the edge case's one weight is its planted NaN
        assert bool(finite.any())


# --- the CUDA kernel's source, run on the CPU -------------------------------------------------------

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
EMULATED_CASES = [(255, "q8-fp32grad-bf16sr-copy", 0), (257, "q8-bf16grad-fp32master-copy", 0),
                  (4097, "fp32moments-bf16grad-fp32master", 0), (4097, "q8-bf16grad-bf16sr", 0),
                  (20_003, "q8-unaligned-bf16grad-fp32master-copy", 0), (20_003, "q8-fp32grad-fp32master", 0),
                  (257, EDGE, 0), (4097, EDGE, 0), (20_003, "q8-fp32grad-fp32master", 1), (20_003, "q8-bf16grad-bf16sr", 2),
                  (4097, "fp32moments-bf16grad-fp32master", 2)]
EMULATED_STEPS = SKIPPED_CALL + 2
EMULATED_GRID = 2  # thread blocks: fewer than 20,003 elements need, so warps stride over several blocks
LAUNCHER = "// --- launch (host)"
HARNESS = r"""
#include <memory>
#include <thread>
#include <vector>

#include "kernel.h"

namespace {
using astrobio::StepArgs;
using namespace astrobio::cuda;
using astrobio::kQmapSize;

template <typename ParamT, typename GradT, bool Quantized, int Unroll, int MinBlocks>
void run_grid(const StepArgs& a, unsigned grid) {
  const bool aligned = vector_aligned(a);
  gridDim.x = grid;
  for (unsigned block = 0; block < grid; ++block) {
    std::barrier<> block_barrier(kThreads);
    std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
    for (int w = 0; w < kThreads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<float> slots(kThreads);
    std::vector<std::thread> workers;
    for (unsigned t = 0; t < kThreads; ++t) {
      workers.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = block;
        emulated_block_barrier = &block_barrier;
        emulated_warp_barrier = warp_barriers[t / 32].get();
        emulated_warp_slots = &slots[t / 32 * 32];
        adamw8bit_kernel<ParamT, GradT, Quantized, Unroll, MinBlocks>(a, aligned);
      });
    }
    for (auto& worker : workers) worker.join();
  }
}

// The launcher's variants (adamw8bit.cu: launch_variant_kernel).
template <typename ParamT, typename GradT, bool Quantized>
void run_variant(const StepArgs& a, unsigned grid, int variant) {
  if (variant == 0) run_grid<ParamT, GradT, Quantized, 1, 4>(a, grid);
  else if (variant == 1) run_grid<ParamT, GradT, Quantized, 2, 2>(a, grid);
  else run_grid<ParamT, GradT, Quantized, 4, 1>(a, grid);
}

template <typename ParamT, typename GradT>
void run(const StepArgs& a, unsigned grid, int variant) {
  if (a.quantized) run_variant<ParamT, GradT, true>(a, grid, variant);
  else run_variant<ParamT, GradT, false>(a, grid, variant);
}

float threshold_spec(const float* qmap, int i) { return (qmap[i] + qmap[i + 1]) * 0.5f; }  // reference.thresholds

float from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
}  // namespace

extern "C" void emulated_step(void* param, int param_bf16_dtype, const void* grad, int grad_bf16_dtype,
                              void* exp_avg, void* exp_avg_sq, int quantized, float* absmax1, float* absmax2,
                              const float* qmap1, const float* qmap2, uint16_t* param_bf16,
                              const float* found_inf, int64_t numel, const float* constants, uint32_t seed,
                              unsigned grid, int variant) {
  StepArgs a{};
  a.param = param;
  a.param_dtype = param_bf16_dtype ? astrobio::DType::kBFloat16 : astrobio::DType::kFloat32;
  a.grad = grad;
  a.grad_dtype = grad_bf16_dtype ? astrobio::DType::kBFloat16 : astrobio::DType::kFloat32;
  a.exp_avg = exp_avg;
  a.exp_avg_sq = exp_avg_sq;
  a.quantized = quantized != 0;
  a.absmax1 = absmax1;
  a.absmax2 = absmax2;
  a.qmap1 = qmap1;
  a.qmap2 = qmap2;
  a.param_bf16 = param_bf16;
  a.found_inf = found_inf;
  a.numel = numel;
  a.c = {constants[0], constants[1], constants[2], constants[3], constants[4], constants[5], constants[6],
         constants[7], constants[8]};
  a.seed = seed;
  const bool fp32_param = a.param_dtype == astrobio::DType::kFloat32;
  const bool fp32_grad = a.grad_dtype == astrobio::DType::kFloat32;
  if (fp32_param && fp32_grad) run<float, float>(a, grid, variant);
  else if (fp32_param) run<float, uint16_t>(a, grid, variant);
  else if (fp32_grad) run<uint16_t, float>(a, grid, variant);
  else run<uint16_t, uint16_t>(a, grid, variant);
}

// The kernel's nearest code (lookup table staged bucket by bucket as the thread block does) against
// the specification's count of thresholds below x, for every fp32 x in [-1, 1] in increasing order
// (the count then only grows). Returns the number of values that differ; *exact: whether the
// staging found every bucket to hold at most two thresholds (the kernel's fast path).
extern "C" int64_t emulated_lookup_mismatches(const float* qmap, int* exact) {
  static Codebook cb;
  for (int t = 0; t < kQmapSize; ++t) cb.qmap[t] = qmap[t];
  for (int t = 0; t < kQmapSize; ++t) cb.pairs[t] = make_float2(threshold(cb, t), threshold(cb, t + 1));
  bool fast = true;
  for (int e = 0; e < kLookup; ++e) fast = stage_bucket(cb, e) && fast;
  *exact = fast;
  int64_t mismatches = 0;
  uint32_t below = 0;  // the specification: #{i < 255 : threshold_spec(i) < x}
  auto compare = [&](float x) {
    while (below < kQmapSize - 1 && threshold_spec(qmap, static_cast<int>(below)) < x) ++below;
    mismatches += nearest_code(cb, x, fast) != below;
  };
  for (uint32_t bits = 0xBF800000u; bits > 0x80000000u; --bits) compare(from_bits(bits));  // -1 .. -min subnormal
  compare(from_bits(0x80000000u));                                                          // -0
  for (uint32_t bits = 0; bits <= 0x3F800000u; ++bits) compare(from_bits(bits));            // +0 .. 1
  return mismatches;
}
"""


@pytest.fixture(scope="module")
def emulated_kernel(tmp_path_factory):
    """csrc/cuda/adamw8bit.cu up to its launcher, compiled for the host against host_emulation.h."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (c++ or g++) to build the emulated CUDA kernel")
    source = (CSRC / "cuda" / "adamw8bit.cu").read_text()
    assert LAUNCHER in source, "adamw8bit.cu lost its launcher marker; update this test's emulation to match"
    source = source.replace("#include <cuda_runtime.h>", '#include "host_emulation.h"')
    source = source[:source.index(LAUNCHER)] + "}  // namespace\n}  // namespace astrobio::cuda\n"
    folder = tmp_path_factory.mktemp("emulated_cuda")
    (folder / "kernel.h").write_text(source)
    (folder / "harness.cpp").write_text(HARNESS)
    library = folder / "libemulated.so"
    built = subprocess.run([compiler, "-std=c++20", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
                            f"-I{folder}", f"-I{CSRC / 'cuda'}", str(folder / "harness.cpp"), "-o", str(library)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"the emulated CUDA kernel did not compile:\n{built.stderr[-4000:]}"
    return ctypes.CDLL(str(library))


def emulated_step(library, variant, param, grad, exp_avg, exp_avg_sq, absmax1, absmax2, qmap1, qmap2, param_bf16,
                  found_inf, lr, beta1, beta2, eps, weight_decay, grad_scale, step, seed):
    """The op's arguments, handed to the emulated kernel with the constants the C++ op layer makes."""
    c = R.StepConstants.make(lr, beta1, beta2, eps, weight_decay, step, grad_scale)
    constants = torch.tensor([c.beta1, c.beta2, c.one_minus_beta1, c.one_minus_beta2, c.eps, c.grad_scale, c.decay,
                              c.step_size, c.inv_bc2_sqrt], dtype=torch.float64).float()
    pointer = ctypes.c_void_p

    def address(t):
        return pointer(None if t is None else t.data_ptr())

    library.emulated_step(address(param), int(param.dtype == torch.bfloat16), address(grad),
                          int(grad.dtype == torch.bfloat16), address(exp_avg), address(exp_avg_sq),
                          int(exp_avg.dtype == torch.uint8), address(absmax1), address(absmax2), address(qmap1),
                          address(qmap2), address(param_bf16), address(found_inf), ctypes.c_int64(param.numel()),
                          address(constants), ctypes.c_uint32(seed & 0xFFFFFFFF), ctypes.c_uint(EMULATED_GRID),
                          ctypes.c_int(variant))


@pytest.mark.parametrize("n, variant, launch", EMULATED_CASES, ids=[f"{n}-{v}-variant{k}" for n, v, k in EMULATED_CASES])
def test_cuda_source_emulated_on_cpu_matches_reference(emulated_kernel, n, variant, launch):
    want = reference_result(n, variant, EMULATED_STEPS)
    step_fn = functools.partial(emulated_step, emulated_kernel, launch)
    got = run("emulated", n, variant, EMULATED_STEPS, step_fn, "cpu")
    for key, value in want.items():
        if value is None:
            assert got[key] is None
        else:
            assert_bitwise_equal(got[key], value, f"emulated CUDA kernel {key}")
    if variant == EDGE:  # block 0's subnormal absmax gave inverse 0 and the zero code: it decays to zero
        assert float(want["absmax1"][0]) == float(want["absmax2"][0]) == 0.0


def dense_near_zero_map() -> torch.Tensor:
    """A map with six codes below 2^-20: more thresholds in one lookup bucket than the fast path
    takes, so the kernel must continue the count."""
    values = torch.cat([torch.linspace(-1, 1, 250, dtype=torch.float64), torch.arange(1, 7) * 1e-8])
    return values.sort().values.float()


@pytest.mark.parametrize("name, qmap, fast", [("signed", R.dynamic_map(True), True),
                                              ("unsigned", R.dynamic_map(False), True),
                                              ("dense-near-zero", dense_near_zero_map(), False)],
                         ids=["signed", "unsigned", "dense-near-zero"])
def test_cuda_nearest_code_lookup_is_exact_for_every_fp32_in_unit_interval(emulated_kernel, name, qmap, fast):
    """Exhaustive (2^31 values per map): the direct lookup equals the specification's nearest code."""
    exact = ctypes.c_int(-1)
    emulated_kernel.emulated_lookup_mismatches.restype = ctypes.c_int64
    mismatches = emulated_kernel.emulated_lookup_mismatches(ctypes.c_void_p(qmap.contiguous().data_ptr()),
                                                            ctypes.byref(exact))
    assert exact.value == int(fast), f"{name}: the staging's two-compare check"
    assert mismatches == 0, f"{name}: {mismatches} values in [-1, 1] get another code than the specification"


# --- AdamW8bit: state_dict portability and convergence ---------------------------------------------

SHAPES = ((64, 100), (300,), (4097,), (50, 90))  # 8-bit, fp32 moments (small), 8-bit odd, bf16 master
OPT = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, seed=11)


def make_params(device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(5)
    values = [torch.randn(shape, generator=gen) for shape in SHAPES]
    values[-1] = values[-1].bfloat16()
    return [torch.nn.Parameter(v.to(device)) for v in values]


def train(opt: AdamW8bit, params: list[torch.nn.Parameter], steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(device=p.device, dtype=p.dtype)
        opt.step()


def copy_params(params: list[torch.nn.Parameter], device: str) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().to(device, copy=True)) for p in params]


def saved(opt: AdamW8bit) -> dict:
    """opt.state_dict() through torch.save / torch.load, as a checkpoint would carry it."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def continued(params: list[torch.nn.Parameter], device: str, backend: str, state: dict,
              steps: range) -> tuple[AdamW8bit, list[torch.nn.Parameter]]:
    params = copy_params(params, device)
    opt = AdamW8bit(params, backend=backend, **OPT)
    opt.load_state_dict(state)
    train(opt, params, steps)
    return opt, params


def assert_same_run(opt_a, params_a, opt_b, params_b, what: str) -> None:
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert_bitwise_equal(a.detach().cpu(), b.detach().cpu(), f"{what}: parameter {i}")
        for key, value in opt_a.state[a].items():
            if torch.is_tensor(value):
                assert_bitwise_equal(value.cpu(), opt_b.state[b][key].cpu(), f"{what}: parameter {i} {key}")
            else:
                assert value == opt_b.state[b][key], f"{what}: parameter {i} {key}"


@on_gpu
def test_state_dict_moves_between_cuda_cpu_and_triton():
    for backend in ("cuda", "triton"):
        require(backend)
    params = make_params(DEVICE)
    opt = AdamW8bit(params, backend="cuda", **OPT)
    train(opt, params, range(0, 5))
    state = saved(opt)
    snapshot = copy_params(params, "cpu")
    train(opt, params, range(5, 10))

    opt_cpu, params_cpu = continued(snapshot, "cpu", "cpu", state, range(5, 10))
    opt_triton, params_triton = continued(snapshot, DEVICE, "triton", state, range(5, 10))
    assert_same_run(opt, params, opt_cpu, params_cpu, "saved on CUDA, continued on the CPU")
    assert_same_run(opt, params, opt_triton, params_triton, "saved on CUDA, continued on Triton")

    back, params_back = continued(params_cpu, DEVICE, "cuda", saved(opt_cpu), range(10, 15))
    train(opt_cpu, params_cpu, range(10, 15))
    assert_same_run(opt_cpu, params_cpu, back, params_back, "saved on the CPU, continued on CUDA")


@on_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_step_never_waits_for_the_gpu(backend):
    """AdamW8bit.step() on CUDA tensors, by default and with found_inf on the device, issues no
    synchronizing CUDA call: the non-finite check and the skip stay on the device (the kernels read
    the flag). The first step, which allocates the state, runs before the check is switched on."""
    require(backend)
    params = make_params(DEVICE)
    opt = AdamW8bit(params, backend=backend, **OPT)
    train(opt, params, range(0, 1))
    for p in params:
        p.grad = torch.randn_like(p) * 0.1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.step(found_inf=torch.zeros(1, device=DEVICE))
        opt.step(found_inf=torch.ones(1, device=DEVICE))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def train_mlp(make_optimizer, steps: int = 100) -> tuple[float, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(DEVICE)
    x = torch.randn(512, 16, device=DEVICE)
    y = torch.sin(x[:, :4].sum(dim=1, keepdim=True)) + 0.1 * x[:, 4:5]
    opt = make_optimizer(model.parameters())
    with torch.no_grad():
        initial = torch.nn.functional.mse_loss(model(x), y).item()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return initial, torch.nn.functional.mse_loss(model(x), y).item()


@on_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_converges_like_torch_adamw(backend):
    require(backend)
    hyper = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    initial, final_8bit = train_mlp(lambda p: AdamW8bit(p, backend=backend, **hyper))
    _, final_torch = train_mlp(lambda p: torch.optim.AdamW(p, **hyper))
    assert final_torch < 0.05 * initial  # the run really trains
    # at 100 steps the loss still falls fast, so both runs are compared where they differ by training,
    # not by noise near zero (on the CPU kernel the two finish 1.4% apart)
    assert abs(final_8bit - final_torch) <= 0.15 * final_torch, (final_8bit, final_torch)


# --- the ops themselves -----------------------------------------------------------------------------

def op_args(n: int = 4097) -> tuple:
    state = {k: on_device(v, 0) for k, v in initial_state(n, "q8-bf16grad-fp32master-copy").items()}
    grad = torch.randn(n, device=DEVICE).bfloat16()
    return (state["param"], grad, state["exp_avg"], state["exp_avg_sq"], state["absmax1"], state["absmax2"],
            R.dynamic_map(True).to(DEVICE), R.dynamic_map(False).to(DEVICE), state["param_bf16"],
            torch.zeros(1, device=DEVICE), *HYPER.values(), 3, 12345)


@on_gpu
def test_opcheck_cuda_op():
    require("cuda")
    torch.library.opcheck(torch.ops.astrobio.adamw8bit_step.default, op_args())


@on_gpu
def test_opcheck_triton_op():
    require("triton")
    from astrobio.kernels import adamw8bit  # noqa: F401  (registers astrobio::adamw8bit_step_triton)

    torch.library.opcheck(torch.ops.astrobio.adamw8bit_step_triton.default, op_args())


@on_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_found_inf_on_the_host_is_refused(backend):
    require(backend)
    args = list(op_args(300))
    args[9] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="found_inf is on cpu"):
        ops.adamw8bit_step(backend, *args)


@on_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mixed_devices_are_refused(backend):
    require(backend)
    args = list(op_args(300))
    args[1] = args[1].cpu()
    with pytest.raises(RuntimeError, match="grad is on cpu"):
        ops.adamw8bit_step(backend, *args)
