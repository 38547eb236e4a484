"""The model's Triton kernels (astrobio.kernels.rmsnorm, .rotary, .swiglu, .cross_entropy) against plain
PyTorch references written here, forward and backward, on the CPU.

Triton's interpreter must be switched on (TRITON_INTERPRET=1) before triton is imported, so every
case runs in one child process (this file run as a script), which compares each op's outputs and
input gradients with the reference on the same inputs in fp64 and reports the worst error per case;
the tests here check each report against the case's tolerance. The child also runs
``torch.library.opcheck`` on every op (schema, fake kernel, autograd registration, AOT dispatch).

Tolerances, as |kernel - fp64 reference| <= atol + rtol * |reference|: fp32 1e-5 / 1e-5 for outputs
and 1e-4 / 1e-4 for gradients (sums over rows and over the vocabulary reassociate); bf16 2e-2 / 2e-2
(a bf16 ulp is 2**-8 relative: the kernel rounds once, the comparison allows a few ulps).

NOTE: the interpreter truncates on a plain fp32 -> bf16 cast where the GPU rounds to nearest even, so
bf16 results here carry a truncation bias the compiled kernels do not have (the fused tiny model's
worst bf16 gradient is 3e-2 from fp32 here, eager's 1e-2); the tests marked ``gpu`` check the
compiled kernels against the same references.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

SIZES = (1, 255, 257, 4097)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": ((1e-5, 1e-5), (1e-4, 1e-4)), "bf16": ((2e-2, 2e-2), (2e-2, 2e-2))}
CHILD_TIMEOUT_S = 600

# name: shape arguments of make_inputs
RMSNORM = {"1x128": (1, 128), "255x257": (255, 257), "257x64": (257, 64), "3x4097": (3, 4097)}
ROTARY = {"1x1x1x2": (1, 1, 1, 2), "1x255x3x16": (1, 255, 3, 16), "1x257x2x6": (1, 257, 2, 6),
          "1x5x34x128": (1, 5, 34, 128)}
SWIGLU = {f"{n}": (n,) for n in SIZES} | {"3x4097": (3, 4097)}
# (tokens, vocab, d_model, chunk_tokens)
CROSS_ENTROPY = {"1x7x16": (1, 7, 16, 4), "255x257x32": (255, 257, 32, 100), "257x4097x16": (257, 4097, 16, 64),
                 "513x255x8": (513, 255, 8, 200)}
CASES = ([f"rmsnorm-{s}-{d}" for s in RMSNORM for d in DTYPES]
         + [f"rmsnorm_residual-{s}-{d}" for s in RMSNORM for d in DTYPES]
         + [f"rotary-{s}-{d}" for s in ROTARY for d in DTYPES] + [f"swiglu-{s}-{d}" for s in SWIGLU for d in DTYPES]
         + [f"cross_entropy-{s}-{d}" for s in CROSS_ENTROPY for d in DTYPES])
OPCHECKS = ["rmsnorm_forward", "rmsnorm_forward_residual", "rmsnorm_backward", "rotary", "rotary_backward",
            "silu_mul", "silu_mul_backward", "linear_cross_entropy"]


# ------------------------------------------------------------------------------ references (fp64)

def rmsnorm_ref(x, weight, eps, residual=None, dtype=torch.float64):
    """The residual add rounds to the stream's dtype (as the model's x + residual does)."""
    h = x if residual is None else (x + residual).to(dtype).double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight, h


def rotary_ref(x, cos, sin):
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def silu_mul_ref(gate, up):
    return gate / (1 + torch.exp(-gate)) * up


def cross_entropy_ref(hidden, weight, targets, ignore_index=-100):
    logits = hidden @ weight.T
    valid = targets != ignore_index
    lse = torch.logsumexp(logits, -1)
    picked = logits.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    return ((lse - picked) * valid).sum() / valid.sum().clamp(min=1)


# ------------------------------------------------------------------------------ the child process

def make_inputs(case: str) -> tuple[list[torch.Tensor], dict]:
    """Inputs in the case's dtype (requiring grad) and the fixed arguments."""
    kind, shape, dname = case.split("-")
    dtype = DTYPES[dname]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    randn = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    if kind.startswith("rmsnorm"):
        rows, cols = RMSNORM[shape]
        tensors = [randn(rows, cols) * 3, 1 + 0.1 * randn(cols)]
        if kind == "rmsnorm_residual":
            tensors.append(randn(rows, cols))
        return tensors, {"eps": 1e-5, "dtype": dtype}
    if kind == "rotary":
        b, t, h, hd = ROTARY[shape]
        angles = torch.rand(t, hd // 2, generator=gen, dtype=torch.float64) * 100
        return [randn(b, t, h, hd), randn(b, t, h, hd)], {"cos": angles.cos().float(), "sin": angles.sin().float()}
    if kind == "swiglu":
        s = SWIGLU[shape]
        return [randn(*s) * 4, randn(*s)], {}
    n, v, d, chunk = CROSS_ENTROPY[shape]
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::7] = -100  # ignored positions (padding, prefix positions)
    return [randn(n, d), randn(v, d) * 0.5], {"targets": targets, "chunk_tokens": chunk}


