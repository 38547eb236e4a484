"""The 8-bit AdamW specification, in plain PyTorch with fp32 arithmetic.

Every backend (C++ CPU, CUDA, Triton) computes what this file computes and is tested against it.
The arithmetic is spelled out operation by operation (each operation rounded to fp32, no fused
multiply-add) so that a kernel can reproduce it exactly:

    host, in float64, each rounded once to fp32:
        beta1, beta2, one_minus_beta1 = 1 - beta1, one_minus_beta2 = 1 - beta2, eps, grad_scale
        decay        = 1 - lr * weight_decay
        step_size    = lr / (1 - beta1 ** step)
        inv_bc2_sqrt = 1 / sqrt(1 - beta2 ** step)
    per element, fp32:
        g     = grad * grad_scale
        m     = beta1 * m + one_minus_beta1 * g
        v     = beta2 * v + one_minus_beta2 * (g * g)
        denom = sqrt(v) * inv_bc2_sqrt + eps
        p     = p * decay - step_size * (m / denom)

with an IEEE (correctly rounded) sqrt and division. This is torch.optim.AdamW's update (decoupled weight
decay, bias correction) in a fixed order.

8-bit moments: m with the signed and v with the unsigned 256-entry dynamic map (Dettmers et al.
2022), one fp32 absmax per block of 256 elements. Dequantize: ``value = qmap[code] * absmax``.
Requantize after the update: ``absmax = max |x|`` over the block, ``inv = 1 / absmax`` (0 when
absmax is below the smallest normal fp32, ``MIN_NORMAL``: an all-zero block, or one so small that
``1 / absmax`` would overflow to inf and turn its zeros into NaN), ``n = x * inv`` and
``code = #{i : threshold[i] < n}`` where ``threshold[i] = (qmap[i] + qmap[i + 1]) * 0.5`` in fp32:
the nearest code, ties to the lower one (a NaN, which no threshold is below, is code 0). The bf16 copy
of the new weights is ``round_to_bf16``.

One NaN: every fp32 output that is NaN (the new weights, fp32 moments, a block's absmax) is written as
the canonical quiet NaN ``CANONICAL_NAN`` = 0x7FC00000 (positive, no payload), whatever NaN the
arithmetic made (x86 keeps an operand's payload and sign, a GPU makes its own); it rounds to the bf16
NaN 0x7FC0 in both bf16 roundings, so a bf16 output that is NaN is always 0x7FC0.

Tensors under ``MIN_8BIT_NUMEL`` elements keep fp32 moments. Master weights are fp32, or bf16 with
stochastic rounding (``stochastic_round_to_bf16``). A step with any non-finite gradient is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK_SIZE = 256
MIN_NORMAL = torch.finfo(torch.float32).tiny  # 2**-126: below it, a block's codes are all the zero code
MIN_8BIT_NUMEL = 4096
_EXPONENTS = 7  # decimal exponents 10^-6 .. 10^0 of the dynamic map


CANONICAL_NAN = 0x7FC00000


def canonical_nan(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` with every NaN replaced by the canonical quiet NaN 0x7FC00000."""
    nan = torch.tensor(CANONICAL_NAN, dtype=torch.int32).view(torch.float32)
    return torch.where(torch.isnan(x), nan, x)


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256-entry dynamic-exponent quantization map, sorted ascending, fp32.

    A code is (sign,) a run of zeros giving a decimal exponent, an indicator bit, then linear
    fraction bits: at exponent 10^(e-6), e = 0..6, the fraction bits split [0.1, 1] into 2^e
    (signed) or 2^(e+1) (unsigned) equal intervals and the code is each interval's midpoint.
    Zero and 1.0 complete the 256 entries.
    """
    values = [0.0, 1.0]
    for e in range(_EXPONENTS):
        intervals = 2 ** e if signed else 2 ** (e + 1)
        scale = 10.0 ** (e - (_EXPONENTS - 1))
        width = 0.9 / intervals
        for k in range(intervals):
            mid = scale * (0.1 + (k + 0.5) * width)
            values.append(mid)
            if signed:
                values.append(-mid)
    values.sort()
    table = torch.tensor(values, dtype=torch.float64).to(torch.float32)
    assert table.numel() == 256 and bool((table[1:] > table[:-1]).all())
    return table


def thresholds(qmap: torch.Tensor) -> torch.Tensor:
    """The 255 decision thresholds between neighbouring codes, fp32."""
    return (qmap[:-1] + qmap[1:]) * torch.tensor(0.5, dtype=torch.float32)


def num_blocks(numel: int) -> int:
    return (numel + BLOCK_SIZE - 1) // BLOCK_SIZE


def _pad_to_blocks(x: torch.Tensor) -> torch.Tensor:
    pad = num_blocks(x.numel()) * BLOCK_SIZE - x.numel()
    return torch.nn.functional.pad(x, (0, pad)).view(-1, BLOCK_SIZE)


def quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tensor -> (uint8 codes with x's numel, fp32 absmax per block of 256)."""
    flat = x.reshape(-1).to(torch.float32)
    blocks = _pad_to_blocks(flat)
    absmax = canonical_nan(blocks.abs().amax(dim=1))  # amax keeps a NaN
    one = torch.tensor(1.0, dtype=torch.float32)
    normal = absmax >= MIN_NORMAL
    inv = torch.where(normal, one / torch.where(normal, absmax, one), torch.zeros_like(absmax))
    normed = (blocks * inv[:, None]).reshape(-1)
    codes = torch.searchsorted(thresholds(qmap), normed, right=False)
    codes = torch.where(torch.isnan(normed), 0, codes)  # searchsorted would put a NaN last
    return codes.to(torch.uint8)[: flat.numel()].view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """(uint8 codes, absmax per block) -> fp32 tensor of codes' shape."""
    flat = codes.reshape(-1).long()
    values = qmap[flat]
    scale = absmax.repeat_interleave(BLOCK_SIZE)[: flat.numel()]
    return (values * scale).view(codes.shape)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply), on int64 tensors holding uint32 values."""
    mask = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def stochastic_rounding_bits(numel: int, seed: int, offset: int = 0) -> torch.Tensor:
    """The 16 random bits added before truncation to bf16, for elements offset .. offset+numel-1.

    ``r = mix32(lo32(i) ^ mix32(hi32(i) ^ seed32)) & 0xFFFF`` for global element index i: counter
    based, so every backend and every thread split draws the same bits for the same element.
    """
    index = torch.arange(offset, offset + numel, dtype=torch.int64)
    seed32 = torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64)
    hi = _mix32((index >> 32) ^ seed32)
    return _mix32((index & 0xFFFFFFFF) ^ hi) & 0xFFFF


def stochastic_round_to_bf16(x: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 -> bf16 by adding 16 random bits to the fp32 pattern and truncating.

    On the bit pattern throughout (torch's fp32 -> bf16 conversion would turn a NaN into 0xFFFF): the
    canonical NaN 0x7FC00000 becomes 0x7FC0 whatever the random bits.
    """
    bits = x.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = ((bits + stochastic_rounding_bits(bits.numel(), seed)) >> 16) & 0xFFFF
    bits = torch.where(bits >= 2 ** 15, bits - 2 ** 16, bits).to(torch.int16)
    return bits.view(torch.bfloat16).view(x.shape)


