"""Rotary position embedding of q and k in one Triton kernel: ``astrobio::rotary``.

Specification (``rotary_reference``, the model's ``apply_rotary`` in astrobio/model/transformer.py):
each head's pairs (x[2j], x[2j+1]) at position s turn by the angle whose cos / sin are the fp32 tables'
entries [s, j]:

    (a, b) -> (a cos - b sin, a sin + b cos)        computed in fp32, stored in the input's dtype

One program rotates one token's q and k rows (all heads) and writes them once; eager PyTorch makes
six fp32 temporaries and a stack. The backward is the same rotation by the opposite angle (sin
negated), so one kernel serves both ways.

The op returns new tensors rather than rotating in place: an op that mutates its inputs cannot carry
its own autograd formula (``register_autograd``) through torch.compile, and the cost of writing to
fresh memory instead of the projections' outputs is the same one pass.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from astrobio.kernels.tracing import launch_needed


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, seq, heads, head_dim]; cos, sin [seq, head_dim / 2] fp32."""
    x32 = x.float().unflatten(-1, (-1, 2))
    a, b = x32[..., 0], x32[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


@triton.jit
def _rotate_row(x_ptr, out_ptr, row, cos, sin, heads, half, head_dim, SIGN: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_J)[None, :]
    mask = (h < heads) & (j < half)
    even = row * heads * head_dim + h * head_dim + 2 * j
    a = tl.load(x_ptr + even, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    s = SIGN * sin
    tl.store(out_ptr + even, (a * cos - b * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + even + 1, (a * s + b * cos).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, seq, heads, half,
                   SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one token: batch * seq + position
    position = row % seq
    j = tl.arange(0, BLOCK_J)[None, :]
    cos = tl.load(cos_ptr + position * half + j, mask=j < half, other=0.0)
    sin = tl.load(sin_ptr + position * half + j, mask=j < half, other=0.0)
    _rotate_row(q_ptr, q_out_ptr, row, cos, sin, heads, half, 2 * half, SIGN, BLOCK_H, BLOCK_J)
    _rotate_row(k_ptr, k_out_ptr, row, cos, sin, heads, half, 2 * half, SIGN, BLOCK_H, BLOCK_J)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            sign: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq, heads, head_dim = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0 or not launch_needed(q):
        return q_out, k_out
    block_h, block_j = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim // 2)
    wrap_triton(_rotary_kernel)[(batch * seq,)](
        q, k, cos, sin, q_out, k_out, seq, heads, head_dim // 2, SIGN=sign, BLOCK_H=block_h, BLOCK_J=block_j,
        num_warps=4 if block_h * block_j <= 2048 else 8)
    return q_out, k_out


@triton_op("astrobio::rotary", mutates_args={})
def rotary_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k contiguous [batch, seq, heads, head_dim] of one shape; cos, sin contiguous [seq, head_dim / 2]."""
    return _launch(q, k, cos, sin, 1)


@triton_op("astrobio::rotary_backward", mutates_args={})
def rotary_backward(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse rotation of the output gradients."""
    return _launch(dq, dk, cos, sin, -1)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.astrobio.rotary_backward(dq.contiguous(), dk.contiguous(), cos, sin)
    return dq, dk, None, None


rotary_forward.register_autograd(_backward, setup_context=_setup_context)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_reference`` of q and of k ([batch, seq, heads, head_dim], one shape and dtype)."""
    if q.shape != k.shape or q.dtype != k.dtype or q.dim() != 4:
        raise ValueError(f"rotary: q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} must be "
                         "[batch, seq, heads, head_dim] tensors of one shape and dtype")
    if cos.shape != (q.shape[1], q.shape[3] // 2) or sin.shape != cos.shape:
        raise ValueError(f"rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be "
                         f"[seq, head_dim / 2] = {(q.shape[1], q.shape[3] // 2)}")
    return torch.ops.astrobio.rotary(q.contiguous(), k.contiguous(), cos.float().contiguous(),
                                     sin.float().contiguous())