def run_kernel(kind: str, tensors: list[torch.Tensor], fixed: dict) -> list[torch.Tensor]:
    from astrobio.kernels import cross_entropy, rmsnorm, rotary, swiglu
    if kind.startswith("rmsnorm"):
        residual = tensors[2] if len(tensors) > 2 else None
        y, h = rmsnorm.rmsnorm(tensors[0], tensors[1], fixed["eps"], residual)
        return [y, h] if residual is not None else [y]
    if kind == "rotary":
        return list(rotary.rotary(*tensors, fixed["cos"], fixed["sin"]))
    if kind == "swiglu":
        return [swiglu.silu_mul(*tensors)]
    return [cross_entropy.linear_cross_entropy(*tensors, fixed["targets"], chunk_tokens=fixed["chunk_tokens"])]


def run_reference(kind: str, tensors: list[torch.Tensor], fixed: dict) -> list[torch.Tensor]:
    if kind.startswith("rmsnorm"):
        residual = tensors[2] if len(tensors) > 2 else None
        y, h = rmsnorm_ref(tensors[0], tensors[1], fixed["eps"], residual, fixed["dtype"])
        return [y, h] if residual is not None else [y]
    if kind == "rotary":
        return [rotary_ref(t, fixed["cos"].double(), fixed["sin"].double()) for t in tensors]
    if kind == "swiglu":
        return [silu_mul_ref(*tensors)]
    return [cross_entropy_ref(*tensors, fixed["targets"])]


def worst_excess(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> float:
    """max(|got - want| - atol - rtol |want|): <= 0 passes."""
    return ((got.double() - want).abs() - atol - rtol * want.abs()).max().item() if want.numel() else 0.0


def check_case(case: str, device: str = "cpu") -> dict:
    """The worst tolerance excess of the outputs and of the input gradients (<= 0 passes)."""
    kind, _, dname = case.split("-")
    (out_rtol, out_atol), (grad_rtol, grad_atol) = TOLERANCE[dname]
    tensors, fixed = make_inputs(case)
    tensors = [t.to(device) for t in tensors]
    fixed = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fixed.items()}
    inputs = [t.clone().requires_grad_() for t in tensors]
    ref_inputs = [t.double().requires_grad_() for t in tensors]
    got, want = run_kernel(kind, inputs, fixed), run_reference(kind, ref_inputs, fixed)
    gen = torch.Generator().manual_seed(7)
    upstream = [torch.randn(w.shape, generator=gen).to(g) for w, g in zip(want, got)]  # one rounding
    torch.autograd.backward(got, upstream)
    torch.autograd.backward(want, [u.double() for u in upstream])
    output = max(worst_excess(g, w.detach(), out_rtol, out_atol) for g, w in zip(got, want))
    grads = max(worst_excess(a.grad, b.grad, grad_rtol, grad_atol) for a, b in zip(inputs, ref_inputs))
    dtypes_kept = all(g.dtype == t.dtype for g, t in zip(got, tensors)) or kind == "cross_entropy"
    return {"output": output, "grads": grads, "dtypes_kept": dtypes_kept}