BF16_CANONICAL_NAN = 0x7FC0


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, round to nearest even; every NaN becomes the canonical quiet NaN 0x7FC0.

    Spelled out on the bit pattern because torch's own conversion is not one function for NaN: a 0-d
    tensor gives 0x7FC0, a vectorised one 0xFFFF. Infinities and overflow to infinity round as IEEE says.
    """
    bits = x.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    rounded = torch.where(torch.isnan(x.reshape(-1)), BF16_CANONICAL_NAN, rounded)
    rounded = torch.where(rounded >= 2 ** 15, rounded - 2 ** 16, rounded).to(torch.int16)
    return rounded.view(torch.bfloat16).view(x.shape)


@dataclass(frozen=True)
class StepConstants:
    """The fp32 constants of one step, computed in float64 on the host and rounded once."""

    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    eps: float
    grad_scale: float
    decay: float
    step_size: float
    inv_bc2_sqrt: float

    @classmethod
    def make(cls, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
             step: int, grad_scale: float = 1.0) -> "StepConstants":
        if step < 1:
            raise ValueError(f"step must be >= 1 (the count after this update), got {step}")
        return cls(beta1=beta1, beta2=beta2, one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2,
                   eps=eps, grad_scale=grad_scale, decay=1.0 - lr * weight_decay,
                   step_size=lr / (1.0 - beta1 ** step),
                   inv_bc2_sqrt=1.0 / math.sqrt(1.0 - beta2 ** step))

    def tensor(self, name: str) -> torch.Tensor:
        return torch.tensor(getattr(self, name), dtype=torch.float32)


def correctly_rounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    """IEEE sqrt of fp32 values. NOTE: torch.sqrt on CPU fp32 is not always correctly rounded (it
    differs from IEEE in the last bit for ~16% of inputs); sqrt in float64 rounded once to fp32 is."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def adamw_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                 c: StepConstants) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW update in fp32, operation by operation as the module docstring states; NaNs canonical."""
    t = c.tensor
    g = g * t("grad_scale")
    m = t("beta1") * m + t("one_minus_beta1") * g
    v = t("beta2") * v + t("one_minus_beta2") * (g * g)
    denom = correctly_rounded_sqrt(v) * t("inv_bc2_sqrt") + t("eps")
    p = p * t("decay") - t("step_size") * (m / denom)
    return canonical_nan(p), canonical_nan(m), canonical_nan(v)


