"""SwiGLU's gate-up product ``silu(gate) * up`` in one Triton kernel each way: ``astrobio::silu_mul``.

Specification (``silu_mul_reference``): out = silu(gate) * up, computed in fp32 and stored once in the
inputs' dtype (eager PyTorch rounds silu's output before the product, and keeps both it and the
product alive for the backward). The backward recomputes the sigmoid from the saved gate and up:

    d gate = d out * up * s * (1 + gate * (1 - s)),   d up = d out * gate * s,   s = sigmoid(gate)

so autograd keeps only gate and up (two tensors of [tokens, ffn_hidden], eager keeps four).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from astrobio.kernels.tracing import launch_needed

BLOCK = 1024


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


@triton.jit
def _silu_mul_forward_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_backward_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    d = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dgate_ptr + offs, (d * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (d * g * s).to(dup_ptr.dtype.element_ty), mask=mask)


@triton_op("astrobio::silu_mul", mutates_args={})
def silu_mul_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """For contiguous gate and up of one shape and dtype."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n and launch_needed(gate):
        wrap_triton(_silu_mul_forward_kernel)[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
    return out


@triton_op("astrobio::silu_mul_backward", mutates_args={})
def silu_mul_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n and launch_needed(gate):
        wrap_triton(_silu_mul_backward_kernel)[(triton.cdiv(n, BLOCK),)](dout, gate, up, dgate, dup, n, BLOCK=BLOCK,
                                                                         num_warps=4)
    return dgate, dup


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return torch.ops.astrobio.silu_mul_backward(dout.contiguous(), gate, up)


silu_mul_forward.register_autograd(_backward, setup_context=_setup_context)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu_mul_reference(gate, up)`` for gate and up of one shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have one shape and dtype")
    return torch.ops.astrobio.silu_mul(gate.contiguous(), up.contiguous())
