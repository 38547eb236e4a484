"""The 8-bit AdamW step as a Triton kernel: the op ``astrobio::adamw8bit_step_triton``.

Computes exactly what astrobio/optim/reference.py specifies (the same arithmetic as the C++ and
CUDA kernels, bit for bit): each program owns ``ROWS`` quantization blocks of 256 elements as a
[ROWS, 256] tile, so a block's absmax is a row reduction and the whole step is one pass over memory.
Rounding is made explicit where Triton's defaults differ from IEEE: ``tl.div_rn`` and ``tl.sqrt_rn``
(plain ``/`` and ``tl.sqrt`` are approximate on the GPU) and ``enable_fp_fusion=False`` (no
multiply-add contraction). The nearest code is a branchless binary search over the 255 thresholds
``(qmap[i] + qmap[i + 1]) * 0.5`` (reference.thresholds, computed per call by two tiny torch ops, so
that a probe is one load from the L1-resident 1 KB table).

``adamw8bit_step`` takes the op's argument list (csrc/ops.cpp), validates it as the C++ op does and
runs the kernel; astrobio.ops routes the backend "triton" here. Runs on CUDA tensors, or on CPU
tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` set before triton is imported).
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from astrobio import _C
from astrobio.spec.adamw8bit import BLOCK_SIZE, StepConstants, thresholds

QMAP_SIZE = 256
ROWS = 4       # quantization blocks per program: 1024 elements, 8 per thread with 4 warps
NUM_WARPS = 4


@triton.jit
def _mix32(x):
    """reference._mix32 on uint32 values (the products wrap modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _nearest_code(thresholds_ptr, n):
    """The number of the 255 thresholds strictly below n: a binary search of 8 probes."""
    code = tl.zeros(n.shape, tl.int32)
    for k in tl.static_range(8):  # probe widths 128, 64, ..., 1
        probe = tl.load(thresholds_ptr + code + ((128 >> k) - 1))
        code = tl.where(n > probe, code + (128 >> k), code)
    return code


@triton.jit
def _inverse_or_zero(x):
    """1 / x correctly rounded, 0 where x is below the smallest normal fp32 (reference.MIN_NORMAL)."""
    one = tl.full(x.shape, 1.0, tl.float32)
    normal = x >= 1.1754943508222875e-38
    return tl.where(normal, tl.div_rn(one, tl.where(normal, x, one)), 0.0)


@triton.jit
def _round_nearest_bf16_bits(p):
    """fp32 -> bf16 bit pattern as reference.round_to_bf16: nearest even, every NaN the canonical 0x7FC0."""
    bits = p.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(p != p, 0x7FC0, rounded).to(tl.uint16)


@triton.jit(do_not_specialize=["seed"])
def _adamw8bit_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, absmax1_ptr, absmax2_ptr,
                      qmap1_ptr, qmap2_ptr, thresholds1_ptr, thresholds2_ptr, param_bf16_ptr, found_inf_ptr,
                      numel,
                      beta1, beta2, one_minus_beta1, one_minus_beta2, eps, grad_scale, decay, step_size,
                      inv_bc2_sqrt, seed,
                      QUANTIZED: tl.constexpr, PARAM_IS_BF16: tl.constexpr, WRITE_BF16: tl.constexpr,
                      HAS_FOUND_INF: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # quantization block of each row
    offs = block[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]         # 64-bit element indices
    if HAS_FOUND_INF:  # a skipped step updates no element
        limit = tl.where(tl.load(found_inf_ptr) == 0.0, numel, 0)
    else:
        limit = numel
    mask = offs < limit
    row_mask = block < tl.cdiv(limit, BLOCK)

    p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANTIZED:
        code1 = tl.load(exp_avg_ptr + offs, mask=mask, other=0).to(tl.int32)
        code2 = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0).to(tl.int32)
        scale1 = tl.load(absmax1_ptr + block, mask=row_mask, other=0.0)
        scale2 = tl.load(absmax2_ptr + block, mask=row_mask, other=0.0)
        m = tl.where(mask, tl.load(qmap1_ptr + code1) * scale1[:, None], 0.0)
        v = tl.where(mask, tl.load(qmap2_ptr + code2) * scale2[:, None], 0.0)
    else:
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)

    # reference.adamw_update, operation by operation
    g = g * grad_scale
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
    p = p * decay - step_size * tl.div_rn(m, denom)

    if PARAM_IS_BF16:  # stochastic rounding with the counter hash of the global index
        hi = _mix32((offs >> 32).to(tl.uint32) ^ seed.to(tl.uint32, bitcast=True))
        r = _mix32(offs.to(tl.uint32) ^ hi) & 0xFFFF
        bf16_bits = ((p.to(tl.uint32, bitcast=True) + r) >> 16).to(tl.uint16)
        tl.store(param_ptr + offs, bf16_bits.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(param_ptr + offs, p, mask=mask)
        bf16_bits = _round_nearest_bf16_bits(p)
    if WRITE_BF16:
        tl.store(param_bf16_ptr + offs, bf16_bits.to(tl.bfloat16, bitcast=True), mask=mask)

    if QUANTIZED:  # masked elements hold m = v = 0 and leave the absmax unchanged
        max1 = tl.max(tl.abs(m), axis=1)
        max2 = tl.max(tl.abs(v), axis=1)
        inv1 = _inverse_or_zero(max1)
        inv2 = _inverse_or_zero(max2)
        code1 = _nearest_code(thresholds1_ptr, m * inv1[:, None])
        code2 = _nearest_code(thresholds2_ptr, v * inv2[:, None])
        tl.store(exp_avg_ptr + offs, code1.to(tl.uint8), mask=mask)
        tl.store(exp_avg_sq_ptr + offs, code2.to(tl.uint8), mask=mask)
        tl.store(absmax1_ptr + block, max1, mask=row_mask)
        tl.store(absmax2_ptr + block, max2, mask=row_mask)
    else:
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)


