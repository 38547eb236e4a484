"""The C++ CPU layer ops (astrobio.model.cpu_layers: RMSNorm with the residual add, rotary of q and k,
silu(gate) * up) against plain PyTorch references written here, forward and backward, and the whole
tiny model with ``use_kernels(model, "fused")`` on the CPU against the eager model.

References run in fp64 on the same inputs (the residual add rounded to the stream's dtype, as the
model's x + residual does). Tolerances, as |op - reference| <= atol + rtol * |reference|: fp32 outputs
1e-5 / 1e-6, fp32 gradients 1e-5 / 1e-5 (a row's sums are reassociated); bf16 1e-2 / 1e-2 (the op
rounds once to bf16, an ulp is 2**-8 relative). Rotary is the same fp32 operations as the model's
``apply_rotary`` and must equal it bit for bit, in both dtypes. Every SIMD path this CPU has must equal
the default one bit for bit, and the results must not depend on the number of threads.
"""

import pytest
import torch
import torch.nn.functional as F

from astrobio import ops

pytestmark = pytest.mark.skipif(ops.cpu_layer_kernels_unavailable() is not None,
                                reason=str(ops.cpu_layer_kernels_unavailable()))

if ops.cpu_layer_kernels_unavailable() is None:
    from astrobio import _C
    from astrobio.model import cpu_layers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OUT_TOL = {"fp32": (1e-5, 1e-6), "bf16": (1e-2, 1e-2)}  # (rtol, atol)
GRAD_TOL = {"fp32": (1e-5, 1e-5), "bf16": (1e-2, 1e-2)}
EPS = 1e-5

# shapes: one row, d not a multiple of 16, many short rows, 3-D and 4-D inputs
RMSNORM_SHAPES = [(1, 128), (255, 257), (4097, 16), (3, 5, 4097), (2, 3, 4, 20)]
ROTARY_SHAPES = [(1, 1, 1, 2), (1, 255, 3, 16), (2, 257, 2, 6), (2, 5, 34, 128), (8, 128, 4, 32)]
SWIGLU_SHAPES = [(1,), (255,), (257,), (3, 4097), (8, 128, 352)]