def opcheck_args(name: str) -> tuple:
    gen = torch.Generator().manual_seed(3)
    r = lambda *s, grad=True: torch.randn(*s, generator=gen).requires_grad_(grad)  # noqa: E731
    angles = torch.rand(9, 4, generator=gen)
    return {
        "rmsnorm_forward": (r(9, 33), None, r(33), 1e-5),
        "rmsnorm_forward_residual": (r(9, 33), r(9, 33), r(33), 1e-5),
        "rmsnorm_backward": (r(9, 33, grad=False), r(9, 33, grad=False), r(9, 33, grad=False),
                             r(33, grad=False), torch.rand(9, generator=gen) + 0.5),
        "rotary": (r(2, 9, 3, 8), r(2, 9, 3, 8), angles.cos(), angles.sin()),
        "rotary_backward": (r(2, 9, 3, 8, grad=False), r(2, 9, 3, 8, grad=False), angles.cos(), angles.sin()),
        "silu_mul": (r(5, 37), r(5, 37)),
        "silu_mul_backward": (r(5, 37, grad=False), r(5, 37, grad=False), r(5, 37, grad=False)),
        "linear_cross_entropy": (r(11, 8), r(19, 8), torch.randint(0, 19, (11,), generator=gen), -100, 4, True),
    }[name]


def run_opcheck(name: str, device: str = "cpu") -> str | None:
    """opcheck's report; on the CPU without AOT dispatch (the interpreter's kernels cannot be traced)."""
    op = getattr(torch.ops.astrobio, name.removesuffix("_residual")).default
    args = tuple(a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in opcheck_args(name))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    try:
        torch.library.opcheck(op, args, test_utils=utils if device == "cpu" else torch.library._OPCHECK_DEFAULT_UTILS)
    except Exception as error:  # noqa: BLE001  (reported to the parent, which fails the test)
        return f"{type(error).__name__}: {str(error)[:2000]}"
    return None


MODEL_CASES = ["fp32", "bf16", "fp32-checkpointing-prefix", "autocast-stages", "fp32-projections", "bf16-projections"]
MODEL_TOLERANCE = {"fp32": (1e-4, 1e-5), "bf16": (3e-2, 3e-2), "autocast": (3e-2, 3e-2)}  # (rtol, atol)


def check_model(case: str) -> dict:
    """The tiny-shaped model's loss and every parameter's gradient, fused kernels (with the fused q, k, v
    and gate, up products in the "projections" cases) vs eager; the worst tolerance excess (<= 0 passes)."""
    from astrobio.model import ModelConfig, build_model, fuse_projections, split_model, use_kernels
    precision = case.split("-")[0]
    rtol, atol = MODEL_TOLERANCE[precision]
    config = ModelConfig(vocab_size=300, d_model=64, n_layers=3, n_heads=4, ffn_hidden=176, max_seq_len=64)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, config.vocab_size, (2, 17), generator=gen)
    prefix = torch.randn(2, 3, config.d_model, generator=gen).to(dtype) if "prefix" in case else None
    results = []
    for kernels in ("eager", "fused"):
        model = build_model(config, seed=2, dtype=dtype)
        assert use_kernels(model, kernels) == kernels
        fuse_projections(model, kernels == "fused" and "projections" in case)
        model.gradient_checkpointing = "checkpointing" in case
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            if "stages" in case:
                first, last = split_model(model, [1, 2])
                loss = last.loss(first(tokens[:, :-1]), tokens[:, 1:])
            else:
                loss = model.loss(tokens[:, :-1], tokens[:, 1:], prefix=prefix)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_e, grads_e), (loss_f, grads_f) = results
    excess = max(worst_excess(f, e.double(), rtol, atol) for f, e in zip([loss_f] + grads_f, [loss_e] + grads_e))
    return {"output": excess, "grads": excess, "dtypes_kept": True}


