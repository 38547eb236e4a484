"""The 8-bit AdamW step as a Triton kernel: the op ``astrobio::adamw8bit_step_triton``.

Computes exactly what astrobio/spec/adamw8bit.py specifies (the same arithmetic as the C++ and
CUDA kernels, bit for bit): each program owns ``ROWS`` quantization blocks of 256 elements as a
[ROWS, 256] tile, so a block's absmax is a row reduction and the whole step is one pass over memory.
Rounding is made explicit where Triton's defaults differ from IEEE: ``tl.div_rn`` and ``tl.sqrt_rn``
(plain ``/`` and ``tl.sqrt`` are approximate on the GPU) and ``enable_fp_fusion=False`` (no
multiply-add contraction). Every fp32 NaN written is the canonical quiet NaN 0x7FC00000.

The nearest code (the number of thresholds ``(qmap[i] + qmap[i + 1]) * 0.5`` below x; 0 for a NaN)
is a direct lookup, as in the CUDA kernel (csrc/cuda/adamw8bit.cu; docs/GPU.md): a byte table indexed by the sign,
exponent and top 6 mantissa bits of x gives ``base``, the count below the bucket's smallest value, and
the code is ``base`` plus how many of the next two thresholds (one 8-byte load) lie below x. The tables
are built from the maps by torch ops (``lookup_tables``, cached per pair of maps), with a flag saying
whether every bucket holds at most two thresholds (both dynamic maps do); where one does not, the
kernel takes the 8-probe binary search instead.

``adamw8bit_step`` takes the op's argument list (csrc/ops.cpp), validates it as the C++ op does and
runs the kernel; astrobio.ops routes the backend "triton" here. Runs on CUDA tensors, or on CPU
tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` set before triton is imported).
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from astrobio import _C
from astrobio.spec.adamw8bit import BLOCK_SIZE, StepConstants, thresholds

QMAP_SIZE = 256
# Launch variants (docs/GPU.md): (quantization blocks per program, warps per program); every variant
# computes the same bits. benchmarks/tune_adamw8bit_gpu.py times them all; LAUNCH_VARIANT picks: (2, 2),
# the fastest on an H200 (53.4% of the copy against 49.8% for (4, 4); docs/BENCHMARKS.md).
LAUNCH_VARIANTS = ((4, 4), (8, 8), (2, 2), (8, 4))
LAUNCH_VARIANT = 2

# The lookup key of x: |x|'s biased exponent and top KEY_BITS mantissa bits, clamped to
# [MIN_KEY, MAX_KEY] (2^-20 .. 1), then the sign: BUCKETS buckets per sign (csrc/cuda/adamw8bit.cu).
KEY_BITS = 6
MIN_KEY = 107 << KEY_BITS
MAX_KEY = 127 << KEY_BITS
BUCKETS = MAX_KEY - MIN_KEY + 1


@triton.jit
def _mix32(x):
    """reference._mix32 on uint32 values (the products wrap modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _threshold_pair(pairs_ptr, index):
    """(t[index], t[index + 1]) from the int64 pair table (little-endian: the low word is t[index])."""
    pair = tl.load(pairs_ptr + index)
    low = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    high = ((pair >> 32) & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    return low, high


@triton.jit
def _nearest_code(n, base_ptr, pairs_ptr, exact, KEY_BITS: tl.constexpr, MIN_KEY: tl.constexpr,
                  MAX_KEY: tl.constexpr, BUCKETS: tl.constexpr):
    """The number of the 255 thresholds strictly below n (reference.quantize_blockwise)."""
    if exact:  # direct lookup: the bucket's base, then two compares
        bits = n.to(tl.uint32, bitcast=True)
        magnitude = bits & 0x7FFFFFFF
        key = tl.minimum(tl.maximum(magnitude >> (23 - KEY_BITS), MIN_KEY), MAX_KEY)
        negative = (bits >> 31) | (magnitude > 0x7F800000).to(tl.uint32)  # a NaN: the -inf bucket, code 0
        bucket = (key - MIN_KEY + negative * BUCKETS).to(tl.int32)
        base = tl.load(base_ptr + bucket).to(tl.int32)
        t0, t1 = _threshold_pair(pairs_ptr, base)
        code = base + (n > t0).to(tl.int32) + (n > t1).to(tl.int32)
    else:  # a map with more than two thresholds in some bucket: binary search of 8 probes
        code = tl.zeros(n.shape, tl.int32)
        for k in tl.static_range(8):  # probe widths 128, 64, ..., 1
            probe, _ = _threshold_pair(pairs_ptr, code + ((128 >> k) - 1))
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


@triton.jit
def _canonical(x):
    """Every NaN as the canonical quiet NaN 0x7FC00000 (positive, no payload)."""
    nan = tl.full(x.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    return tl.where(x != x, nan, x)


@triton.jit
def _block_absmax(x):
    """Each row's max |x|, a NaN kept (as the canonical NaN): the max of the |x| bit patterns, whose
    integer order is the float order for non-negative floats, with every NaN above +inf."""
    bits = tl.max((x.to(tl.int32, bitcast=True) & 0x7FFFFFFF), axis=1)
    return tl.where(bits > 0x7F800000, 0x7FC00000, bits).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["seed"])
def _adamw8bit_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, absmax1_ptr, absmax2_ptr,
                      qmap1_ptr, qmap2_ptr, base1_ptr, base2_ptr, pairs1_ptr, pairs2_ptr, exact_ptr,
                      param_bf16_ptr, found_inf_ptr, numel,
                      beta1, beta2, one_minus_beta1, one_minus_beta2, eps, grad_scale, decay, step_size,
                      inv_bc2_sqrt, seed,
                      QUANTIZED: tl.constexpr, PARAM_IS_BF16: tl.constexpr, WRITE_BF16: tl.constexpr,
                      HAS_FOUND_INF: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                      KEY_BITS: tl.constexpr, MIN_KEY: tl.constexpr, MAX_KEY: tl.constexpr,
                      BUCKETS: tl.constexpr):
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # quantization block of each row
    offs = block[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]         # 64-bit element indices
    if HAS_FOUND_INF:  # a skipped step updates no element
        limit = tl.where(tl.load(found_inf_ptr) == 0.0, numel, 0)
    else:
        limit = numel
    mask = offs < limit
    row_mask = block < tl.cdiv(limit, BLOCK)

    # Streaming data is read once: evict it first, so the lookup tables stay in L1.
    p = tl.load(param_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if QUANTIZED:
        code1 = tl.load(exp_avg_ptr + offs, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
        code2 = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
        scale1 = tl.load(absmax1_ptr + block, mask=row_mask, other=0.0)
        scale2 = tl.load(absmax2_ptr + block, mask=row_mask, other=0.0)
        m = tl.where(mask, tl.load(qmap1_ptr + code1) * scale1[:, None], 0.0)
        v = tl.where(mask, tl.load(qmap2_ptr + code2) * scale2[:, None], 0.0)
    else:
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")

    # reference.adamw_update, operation by operation
    g = g * grad_scale
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
    p = p * decay - step_size * tl.div_rn(m, denom)

    if PARAM_IS_BF16:  # stochastic rounding with the counter hash of the global index
        hi = _mix32((offs >> 32).to(tl.uint32) ^ seed.to(tl.uint32, bitcast=True))
        r = _mix32(offs.to(tl.uint32) ^ hi) & 0xFFFF
        bf16_bits = ((_canonical(p).to(tl.uint32, bitcast=True) + r) >> 16).to(tl.uint16)
        tl.store(param_ptr + offs, bf16_bits.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        p = _canonical(p)
        tl.store(param_ptr + offs, p, mask=mask)
        bf16_bits = _round_nearest_bf16_bits(p)
    if WRITE_BF16:
        tl.store(param_bf16_ptr + offs, bf16_bits.to(tl.bfloat16, bitcast=True), mask=mask)

    if QUANTIZED:  # masked elements hold m = v = 0 and leave the absmax unchanged
        max1 = _block_absmax(m)
        max2 = _block_absmax(v)
        inv1 = _inverse_or_zero(max1)
        inv2 = _inverse_or_zero(max2)
        exact = tl.load(exact_ptr) != 0
        code1 = _nearest_code(m * inv1[:, None], base1_ptr, pairs1_ptr, exact, KEY_BITS, MIN_KEY, MAX_KEY, BUCKETS)
        code2 = _nearest_code(v * inv2[:, None], base2_ptr, pairs2_ptr, exact, KEY_BITS, MIN_KEY, MAX_KEY, BUCKETS)
        tl.store(exp_avg_ptr + offs, code1.to(tl.uint8), mask=mask)
        tl.store(exp_avg_sq_ptr + offs, code2.to(tl.uint8), mask=mask)
        tl.store(absmax1_ptr + block, max1, mask=row_mask)
        tl.store(absmax2_ptr + block, max2, mask=row_mask)
    else:
        tl.store(exp_avg_ptr + offs, _canonical(m), mask=mask)
        tl.store(exp_avg_sq_ptr + offs, _canonical(v), mask=mask)


def _bucket_bounds(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and the largest fp32 value of every lookup bucket, the positive ones first: from
    0 (or 1.0 for the top bucket, which runs to +inf) to just below the next bucket's first value."""
    i = torch.arange(BUCKETS, dtype=torch.int64, device=device)
    key = MIN_KEY + i
    small = torch.where(i == 0, 0, key << (23 - KEY_BITS))
    large = torch.where(key == MAX_KEY, 0x7F800000, ((key + 1) << (23 - KEY_BITS)) - 1)
    lo, hi = small.to(torch.int32).view(torch.float32), large.to(torch.int32).view(torch.float32)
    return torch.cat([lo, -hi]), torch.cat([hi, -lo])


def _build_lookup_tables(qmap1: torch.Tensor, qmap2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    t = torch.stack([thresholds(qmap1), thresholds(qmap2)])  # [2, 255], the specification's thresholds
    lo, hi = _bucket_bounds(t.device)
    base = torch.searchsorted(t, lo.expand(2, -1).contiguous())  # thresholds below the smallest value
    top = torch.searchsorted(t, hi.expand(2, -1).contiguous())
    exact = ((top - base) <= 2).all().to(torch.int32).reshape(1)
    padded = torch.cat([t, torch.full((2, 2), float("inf"), device=t.device)], dim=1)  # t[255] = t[256] = inf
    pairs = torch.stack([padded[:, :-1], padded[:, 1:]], dim=2).contiguous().view(torch.int64).reshape(2, QMAP_SIZE)
    return base.to(torch.uint8), pairs, exact


_LOOKUP_CACHE: dict = {}
_LOOKUP_CACHE_SIZE = 8


def lookup_tables(qmap1: torch.Tensor, qmap2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(base [2, 2 * BUCKETS] uint8, pairs [2, 256] int64, exact [1] int32) for the two maps.

    Cached per pair of maps (their memory and version counters: an in-place change rebuilds; the
    cache holds the maps, so their memory cannot be reused meanwhile); a step of AdamW8bit passes the
    same two maps every time, so the ~15 small torch ops run once. Traced (fake) tensors are not cached.
    """
    if is_fake(qmap1) or is_fake(qmap2):
        return _build_lookup_tables(qmap1, qmap2)
    key = (qmap1.device, qmap1.data_ptr(), qmap1._version, qmap2.data_ptr(), qmap2._version)
    hit = _LOOKUP_CACHE.get(key)
    if hit is None:
        if len(_LOOKUP_CACHE) >= _LOOKUP_CACHE_SIZE:
            _LOOKUP_CACHE.pop(next(iter(_LOOKUP_CACHE)))
        hit = _LOOKUP_CACHE[key] = (qmap1, qmap2, _build_lookup_tables(qmap1, qmap2))
    return hit[2]


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
    rows, num_warps = LAUNCH_VARIANTS[LAUNCH_VARIANT]
    grid = (triton.cdiv(numel, rows * BLOCK_SIZE),)
    # Unused pointer arguments get `param`: the constexpr flags keep the kernel from touching them.
    if quantized:
        base, pairs, exact = lookup_tables(qmap1, qmap2)
        maps = (qmap1, qmap2, base[0], base[1], pairs[0], pairs[1], exact)
    else:
        maps = (param,) * 7
    wrap_triton(_adamw8bit_kernel)[grid](
        param, grad, exp_avg, exp_avg_sq,
        absmax1 if quantized else param, absmax2 if quantized else param, *maps,
        param if param_bf16 is None else param_bf16, param if found_inf is None else found_inf, numel,
        c.beta1, c.beta2, c.one_minus_beta1, c.one_minus_beta2, c.eps, c.grad_scale, c.decay, c.step_size,
        c.inv_bc2_sqrt, seed32 - (1 << 32) if seed32 >= (1 << 31) else seed32,  # the uint32's int32 bits
        QUANTIZED=quantized, PARAM_IS_BF16=param.dtype == torch.bfloat16, WRITE_BF16=param_bf16 is not None,
        HAS_FOUND_INF=found_inf is not None, ROWS=rows, BLOCK=BLOCK_SIZE, KEY_BITS=KEY_BITS, MIN_KEY=MIN_KEY,
        MAX_KEY=MAX_KEY, BUCKETS=BUCKETS, num_warps=num_warps, enable_fp_fusion=False)


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