def worst_excess(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> float:
    """max(|got - want| - atol - rtol |want|): <= 0 passes."""
    return ((got.double() - want).abs() - atol - rtol * want.abs()).max().item() if want.numel() else 0.0


def rmsnorm_ref(x, weight, residual, dtype):
    h = x if residual is None else (x + residual).to(dtype).double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * weight, h


def rotary_ref(x, cos, sin):
    """The model's own rotary (astrobio.model.transformer.apply_rotary)."""
    from astrobio.model.transformer import apply_rotary
    return apply_rotary(x, cos, sin)


def silu_mul_ref(gate, up):
    return F.silu(gate) * up


def randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def grads_of(outputs, inputs, seed, dtype):
    """Gradients of ``inputs`` for random output gradients of ``dtype`` (the same values for the op and,
    in fp64, for the reference)."""
    upstream = [randn(o.shape, dtype, seed + i).to(o.dtype) for i, o in enumerate(outputs)]
    return torch.autograd.grad(outputs, inputs, upstream)


def check(got, want, dname, tol):
    assert got.dtype == DTYPES[dname], f"the op must keep the inputs' dtype, got {got.dtype}"
    excess = worst_excess(got, want.detach(), *tol[dname])
    assert excess <= 0, f"off by {excess:.3g} beyond the tolerance {tol[dname]}"


# ------------------------------------------------------------------------------ RMSNorm

@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("shape", RMSNORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rmsnorm_matches_reference(shape, dname, with_residual):
    dtype = DTYPES[dname]
    x = randn(shape, dtype, 1).requires_grad_()
    residual = randn(shape, dtype, 2).requires_grad_() if with_residual else None
    weight = (1 + randn(shape[-1:], torch.float32, 3, 0.1)).requires_grad_()
    y, h = cpu_layers.rmsnorm(x, weight, EPS, residual=residual)
    inputs = [t for t in (x, residual, weight) if t is not None]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref, h_ref = rmsnorm_ref(ref_inputs[0], ref_inputs[-1], ref_inputs[1] if with_residual else None, dtype)
    check(y, y_ref, dname, OUT_TOL)
    check(h, h_ref, dname, OUT_TOL)
    # the residual stream h carries its own gradient (the next block's input), as in the model
    outputs, ref_outputs = ([y, h], [y_ref, h_ref]) if with_residual else ([y], [y_ref])
    for got, want, t in zip(grads_of(outputs, inputs, 4, dtype), grads_of(ref_outputs, ref_inputs, 4, dtype), inputs):
        assert got.dtype == t.dtype
        excess = worst_excess(got, want, *GRAD_TOL[dname])
        assert excess <= 0, f"a gradient is off by {excess:.3g} beyond the tolerance {GRAD_TOL[dname]}"


def test_rmsnorm_of_non_contiguous_inputs_and_mixed_dtypes():
    """A transposed x, an fp32 residual stream with a bf16 branch output (promoted, as x + residual is),
    and a bf16 weight."""
    x = randn((64, 40), torch.float32, 5).t()
    branch = randn((40, 64), torch.bfloat16, 6)
    weight = randn((64,), torch.bfloat16, 7)
    y, h = cpu_layers.rmsnorm(branch, weight, EPS, residual=x)
    y_ref, h_ref = rmsnorm_ref(branch.double(), weight.double(), x.double(), torch.float32)
    check(h, h_ref, "fp32", OUT_TOL)
    check(y, y_ref, "fp32", OUT_TOL)
    y, h = cpu_layers.rmsnorm(x, weight, EPS)
    assert h is x
    check(y, rmsnorm_ref(x.double(), weight.double(), None, torch.float32)[0], "fp32", OUT_TOL)


def test_rmsnorm_rstd_and_empty_h_without_a_residual():
    x, weight = randn((3, 4, 24), torch.float32, 8), randn((24,), torch.float32, 9)
    y, h, rstd = torch.ops.astrobio.rmsnorm_forward_cpu(x, None, weight, EPS)
    assert h.numel() == 0 and rstd.shape == (3, 4) and rstd.dtype == torch.float32
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + EPS), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------ rotary

def rotary_inputs(shape, dtype, seed):
    from astrobio.model.transformer import rotary_tables
    q, k = randn(shape, dtype, seed), randn(shape, dtype, seed + 1)
    cos, sin = rotary_tables(shape[1], shape[3], 10000.0, "cpu", offset=3)
    return q, k, cos, sin


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rotary_equals_the_models_rotary_bit_for_bit(shape, dname):
    q, k, cos, sin = rotary_inputs(shape, DTYPES[dname], 10)
    q, k = q.requires_grad_(), k.requires_grad_()
    q_out, k_out = cpu_layers.rotary(q, k, cos, sin)
    q_ref, k_ref = rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    dq_out, dk_out = randn(shape, q.dtype, 12), randn(shape, q.dtype, 13)
    got = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    want = torch.autograd.grad((q_ref, k_ref), (q, k), (dq_out, dk_out))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_rotary_of_non_contiguous_q_and_k():
    """q and k as the attention makes them from one fused projection: views with strides."""
    shape = (2, 9, 3, 8)
    qkv = randn((2, 9, 3 * 3 * 8), torch.float32, 14)
    q, k, _ = (t.reshape(shape) for t in qkv.split(24, dim=-1))
    q_t = randn((2, 3, 9, 8), torch.float32, 15).transpose(1, 2)  # [batch, heads, seq, d] viewed as [b, s, h, d]
    _, _, cos, sin = rotary_inputs(shape, torch.float32, 16)
    for a, b in ((q, k), (q_t, k)):
        q_out, k_out = cpu_layers.rotary(a, b, cos, sin)
        assert torch.equal(q_out, rotary_ref(a, cos, sin)) and torch.equal(k_out, rotary_ref(b, cos, sin))


# ------------------------------------------------------------------------------ silu(gate) * up

@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_silu_mul_matches_reference(shape, dname):
    dtype = DTYPES[dname]
    gate, up = randn(shape, dtype, 20, 4.0).requires_grad_(), randn(shape, dtype, 21).requires_grad_()
    out = cpu_layers.silu_mul(gate, up)
    ref_inputs = [t.detach().double().requires_grad_() for t in (gate, up)]
    want = silu_mul_ref(*ref_inputs)
    check(out, want, dname, OUT_TOL)
    for got, ref, t in zip(grads_of([out], [gate, up], 22, dtype), grads_of([want], ref_inputs, 22, dtype), (gate, up)):
        assert got.dtype == t.dtype
        excess = worst_excess(got, ref, *GRAD_TOL[dname])
        assert excess <= 0, f"a gradient is off by {excess:.3g} beyond the tolerance {GRAD_TOL[dname]}"


def test_silu_mul_at_extreme_and_special_gates():
    """The exponential's range ends (its overflow to inf and underflow to 0), infinities and NaN."""
    gate = torch.tensor([0.0, -0.0, 1e-30, -20.0, 20.0, -87.0, -88.5, -89.0, -103.0, -105.0, 88.0, 88.8, 89.5,
                         150.0, -150.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")])
    up = torch.linspace(-2.0, 3.0, gate.numel())
    dout = torch.linspace(1.0, -1.0, gate.numel())
    out = cpu_layers.silu_mul(gate, up)
    want = (F.silu(gate.double()) * up.double()).float()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-30, equal_nan=True)
    dgate, dup = torch.ops.astrobio.silu_mul_backward_cpu(dout, gate, up)
    g = gate.double().requires_grad_()
    u = up.double().requires_grad_()
    (F.silu(g) * u).backward(dout.double())
    torch.testing.assert_close(dup, u.grad.float(), rtol=1e-6, atol=1e-30, equal_nan=True)
    finite = gate.abs() < 1e29  # where the gradient formula is finite (at +-inf it is nan in both, or not)
    torch.testing.assert_close(dgate[finite], g.grad.float()[finite], rtol=1e-6, atol=1e-30, equal_nan=True)


def test_silu_mul_of_non_contiguous_inputs():
    gate_up = randn((16, 2 * 40), torch.float32, 23)
    gate, up = gate_up.split(40, dim=-1)
    torch.testing.assert_close(cpu_layers.silu_mul(gate, up), silu_mul_ref(gate, up), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ paths, threads, opcheck, errors

def all_ops_outputs(dtype, rows=37):
    """Forward and backward outputs of every op on odd shapes."""
    x, r, w = randn((rows, 131), dtype, 30), randn((rows, 131), dtype, 31), randn((131,), torch.float32, 32)
    y, h, rstd = torch.ops.astrobio.rmsnorm_forward_cpu(x, r, w, EPS)
    dy, dh = randn((rows, 131), dtype, 33), randn((rows, 131), dtype, 34)
    outs = [y, h, rstd, *torch.ops.astrobio.rmsnorm_backward_cpu(dy, dh, h, w, rstd),
            *torch.ops.astrobio.rmsnorm_backward_cpu(dy, None, h, w, rstd)]
    q, k, cos, sin = rotary_inputs((3, rows, 5, 22), dtype, 35)
    outs += [*torch.ops.astrobio.rotary_cpu(q, k, cos, sin), *torch.ops.astrobio.rotary_backward_cpu(q, k, cos, sin)]
    gate, up, dout = (randn((rows, 1001), dtype, seed, scale) for seed, scale in ((36, 5.0), (37, 1.0), (38, 1.0)))
    outs += [torch.ops.astrobio.silu_mul_cpu(gate, up), *torch.ops.astrobio.silu_mul_backward_cpu(dout, gate, up)]
    return outs


@pytest.mark.parametrize("dname", list(DTYPES))
def test_every_simd_path_gives_the_same_bits(monkeypatch, dname):
    monkeypatch.delenv("ASTROBIO_CPU_SIMD", raising=False)
    default = all_ops_outputs(DTYPES[dname])
    for path in _C.cpu_simd_paths():
        monkeypatch.setenv("ASTROBIO_CPU_SIMD", path)
        assert _C.simd_path() == path
        for i, (a, b) in enumerate(zip(all_ops_outputs(DTYPES[dname]), default)):
            assert torch.equal(a, b), f"path {path}: output {i} differs from the default path's"


def test_results_do_not_depend_on_the_number_of_threads():
    """Shapes of several tasks each (2**15 elements a task); the weight gradient of RMSNorm sums fixed
    blocks of rows in a fixed order."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = all_ops_outputs(torch.float32, rows=600)
        torch.set_num_threads(max(2, threads))
        many = all_ops_outputs(torch.float32, rows=600)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def opcheck_cases():
    x, r = randn((5, 3, 24), torch.float32, 40), randn((5, 3, 24), torch.float32, 41)
    w = randn((24,), torch.float32, 42)
    y, h, rstd = torch.ops.astrobio.rmsnorm_forward_cpu(x, r, w, EPS)
    q, k, cos, sin = rotary_inputs((2, 6, 3, 8), torch.float32, 43)
    gate, up = randn((4, 33), torch.float32, 44), randn((4, 33), torch.float32, 45)
    grad = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    return {
        "rmsnorm_forward": ("rmsnorm_forward_cpu", (grad(x), None, grad(w), EPS)),
        "rmsnorm_forward_residual": ("rmsnorm_forward_cpu", (grad(x), grad(r), grad(w), EPS)),
        "rmsnorm_backward": ("rmsnorm_backward_cpu", (y, h, h, w, rstd)),
        "rotary": ("rotary_cpu", (grad(q), grad(k), cos, sin)),
        "rotary_backward": ("rotary_backward_cpu", (q, k, cos, sin)),
        "silu_mul": ("silu_mul_cpu", (grad(gate), grad(up))),
        "silu_mul_backward": ("silu_mul_backward_cpu", (gate, gate, up)),
    }


@pytest.mark.parametrize("case", ["rmsnorm_forward", "rmsnorm_forward_residual", "rmsnorm_backward", "rotary",
                                  "rotary_backward", "silu_mul", "silu_mul_backward"])
def test_opcheck(case):
    name, args = opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.astrobio, name).default, args)


def test_bad_arguments_get_clear_errors():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16, got Double"):
        torch.ops.astrobio.rmsnorm_forward_cpu(x.double(), None, w, EPS)
    with pytest.raises(RuntimeError, match="the rows have 8 features but weight has 7"):
        torch.ops.astrobio.rmsnorm_forward_cpu(x, None, w[:7], EPS)
    with pytest.raises(RuntimeError, match="residual has shape .* but x has"):
        torch.ops.astrobio.rmsnorm_forward_cpu(x, x[:2], w, EPS)
    with pytest.raises(RuntimeError, match="residual is BFloat16 but x is Float"):
        torch.ops.astrobio.rmsnorm_forward_cpu(x, x.bfloat16(), w, EPS)
    with pytest.raises(RuntimeError, match="rstd must be a float32 CPU tensor of one entry per row"):
        torch.ops.astrobio.rmsnorm_backward_cpu(x, None, x, w, torch.ones(3))
    q, k, cos, sin = rotary_inputs((1, 4, 2, 6), torch.float32, 50)
    with pytest.raises(RuntimeError, match=r"k has shape .* but q has"):
        torch.ops.astrobio.rotary_cpu(q, k[:, :, :1], cos, sin)
    with pytest.raises(RuntimeError, match=r"cos has shape \[4, 2\], expected \[seq, head_dim / 2\] = \[4, 3\]"):
        torch.ops.astrobio.rotary_cpu(q, k, cos[:, :2], sin)
    with pytest.raises(RuntimeError, match="sin must be a float32 CPU tensor"):
        torch.ops.astrobio.rotary_cpu(q, k, cos, sin.double())
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        torch.ops.astrobio.rotary_cpu(q[..., :5], k[..., :5], cos, sin)
    with pytest.raises(RuntimeError, match=r"must be \[batch, seq, heads, head_dim\]"):
        torch.ops.astrobio.rotary_cpu(q[0], k[0], cos, sin)
    with pytest.raises(RuntimeError, match="gate must be float32 or bfloat16, got Half"):
        torch.ops.astrobio.silu_mul_cpu(x.half(), x.half())
    with pytest.raises(RuntimeError, match="up is BFloat16 but gate is Float"):
        torch.ops.astrobio.silu_mul_cpu(x, x.bfloat16())
    with pytest.raises(ValueError, match="residual .* must have x's shape"):
        cpu_layers.rmsnorm(x, w, EPS, residual=x[:1])


# ------------------------------------------------------------------------------ the model

def loss_and_grads(model, tokens):
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_fused_tiny_model_on_the_cpu_matches_eager(monkeypatch, checkpointing):
    """Loss and every parameter gradient within fp32 tolerance (1e-4 relative, 1e-6 absolute: the
    kernels' sums are reassociated against eager's, over 4 blocks), with every block's attention through
    the C++ causal attention (counted: once per block, twice with checkpointing's recompute)."""
    from astrobio.model import build_model, get_config, transformer, use_kernels
    from astrobio.model.fast import load_cpu_fused_ops
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = get_config("tiny", vocab_size=259)
    tokens = torch.randint(0, config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(60))
    eager, fused = build_model(config, seed=5), build_model(config, seed=5)
    for model in (eager, fused):
        model.gradient_checkpointing = checkpointing
    assert use_kernels(fused, "fused") == "fused"
    assert transformer.FUSED["cpu"] is load_cpu_fused_ops()
    calls = []
    real = torch.ops.astrobio.causal_attention_cpu
    monkeypatch.setattr(cpu_layers.torch.ops.astrobio, "causal_attention_cpu",
                        lambda *a: calls.append(1) or real(*a), raising=False)
    names = [n for n, _ in fused.named_parameters()]
    for name, a, b in zip(["loss"] + names, loss_and_grads(fused, tokens), loss_and_grads(eager, tokens)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert len(calls) == config.n_layers * (2 if checkpointing else 1)


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_fused_tiny_model_on_the_cpu_in_bf16_matches_eager(precision):
    """bf16 weights and activations, or bf16 autocast over fp32 weights (the trainer's mixed precision):
    the loss and every gradient within 3e-2 of eager's, as the relative error of the tensor's norm
    (|a - b| / |b|; both round to bf16, in different places: 1.1e-2 at worst here; gradients as small as
    2e-4 rule out an absolute tolerance)."""
    from astrobio.model import build_model, get_config, use_kernels
    config = get_config("tiny", vocab_size=259)
    tokens = torch.randint(0, config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(63))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    eager, fused = build_model(config, seed=5, dtype=dtype), build_model(config, seed=5, dtype=dtype)
    assert use_kernels(fused, "fused") == "fused"
    results = []
    for model in (fused, eager):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    names = ["loss"] + [n for n, _ in fused.named_parameters()]
    for name, a, b in zip(names, *results):
        assert a.dtype == b.dtype
        error = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert error <= 3e-2, f"{name}: relative error {error:.3g}"


def test_the_fused_ops_follow_the_device_and_the_interpreter(monkeypatch):
    """The C++ ops on the CPU; the Triton interpreter's kernels on the CPU under TRITON_INTERPRET=1, where
    torch.compile is refused (it cannot trace them) but not with the C++ ops."""
    pytest.importorskip("triton")
    from astrobio.model import build_model, get_config, transformer, use_kernels
    from astrobio.model.fast import compile_unsupported, load_cpu_fused_ops, load_fused_ops
    config = get_config("tiny", vocab_size=259)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    load_fused_ops()  # triton imported here, not under the variable set below (nothing is interpreted here)
    model = build_model(config)
    assert use_kernels(model, "fused") == "fused"
    assert transformer.FUSED["cpu"] is load_cpu_fused_ops()
    reason = compile_unsupported(model)
    assert reason is None or "interpreter" not in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_kernels(model, "fused") == "fused"
    assert transformer.FUSED["cpu"] is load_fused_ops()
    assert "interpreter" in compile_unsupported(model)
    monkeypatch.delenv("TRITON_INTERPRET")
    use_kernels(model, "fused")
    assert transformer.FUSED["cpu"] is load_cpu_fused_ops()


def test_the_fused_loss_on_the_cpu_calls_the_head():
    """No chunked loss on the CPU: the head runs (its forward pre-hooks and hooks fire, once)."""
    from astrobio.model import build_model, get_config, use_kernels
    config = get_config("tiny", vocab_size=259)
    model = build_model(config, seed=6)
    assert use_kernels(model, "fused") == "fused"
    calls = []
    model.head.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    model.head.register_forward_hook(lambda module, args, out: calls.append("post"))
    tokens = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(61))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert calls == ["pre", "post"]
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_compiled_fused_blocks_on_the_cpu_match_eager():
    """torch.compile traces through the C++ ops (their fake kernels) into the blocks' graphs."""
    from astrobio.model import ModelConfig, build_model, compile_blocks, use_kernels
    config = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, ffn_hidden=176, max_seq_len=64)
    tokens = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(62))
    eager, fast = build_model(config, seed=7), build_model(config, seed=7)
    assert use_kernels(fast, "fused") == "fused"
    if not compile_blocks(fast):
        pytest.skip("torch.compile is unsupported here")
    for a, b in zip(loss_and_grads(fast, tokens), loss_and_grads(eager, tokens)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
