"""The GPU backends of astrobio::adamw8bit_step (the CUDA kernel and the Triton kernel) against the
specification, on a CUDA GPU; the whole file is skipped without one.

- every backend against astrobio/optim/reference.py (run on the CPU) over 50 calls, bit for bit:
  sizes that do not divide the 256-element block, fp32/bf16 gradients, fp32 or bf16 stochastic-
  rounding masters, the bf16 copy, fp32 moments, tensors not aligned to 16 bytes, and found_inf on
  the device (one call is skipped);
- state_dict portability through astrobio.optim.AdamW8bit: saved on CUDA, continued on the CPU kernel
  and on Triton, and back, all bit for bit;
- convergence next to torch.optim.AdamW; torch.library.opcheck on CUDA tensors.
"""

import io

import pytest
import torch

from astrobio import ops
from astrobio.optim import reference as R
from astrobio.optim.adamw8bit import AdamW8bit

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")]

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
}
CASES = ([(n, v) for n in SIZES for v in VARIANTS]
         + [(LARGE, "q8-bf16grad-fp32master-copy"), (LARGE, "q8-bf16grad-bf16sr")])


def require(backend: str) -> None:
    try:
        ops.resolve_backend(backend, DEVICE)
    except RuntimeError as error:
        pytest.skip(str(error))


def calls() -> list[tuple[int, float, int]]:
    """(step, found_inf, seed) per call: found_inf is 0 except on the skipped call (a found_inf of None,
    the other compiled variant of the Triton kernel, is what AdamW8bit passes in the tests below), and
    the seeds use all 32 bits."""
    out, step = [], 0
    for call in range(1, STEPS + 1):
        flag = 1.0 if call == SKIPPED_CALL else 0.0
        step += flag != 1.0
        out.append((max(step, 1), flag, (call * 0x9E3779B1) & 0xFFFFFFFF))
    return out


def initial_state(n: int, variant: str) -> dict:
    """Random codes and absmax, so the first call already dequantizes."""
    quantized, param_dtype, _, copy, _ = VARIANTS[variant]
    gen = torch.Generator().manual_seed(n)
    state = {"param": torch.randn(n, generator=gen).to(param_dtype)}
    if quantized:
        state["exp_avg"] = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
        state["exp_avg_sq"] = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
        state["absmax1"] = torch.rand(R.num_blocks(n), generator=gen) * 1e-2
        state["absmax2"] = torch.rand(R.num_blocks(n), generator=gen) * 1e-4
    else:
        state["exp_avg"] = torch.randn(n, generator=gen) * 1e-2
        state["exp_avg_sq"] = torch.rand(n, generator=gen) * 1e-4
        state["absmax1"] = state["absmax2"] = torch.empty(0)
    state["param_bf16"] = torch.full((n,), float("nan"), dtype=torch.bfloat16) if copy else None
    return state


def gradients(n: int, variant: str):
    """One gradient per call, spanning five decades, so blocks use the whole range of the maps."""
    grad_dtype = VARIANTS[variant][2]
    gen = torch.Generator().manual_seed(10_000 + n)
    for _ in range(STEPS):
        yield (torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-4, 1, generator=gen)).to(grad_dtype)


def on_device(t: torch.Tensor | None, offset: int) -> torch.Tensor | None:
    """A contiguous CUDA copy of t that starts `offset` elements into a larger buffer."""
    if t is None:
        return None
    buffer = torch.empty(t.numel() + offset, dtype=t.dtype, device=DEVICE)
    view = buffer[offset:]
    view.copy_(t)
    return view


def run(backend: str, n: int, variant: str) -> dict:
    """All calls with one backend; the reference runs on the CPU, the GPU backends on CUDA tensors."""
    offset = VARIANTS[variant][4]
    device = "cpu" if backend == "reference" else DEVICE
    state = initial_state(n, variant)
    if backend != "reference":
        state = {k: on_device(v, offset if k not in ("absmax1", "absmax2") else 0) for k, v in state.items()}
    qmap1, qmap2 = R.dynamic_map(True).to(device), R.dynamic_map(False).to(device)
    for (step, flag, seed), grad in zip(calls(), gradients(n, variant)):
        found_inf = torch.tensor([flag], device=device)
        grad = grad if backend == "reference" else on_device(grad, offset)
        ops.adamw8bit_step(backend, state["param"], grad, state["exp_avg"], state["exp_avg_sq"], state["absmax1"],
                           state["absmax2"], qmap1, qmap2, state["param_bf16"], found_inf, *HYPER.values(), step,
                           seed)
    return {k: (v.cpu() if v is not None else None) for k, v in state.items()}


_reference_cache: dict[tuple[int, str], dict] = {}


def reference_result(n: int, variant: str) -> dict:
    if (n, variant) not in _reference_cache:
        _reference_cache[(n, variant)] = run("reference", n, variant)
    return _reference_cache[(n, variant)]


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    differ = got.view(torch.uint8) != want.view(torch.uint8)
    if bool(differ.any()):
        where = differ.nonzero().flatten()
        raise AssertionError(f"{what}: {where.numel()} bytes differ, first at byte "
                             f"{where[:6].tolist()}")


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
    assert bool(want["param"].float().isfinite().all())


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


def test_opcheck_cuda_op():
    require("cuda")
    torch.library.opcheck(torch.ops.astrobio.adamw8bit_step.default, op_args())


def test_opcheck_triton_op():
    require("triton")
    from astrobio.kernels import adamw8bit  # noqa: F401  (registers astrobio::adamw8bit_step_triton)

    torch.library.opcheck(torch.ops.astrobio.adamw8bit_step_triton.default, op_args())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_found_inf_on_the_host_is_refused(backend):
    require(backend)
    args = list(op_args(300))
    args[9] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="found_inf is on cpu"):
        ops.adamw8bit_step(backend, *args)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mixed_devices_are_refused(backend):
    require(backend)
    args = list(op_args(300))
    args[1] = args[1].cpu()
    with pytest.raises(RuntimeError, match="grad is on cpu"):
        ops.adamw8bit_step(backend, *args)
