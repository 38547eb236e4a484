"""The C++ CPU causal attention (astrobio.model.cpu_layers.causal_attention, the ops
astrobio::causal_attention_cpu and causal_attention_backward_cpu) against PyTorch's
``F.scaled_dot_product_attention(is_causal=True)`` and against an explicit fp64 softmax written here,
forward, logsumexp and backward; and the tiny model with ``use_kernels(model, "fused")`` on the CPU,
which runs it, against the eager model.

Tolerances, as |op - reference| <= atol + rtol * |reference|: against the fp64 reference, out and
lse 1e-5 / 1e-6, gradients 1e-5 / 1e-5 (fp32 sums over up to 130 keys, reassociated, and an exp to
about 1 ulp); against fp32 SDPA, which rounds too, twice those. The (batch, head) pairs are computed
independently, so the results do not depend on the number of threads (compared bit for bit).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from astrobio import ops

pytestmark = pytest.mark.skipif(ops.cpu_layer_kernels_unavailable() is not None,
                                reason=str(ops.cpu_layer_kernels_unavailable()))

if ops.cpu_layer_kernels_unavailable() is None:
    from astrobio import _C
    from astrobio.model import cpu_layers

REF_TOL = {"out": (1e-5, 1e-6), "grad": (1e-5, 1e-5)}  # (rtol, atol) against fp64
SDPA_TOL = {"out": (2e-5, 2e-6), "grad": (2e-5, 2e-5)}  # against fp32 SDPA

SHAPES = [(b, t, h, d) for b in (1, 3) for t in (1, 5, 128, 130) for h in (1, 4) for d in (32, 16, 24)]


def randn(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def worst_excess(got, want, rtol, atol):
    """max(|got - want| - atol - rtol |want|): <= 0 passes."""
    return ((got.double() - want.double()).abs() - atol - rtol * want.double().abs()).max().item()


def reference(q, k, v):
    """out [b, t, h, d] and lse [b, h, t] in fp64 by an explicit masked softmax."""
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    t = q.shape[1]
    scores = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ vd).transpose(1, 2), torch.logsumexp(scores, -1)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def inputs(shape, seed):
    q, k, v = (randn(shape, seed + i) for i in range(3))
    return q, k, v, randn(shape, seed + 3)


def grads(fn, q, k, v, dout):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_an_fp64_softmax_and_sdpa(shape):
    q, k, v, dout = inputs(shape, sum(shape))
    out, lse = torch.ops.astrobio.causal_attention_cpu(q, k, v)
    want, want_lse = reference(q, k, v)
    assert out.shape == q.shape and lse.shape == (shape[0], shape[2], shape[1]) and lse.dtype == torch.float32
    assert worst_excess(out, want, *REF_TOL["out"]) <= 0
    assert worst_excess(lse, want_lse, *REF_TOL["out"]) <= 0
    got, got_grads = grads(cpu_layers.causal_attention, q, k, v, dout)
    torch.testing.assert_close(got, out, rtol=0, atol=0)
    _, ref_grads = grads(lambda *x: reference(*x)[0], q.double(), k.double(), v.double(), dout.double())
    sdpa_out, sdpa_grads = grads(sdpa, q, k, v, dout)
    assert worst_excess(out, sdpa_out, *SDPA_TOL["out"]) <= 0
    for name, g, r, s in zip("qkv", got_grads, ref_grads, sdpa_grads):
        assert g.shape == q.shape and g.dtype == torch.float32
        assert worst_excess(g, r, *REF_TOL["grad"]) <= 0, f"d{name} against fp64"
        assert worst_excess(g, s, *SDPA_TOL["grad"]) <= 0, f"d{name} against SDPA"


def test_large_scores_and_strided_inputs():
    """Scores of magnitude ~100 (the softmax's max subtraction), and q, k, v as the strided views of one
    [b, t, 3, h, d] tensor (the op copies them contiguous). fp32 scores that large carry absolute errors
    ~1e-5 (SDPA's out is off the fp64 reference by 2.3e-5 here): 1e-5 absolute, and no worse than 1.5
    times SDPA's largest error."""
    qkv = randn((2, 70, 3, 2, 16), 7, scale=4.0)
    q, k, v = qkv.unbind(2)
    out, lse = torch.ops.astrobio.causal_attention_cpu(q, k, v)
    want, want_lse = reference(q, k, v)
    assert worst_excess(out, want, 1e-5, 1e-5) <= 0
    assert (out.double() - want).abs().max() <= 1.5 * (sdpa(q, k, v).double() - want).abs().max()
    assert worst_excess(lse, want_lse, 1e-5, 1e-5) <= 0
    dout = randn(q.shape, 8)
    got = torch.ops.astrobio.causal_attention_backward_cpu(dout, q, k, v, out, lse)
    _, ref_grads = grads(lambda *x: reference(*x)[0], q.double(), k.double(), v.double(), dout.double())
    for g, r in zip(got, ref_grads):
        assert worst_excess(g, r, 1e-4, 1e-4) <= 0


def test_bf16_inputs_compute_in_fp32():
    q, k, v, dout = (x.bfloat16() for x in inputs((2, 33, 2, 16), 9))
    out, got_grads = grads(cpu_layers.causal_attention, q, k, v, dout)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in got_grads)
    want, _ = reference(q, k, v)
    assert worst_excess(out, want, 1e-2, 1e-2) <= 0


def all_outputs(shape=(3, 67, 5, 24)):
    q, k, v, dout = inputs(shape, 11)
    out, lse = torch.ops.astrobio.causal_attention_cpu(q, k, v)
    return [out, lse, *torch.ops.astrobio.causal_attention_backward_cpu(dout, q, k, v, out, lse)]


def test_results_do_not_depend_on_the_number_of_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = all_outputs()
        torch.set_num_threads(max(2, threads))
        many = all_outputs()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_every_simd_path_agrees(monkeypatch):
    """The SIMD paths use fused multiply-adds, the portable one does not: equal within fp32 rounding."""
    monkeypatch.delenv("ASTROBIO_CPU_SIMD", raising=False)
    default = all_outputs()
    for path in _C.cpu_simd_paths():
        monkeypatch.setenv("ASTROBIO_CPU_SIMD", path)
        assert _C.simd_path() == path
        for i, (a, b) in enumerate(zip(all_outputs(), default)):
            assert worst_excess(a, b, 1e-5, 1e-5) <= 0, f"path {path}: output {i}"


def test_opcheck():
    q, k, v, dout = inputs((2, 9, 3, 8), 12)
    out, lse = torch.ops.astrobio.causal_attention_cpu(q, k, v)
    grad = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(torch.ops.astrobio.causal_attention_cpu.default, (grad(q), grad(k), grad(v)))
    torch.library.opcheck(torch.ops.astrobio.causal_attention_backward_cpu.default, (dout, q, k, v, out, lse))


def test_bad_arguments_get_clear_errors():
    q, k, v, dout = inputs((1, 4, 2, 8), 13)
    op, backward = torch.ops.astrobio.causal_attention_cpu, torch.ops.astrobio.causal_attention_backward_cpu
    with pytest.raises(RuntimeError, match=r"must be \[batch, seq, heads, head_dim\], got q of shape \[4, 2, 8\]"):
        op(q[0], k[0], v[0])
    with pytest.raises(RuntimeError, match=r"k has shape \[1, 3, 2, 8\] but q has \[1, 4, 2, 8\]"):
        op(q, k[:, :3], v)
    with pytest.raises(RuntimeError, match="v must be float32, got BFloat16"):
        op(q, k, v.bfloat16())
    with pytest.raises(RuntimeError, match="q must be float32, got Double"):
        op(q.double(), k.double(), v.double())
    with pytest.raises(RuntimeError, match="head_dim must be positive"):
        op(q[..., :0], k[..., :0], v[..., :0])
    out, lse = op(q, k, v)
    with pytest.raises(RuntimeError, match=r"lse has shape \[1, 4, 2\], expected \[batch, heads, seq\] = \[1, 2, 4\]"):
        backward(dout, q, k, v, out, lse.transpose(1, 2))
    with pytest.raises(RuntimeError, match=r"dout has shape .* but q has"):
        backward(dout[:, :2], q, k, v, out, lse)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="q is on cuda.*runs on CPU tensors"):
            op(q.cuda(), k.cuda(), v.cuda())


# ------------------------------------------------------------------------------ the model

# The fused tiny model against eager, with every block's attention through this op (counted):
# tests/test_cpu_layers.py::test_fused_tiny_model_on_the_cpu_matches_eager.


@pytest.mark.parametrize("case", ["fp32", "bf16", "autocast"])
def test_fused_block_keeps_what_the_memory_planner_counts(monkeypatch, case):
    """The kernel keeps what SDPA keeps (q, k, v, out, the fp32 logsumexp): a fused block's saved bytes on
    the CPU equal the planner's count exactly, in fp32 and under autocast (attention in fp32); a bf16
    model keeps SDPA (the kernel would keep fp32 copies of q, k, v)."""
    from _saved_bytes import saved_and_planned_bytes
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dtype, autocast = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
                       "autocast": (torch.float32, True)}[case]
    measured, planned = saved_and_planned_bytes(dtype, autocast, "fused")
    assert measured == planned
