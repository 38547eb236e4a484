"""RMSNorm, optionally after a residual add, as one Triton kernel each way: ``astrobio::rmsnorm``.

Specification (``rmsnorm_reference``, the model's own RMSNorm in astrobio/model/transformer.py):

    h = x + residual            (in x's dtype; skipped without a residual)
    y = (h.float() * rsqrt(mean(h.float() ** 2) + eps) * weight.float()).to(h.dtype)

The forward reads x (and the residual) once and writes y, h and one fp32 rstd per row; eager PyTorch
makes three fp32 temporaries of the row. The backward reads dy, dh (the gradient reaching h from the
residual stream), h, weight and rstd once and writes the input gradient; each program loops over
many rows and writes one partial sum of the weight gradient, added up by one small torch sum. Rows
are the flattened leading dimensions; a program takes ``ROWS`` rows of ``BLOCK`` >= d_model columns
at a time.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from astrobio.kernels.tracing import launch_needed


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                      residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): the normalised output and the residual stream h = x + residual (h is x without one)."""
    h = x if residual is None else x + residual
    h32 = h.float()
    y = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(h.dtype)
    return y, h


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 x rounded to nearest (even) in dtype. NOTE: spelled out for bf16, because the interpreter's
    plain cast to bf16 truncates (the GPU's rounds to nearest): the residual stream must round as PyTorch."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        return tl.where(x != x, x.to(tl.bfloat16), rounded.to(tl.bfloat16, bitcast=True))
    return x.to(dtype)


@triton.jit
def _rmsnorm_forward_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, n_rows, n_cols, eps,
                            HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None] * n_cols + cols[None, :]
    h = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # the add rounds to the stream's dtype, as x + residual does in PyTorch
        h = _round_to(h.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32), h.dtype)
        tl.store(h_ptr + offs, h, mask=mask)
    h32 = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h32 * h32, axis=1) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = h32 * rstd[:, None] * w[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rmsnorm_backward_kernel(dy_ptr, dh_ptr, h_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols,
                             HAS_DH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Program p takes the row blocks p, p + programs, ...: its weight-gradient partial sum stays in
    registers and is written once."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    for row_block in range(pid, tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = (row_block * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # row indices fit in int32, offsets not
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        offs = rows[:, None] * n_cols + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
        xhat = h * rstd[:, None]
        dyw = dy * w[None, :]
        # d/dh of h * rstd(h): rstd * (dyw - xhat * mean(dyw * xhat))
        dx = rstd[:, None] * (dyw - xhat * (tl.sum(dyw * xhat, axis=1) / n_cols)[:, None])
        if HAS_DH:
            dx += tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=cols < n_cols)


def _launch_shape(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): a power-of-two row width, several short rows per program."""
    block = triton.next_power_of_2(n_cols)
    rows = max(1, min(16, 4096 // block))
    return block, rows, 4 if block * rows <= 4096 else 8


def _backward_programs(device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over, few enough that the weight-gradient partials
    (one row of fp32 per program) stay small next to the activations."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


@triton_op("astrobio::rmsnorm_forward", mutates_args={})
def rmsnorm_forward(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd) for contiguous [rows, d] inputs; h is an empty tensor without a residual."""
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    block, rows, warps = _launch_shape(n_cols)
    if launch_needed(x):
        wrap_triton(_rmsnorm_forward_kernel)[(triton.cdiv(n_rows, rows),)](
            x, x if residual is None else residual, weight, y, y if residual is None else h, rstd, n_rows, n_cols,
            eps, HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK=block, num_warps=warps)
    return y, h, rstd


@triton_op("astrobio::rmsnorm_backward", mutates_args={})
def rmsnorm_backward(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of h, gradient of weight); ``dh`` is the gradient reaching h directly (or None)."""
    n_rows, n_cols = h.shape
    dx = torch.empty_like(h)
    block, rows, warps = _launch_shape(n_cols)
    programs = max(1, min(triton.cdiv(n_rows, rows), _backward_programs(h.device)))
    dw_partial = torch.empty(programs, n_cols, device=h.device, dtype=torch.float32)
    if launch_needed(h):
        wrap_triton(_rmsnorm_backward_kernel)[(programs,)](
            dy, dy if dh is None else dh, h, weight, rstd, dx, dw_partial, n_rows, n_cols,
            HAS_DH=dh is not None, ROWS=rows, BLOCK=block, num_warps=warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


def _setup_context(ctx, inputs, output):
    x, residual, weight, _ = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)


def _backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dh = dh.contiguous() if ctx.has_residual and dh is not None else None
    dx, dw = torch.ops.astrobio.rmsnorm_backward(dy.contiguous(), dh, h, weight, rstd)
    return dx, (dx if ctx.has_residual else None), dw, None


rmsnorm_forward.register_autograd(_backward, setup_context=_setup_context)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) as ``rmsnorm_reference``, for x (and residual) of any shape [..., d] with d = weight's size."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: x has {x.shape[-1]} features but weight {weight.shape[0]}; they must match")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rmsnorm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if residual is not None:
        residual = residual.to(torch.promote_types(x.dtype, residual.dtype)).contiguous().view(-1, x.shape[-1])
        x = x.to(residual.dtype)
    flat = x.contiguous().view(-1, x.shape[-1])
    y, h, _ = torch.ops.astrobio.rmsnorm_forward(flat, residual, weight, eps)
    return y.view(x.shape), (h.view(x.shape) if residual is not None else x)