SAVED_CASES = ["fp32", "bf16", "autocast"]


def check_saved_bytes(case: str) -> dict:
    """What autograd keeps for one fused block against astrobio.memory.activations' count (kernels="fused");
    the relative difference, as tests/test_memory_planner.py checks the eager block."""
    from _saved_bytes import saved_and_planned_bytes
    dtype, autocast = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
                       "autocast": (torch.float32, True)}[case]
    measured, planned = saved_and_planned_bytes(dtype, autocast, "fused")
    return {"relative_difference": abs(measured - planned) / planned}


def check_last_stage_saved_bytes(checkpointing: bool) -> dict:
    """A last pipeline stage's loss with the fused kernels (the chunked cross-entropy) keeps no logits:
    what autograd saves against the planner's count with kernels="fused"."""
    from _saved_bytes import last_stage_saved_bytes
    result = last_stage_saved_bytes("fused", checkpointing)
    return {"relative_difference": abs(result["measured"] - result["planned"]) / result["planned"],
            "holds_logits": result["holds_logits"]}


def register_ops() -> None:
    import astrobio.kernels.cross_entropy  # noqa: F401
    import astrobio.kernels.rmsnorm  # noqa: F401
    import astrobio.kernels.rotary  # noqa: F401
    import astrobio.kernels.swiglu  # noqa: F401


def child_main(out_path: str) -> None:
    register_ops()
    results = {"cases": {}, "saved": {}, "opcheck": {}}
    for case in CASES:
        try:
            results["cases"][case] = check_case(case)
        except Exception as error:  # noqa: BLE001
            results["cases"][case] = {"error": f"{type(error).__name__}: {error}"}
    for case in MODEL_CASES:
        try:
            results["cases"][f"model-{case}"] = check_model(case)
        except Exception as error:  # noqa: BLE001
            results["cases"][f"model-{case}"] = {"error": f"{type(error).__name__}: {error}"}
    for case in SAVED_CASES:
        try:
            results["saved"][case] = check_saved_bytes(case)
        except Exception as error:  # noqa: BLE001
            results["saved"][case] = {"error": f"{type(error).__name__}: {error}"}
    for checkpointing in (False, True):
        case = f"last-stage{'-checkpointing' if checkpointing else ''}"
        try:
            results["saved"][case] = check_last_stage_saved_bytes(checkpointing)
        except Exception as error:  # noqa: BLE001
            results["saved"][case] = {"error": f"{type(error).__name__}: {error}"}
    for name in OPCHECKS:
        results["opcheck"][name] = run_opcheck(name)
    with open(out_path, "w") as f:
        json.dump(results, f)


# ------------------------------------------------------------------------------ the tests

@pytest.fixture(scope="module")
def child_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("model_kernels") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_forward_and_backward(child_results, case):
    result = child_results["cases"][case]
    assert "error" not in result, result.get("error")
    assert result["output"] <= 0, f"{case}: output off by {result['output']:.3g} beyond the tolerance"
    assert result["grads"] <= 0, f"{case}: gradient off by {result['grads']:.3g} beyond the tolerance"
    assert result["dtypes_kept"], f"{case}: outputs must keep the inputs' dtype"


@pytest.mark.parametrize("case", MODEL_CASES)
def test_fused_model_matches_eager_loss_and_gradients(child_results, case):
    result = child_results["cases"][f"model-{case}"]
    assert "error" not in result, result.get("error")
    assert result["grads"] <= 0, f"{case}: loss or a gradient off by {result['grads']:.3g} beyond the tolerance"


@pytest.mark.parametrize("case", SAVED_CASES)
def test_fused_block_keeps_what_the_memory_planner_counts(child_results, case):
    result = child_results["saved"][case]
    assert "error" not in result, result.get("error")
    assert result["relative_difference"] < 0.01, result


@pytest.mark.parametrize("case", ["last-stage", "last-stage-checkpointing"])
def test_fused_last_stage_keeps_no_logits_and_what_the_planner_counts(child_results, case):
    result = child_results["saved"][case]
    assert "error" not in result, result.get("error")
    assert not result["holds_logits"]
    assert result["relative_difference"] < 0.01, result


