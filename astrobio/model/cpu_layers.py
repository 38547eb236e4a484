"""The model's fused layers on the CPU: the C++ ops of csrc/cpu/layers.cpp with autograd.

The CPU backend of the specification that the Triton kernels implement for CUDA (kernels/rmsnorm.py,
rotary.py, swiglu.py), with the same call signatures:

    rmsnorm(x, weight, eps, residual=None) -> (y, h)    h = x + residual (x without one)
    rotary(q, k, cos, sin) -> (q, k)                      q, k [batch, seq, heads, head_dim]
    silu_mul(gate, up) -> silu(gate) * up
    causal_attention(q, k, v) -> out                    [batch, seq, heads, head_dim], fp32 only

fp32 arithmetic, results in the inputs' dtype (fp32 or bf16; attention: fp32). causal_attention is
``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` in the projections' layout (no transposes),
computing only the unmasked half (csrc/cpu/attention.cpp); it saves for the backward what SDPA saves:
q, k, v, out and the fp32 logsumexp [batch, heads, seq]. The ops are ``astrobio::*_cpu`` (schemas in
csrc/ops.cpp), named apart from the Triton ops so that both can be registered in one process; each has a
fake kernel here, so torch.compile traces through them. Importing this module needs the compiled
extension with these ops (astrobio.ops.cpu_layer_kernels_unavailable() is None).
"""

from __future__ import annotations

import torch

from astrobio import ops

if ops.cpu_layer_kernels_unavailable() is not None:
    raise ImportError(f"the C++ layer kernels cannot run: {ops.cpu_layer_kernels_unavailable()}")


def _new(like: torch.Tensor, dtype: torch.dtype | None = None, shape=None) -> torch.Tensor:
    """A contiguous tensor of like's shape (or ``shape``), as the C++ ops allocate."""
    return like.new_empty(like.shape if shape is None else shape, dtype=dtype)


@torch.library.register_fake("astrobio::rmsnorm_forward_cpu")
def _rmsnorm_forward_fake(x, residual, weight, eps):
    h = _new(x) if residual is not None else _new(x, shape=(0,))
    return _new(x), h, _new(x, torch.float32, x.shape[:-1])


@torch.library.register_fake("astrobio::rmsnorm_backward_cpu")
def _rmsnorm_backward_fake(dy, dh, h, weight, rstd):
    return _new(h), _new(weight)


@torch.library.register_fake("astrobio::rotary_cpu")
def _rotary_fake(q, k, cos, sin):
    return _new(q), _new(k)


@torch.library.register_fake("astrobio::rotary_backward_cpu")
def _rotary_backward_fake(dq, dk, cos, sin):
    return _new(dq), _new(dk)


@torch.library.register_fake("astrobio::silu_mul_cpu")
def _silu_mul_fake(gate, up):
    return _new(gate)


@torch.library.register_fake("astrobio::silu_mul_backward_cpu")
def _silu_mul_backward_fake(dout, gate, up):
    return _new(gate), _new(up)


@torch.library.register_fake("astrobio::causal_attention_cpu")
def _causal_attention_fake(q, k, v):
    return _new(q), _new(q, torch.float32, (q.shape[0], q.shape[2], q.shape[1]))


@torch.library.register_fake("astrobio::causal_attention_backward_cpu")
def _causal_attention_backward_fake(dout, q, k, v, out, lse):
    return _new(q), _new(k), _new(v)


def _rmsnorm_setup_context(ctx, inputs, output):
    x, residual, weight, _ = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)


def _rmsnorm_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dh = dh if ctx.has_residual else None
    dx, dw = torch.ops.astrobio.rmsnorm_backward_cpu(dy, dh, h, weight, rstd)
    return dx, (dx if ctx.has_residual else None), dw, None


def _rotary_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


def _rotary_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.astrobio.rotary_backward_cpu(dq, dk, cos, sin)
    return dq, dk, None, None


def _silu_mul_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_mul_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return torch.ops.astrobio.silu_mul_backward_cpu(dout, gate, up)


def _causal_attention_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _causal_attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return torch.ops.astrobio.causal_attention_backward_cpu(dout, q, k, v, out, lse)


torch.library.register_autograd("astrobio::rmsnorm_forward_cpu", _rmsnorm_backward,
                                setup_context=_rmsnorm_setup_context)
torch.library.register_autograd("astrobio::rotary_cpu", _rotary_backward, setup_context=_rotary_setup_context)
torch.library.register_autograd("astrobio::silu_mul_cpu", _silu_mul_backward, setup_context=_silu_mul_setup_context)
torch.library.register_autograd("astrobio::causal_attention_cpu", _causal_attention_backward,
                                setup_context=_causal_attention_setup_context)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) as ``astrobio.kernels.rmsnorm.rmsnorm_reference`` for x (and residual) [..., d]; x and the
    residual may differ in dtype (the stream takes the promoted one, as x + residual does)."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rmsnorm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if residual is not None:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    y, h, _ = torch.ops.astrobio.rmsnorm_forward_cpu(x, residual, weight, eps)
    return y, (h if residual is not None else x)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``astrobio.kernels.rotary.rotary_reference`` of q and of k ([batch, seq, heads, head_dim], one shape
    and dtype); cos, sin [seq, head_dim / 2] (converted to fp32)."""
    return torch.ops.astrobio.rotary_cpu(q, k, cos.float(), sin.float())


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in fp32, for gate and up of one shape and dtype."""
    return torch.ops.astrobio.silu_mul_cpu(gate, up)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of q, k, v transposed to [batch, heads, seq, head_dim], with
    ``is_causal=True``, back in the layout of q, k, v: [batch, seq, heads, head_dim] (CPU tensors of one
    shape). Computed in fp32; bf16 inputs are converted and the result converted back."""
    out = torch.ops.astrobio.causal_attention_cpu(q.float(), k.float(), v.float())[0]
    return out.to(q.dtype)