@triton_op("astrobio::adamw8bit_step_triton",
           mutates_args={"param", "exp_avg", "exp_avg_sq", "absmax1", "absmax2", "param_bf16"})
def adamw8bit_step_triton(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                          exp_avg_sq: torch.Tensor, absmax1: torch.Tensor, absmax2: torch.Tensor,
                          qmap1: torch.Tensor, qmap2: torch.Tensor, param_bf16: Optional[torch.Tensor],
                          found_inf: Optional[torch.Tensor], lr: float, beta1: float, beta2: float, eps: float,
                          weight_decay: float, grad_scale: float, step: int, seed: int) -> None:
    """The kernel launch, for validated arguments (see ``adamw8bit_step``)."""
    numel = param.numel()
    if numel == 0:
        return
    c = StepConstants.make(lr, beta1, beta2, eps, weight_decay, step, grad_scale)
    quantized = exp_avg.dtype == torch.uint8
    seed32 = seed & 0xFFFFFFFF
    grid = (triton.cdiv(numel, ROWS * BLOCK_SIZE),)
    # Unused pointer arguments get `param`: the constexpr flags keep the kernel from touching them.
    maps = (qmap1, qmap2, thresholds(qmap1), thresholds(qmap2)) if quantized else (param,) * 4
    wrap_triton(_adamw8bit_kernel)[grid](
        param, grad, exp_avg, exp_avg_sq,
        absmax1 if quantized else param, absmax2 if quantized else param, *maps,
        param if param_bf16 is None else param_bf16, param if found_inf is None else found_inf, numel,
        c.beta1, c.beta2, c.one_minus_beta1, c.one_minus_beta2, c.eps, c.grad_scale, c.decay, c.step_size,
        c.inv_bc2_sqrt, seed32 - (1 << 32) if seed32 >= (1 << 31) else seed32,  # the uint32's int32 bits
        QUANTIZED=quantized, PARAM_IS_BF16=param.dtype == torch.bfloat16, WRITE_BF16=param_bf16 is not None,
        HAS_FOUND_INF=found_inf is not None, ROWS=ROWS, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS,
        enable_fp_fusion=False)


def _fail(message: str) -> None:
    raise RuntimeError(f"adamw8bit_step (triton): {message}")


def _check_device(param: torch.Tensor) -> None:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # as astrobio.ops.has_triton reads it
    if param.device.type != "cuda" and not (param.device.type == "cpu" and interpreted):
        _fail(f"param is on {param.device}; the Triton kernel steps CUDA tensors "
              "(CPU tensors only under TRITON_INTERPRET=1)")


def adamw8bit_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor,
                   param_bf16: torch.Tensor | None, found_inf: torch.Tensor | None,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   grad_scale: float, step: int, seed: int) -> None:
    """One in-place 8-bit AdamW step (the op ``astrobio::adamw8bit_step``'s arguments and checks)."""
    _C.check_adamw8bit_args(param, grad, exp_avg, exp_avg_sq, absmax1, absmax2, qmap1, qmap2, param_bf16,
                            found_inf, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                            float(grad_scale), int(step), int(seed))
    _check_device(param)
    torch.ops.astrobio.adamw8bit_step_triton(param, grad, exp_avg, exp_avg_sq, absmax1, absmax2, qmap1, qmap2,
                                             param_bf16, found_inf, float(lr), float(beta1), float(beta2),
                                             float(eps), float(weight_decay), float(grad_scale), int(step),
                                             int(seed))