@pytest.mark.parametrize("name", OPCHECKS)
def test_opcheck(child_results, name):
    assert child_results["opcheck"][name] is None, child_results["opcheck"][name]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", OPCHECKS)
def test_opcheck_on_gpu_with_aot_dispatch(name):
    register_ops()
    assert run_opcheck(name, "cuda") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_compiled_kernel_on_gpu_matches_reference(case):
    register_ops()
    result = check_case(case, "cuda")
    assert result["output"] <= 0 and result["grads"] <= 0, f"{case}: {result}"


if __name__ == "__main__":
    child_main(sys.argv[1])


@pytest.mark.parametrize("dname", list(DTYPES))
def test_chunked_loss_with_the_pytorch_row_step(monkeypatch, dname):
    """Without Triton's interpreter on the CPU, the chunked loss computes its row step in PyTorch."""
    from astrobio.kernels import cross_entropy
    monkeypatch.setattr(cross_entropy, "triton_row_step_available", lambda device: False)
    (out_rtol, out_atol), (grad_rtol, grad_atol) = TOLERANCE[dname]
    (hidden, weight), fixed = make_inputs(f"cross_entropy-257x4097x16-{dname}")
    inputs = [t.clone().requires_grad_() for t in (hidden, weight)]
    ref_inputs = [t.double().requires_grad_() for t in (hidden, weight)]
    loss = cross_entropy.linear_cross_entropy(*inputs, fixed["targets"], chunk_tokens=fixed["chunk_tokens"])
    want = cross_entropy_ref(*ref_inputs, fixed["targets"])
    loss.backward()
    want.backward()
    assert worst_excess(loss, want.detach(), out_rtol, out_atol) <= 0
    for a, b in zip(inputs, ref_inputs):
        assert a.grad.dtype == a.dtype and worst_excess(a.grad, b.grad, grad_rtol, grad_atol) <= 0
    with torch.no_grad():  # evaluation: the loss alone
        assert cross_entropy.linear_cross_entropy(hidden, weight, fixed["targets"], chunk_tokens=64) == loss.detach()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_and_compiled_model_on_gpu_matches_eager(checkpointing):
    """torch.compile traces through the Triton ops (triton_op) into the blocks' graphs."""
    from astrobio.model import ModelConfig, build_model, compile_blocks, use_kernels
    config = ModelConfig(vocab_size=300, d_model=128, n_layers=2, n_heads=4, ffn_hidden=352, max_seq_len=64)
    tokens = torch.randint(0, config.vocab_size, (2, 33), device="cuda")
    results = []
    for fast in (False, True):
        model = build_model(config, seed=4, device="cuda", dtype=torch.bfloat16)
        model.gradient_checkpointing = checkpointing
        if fast:
            assert use_kernels(model, "fused") == "fused" and compile_blocks(model)
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for fast, eager in zip(*reversed(results)):
        assert worst_excess(fast, eager.double(), *MODEL_TOLERANCE["bf16"]) <= 0


def test_the_chunked_loss_runs_the_heads_forward_pre_hooks(monkeypatch):
    """The fused loss reads the head's weight without calling the head: what waits before the head's
    forward (the offload engine's wait for its updated weights) must still run, once per loss."""
    from astrobio.kernels import cross_entropy
    from astrobio.model import transformer
    from astrobio.model.fast import load_fused_ops
    from astrobio.model.transformer import head_loss
    monkeypatch.setattr(cross_entropy, "triton_row_step_available", lambda device: False)
    monkeypatch.setitem(transformer.FUSED, "cpu", load_fused_ops())
    head = torch.nn.Linear(16, 40, bias=False)
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(module))
    hidden, targets = torch.randn(2, 5, 16), torch.randint(0, 40, (2, 5))
    fused = head_loss(head, hidden, targets, fused=True)
    assert seen == [head]
    assert torch.allclose(fused, head_loss(head, hidden, targets, fused=False), rtol=1e-5, atol=1e-6)