def adamw8bit_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor,
                   param_bf16: torch.Tensor | None, found_inf: torch.Tensor | None,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   grad_scale: float, step: int, seed: int) -> None:
    """The reference implementation of the op ``astrobio::adamw8bit_step``; updates in place.

    ``exp_avg``/``exp_avg_sq`` are uint8 codes (with ``absmax1``/``absmax2``) or fp32 moments (the
    absmax tensors are then unused). ``param`` is fp32, or bf16 (stochastic rounding with ``seed``).
    ``param_bf16``, when given, receives the new weights rounded to nearest bf16. A non-zero
    ``found_inf`` skips the step.
    """
    if found_inf is not None and bool(found_inf.reshape(-1)[0] != 0):
        return
    c = StepConstants.make(lr, beta1, beta2, eps, weight_decay, step, grad_scale)
    quantized = exp_avg.dtype == torch.uint8
    p = param.reshape(-1).to(torch.float32)
    g = grad.reshape(-1).to(torch.float32)
    if quantized:
        m = dequantize_blockwise(exp_avg.reshape(-1), absmax1, qmap1)
        v = dequantize_blockwise(exp_avg_sq.reshape(-1), absmax2, qmap2)
    else:
        m, v = exp_avg.reshape(-1), exp_avg_sq.reshape(-1)
    p, m, v = adamw_update(p, g, m, v, c)
    if quantized:
        codes1, new_absmax1 = quantize_blockwise(m, qmap1)
        codes2, new_absmax2 = quantize_blockwise(v, qmap2)
        exp_avg.view(-1).copy_(codes1)
        exp_avg_sq.view(-1).copy_(codes2)
        absmax1.copy_(new_absmax1)
        absmax2.copy_(new_absmax2)
    else:
        exp_avg.view(-1).copy_(m)
        exp_avg_sq.view(-1).copy_(v)
    if param.dtype == torch.bfloat16:
        param.view(-1).copy_(stochastic_round_to_bf16(p, seed))
    else:
        param.view(-1).copy_(p)
    if param_bf16 is not None:
        param_bf16.view(-1).copy_(param.reshape(-1) if param.dtype == torch.bfloat16 else round_to_bf16(p))
