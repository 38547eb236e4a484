"""The specification itself (astrobio/spec/adamw8bit.py) against independent references:
torch.optim.AdamW for the update, brute-force nearest-code search for quantization, and the
statistics of stochastic rounding."""

import math

import pytest
import torch

from astrobio.spec import adamw8bit as R


def test_maps_have_the_dynamic_structure():
    signed, unsigned = R.dynamic_map(True), R.dynamic_map(False)
    for table in (signed, unsigned):
        assert table.shape == (256,) and table.dtype == torch.float32
        assert bool((table[1:] > table[:-1]).all())
        assert table.max().item() == 1.0 and (table == 0).sum().item() == 1
    assert signed.min().item() < -0.99 and unsigned.min().item() == 0.0
    # 7 decimal exponents: the smallest positive codes sit at 10^-6 scale, 2^e codes per exponent (signed)
    positive = signed[signed > 0]
    assert positive.numel() == 128 and math.isclose(positive[0].item(), 0.55e-6, rel_tol=1e-6)
    assert (unsigned > 0).sum().item() == 255


def brute_force_nearest(normed: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """argmin |qmap - x| in float64, ties to the lower code."""
    dist = (normed.double()[:, None] - qmap.double()[None, :]).abs()
    return dist.argmin(dim=1)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_picks_the_nearest_code(signed):
    torch.manual_seed(0)
    qmap = R.dynamic_map(signed)
    x = torch.randn(4 * R.BLOCK_SIZE + 17) * torch.logspace(-5, 0, 4 * R.BLOCK_SIZE + 17)
    if not signed:
        x = x.abs()
    codes, absmax = R.quantize_blockwise(x, qmap)
    blocks = torch.nn.functional.pad(x, (0, R.num_blocks(x.numel()) * R.BLOCK_SIZE - x.numel())).view(-1, R.BLOCK_SIZE)
    assert torch.equal(absmax, blocks.abs().amax(1))
    normed = (blocks * (1.0 / absmax)[:, None]).reshape(-1)[: x.numel()]
    expected = brute_force_nearest(normed, qmap)
    # fp32 thresholds may differ from exact midpoints only for values within an ulp of a midpoint
    mismatch = (codes.long() != expected).nonzero().flatten()
    for i in mismatch.tolist():
        lo, hi = sorted((codes[i].item(), expected[i].item()))
        assert hi - lo == 1 and abs(normed[i].item() - (qmap[lo].item() + qmap[hi].item()) / 2) < 1e-6
    assert mismatch.numel() <= 2
    # dequantized error is bounded by half the local code gap times absmax
    back = R.dequantize_blockwise(codes, absmax, qmap)
    gaps = torch.cat([qmap[1:] - qmap[:-1], torch.zeros(1)])
    bound = torch.maximum(gaps[codes.long()], gaps[(codes.long() - 1).clamp(min=0)]) * 0.5 + 1e-12
    scale = absmax.repeat_interleave(R.BLOCK_SIZE)[: x.numel()]
    assert bool(((back - x).abs() <= bound * scale * (1 + 1e-5)).all())


def test_all_zero_block_quantizes_to_zero():
    qmap = R.dynamic_map(True)
    codes, absmax = R.quantize_blockwise(torch.zeros(300), qmap)
    assert torch.equal(absmax, torch.zeros(2))
    assert bool((qmap[codes.long()] == 0).all())


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fp32_moment_path_matches_torch_adamw(weight_decay):
    torch.manual_seed(1)
    p0 = torch.randn(1000)
    ours, theirs = p0.clone(), torch.nn.Parameter(p0.clone())
    m, v = torch.zeros(1000), torch.zeros(1000)
    opt = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    for step in range(1, 31):
        g = torch.randn(1000)
        R.adamw8bit_step(ours, g, m, v, torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0), None,
                         None, 1e-2, 0.9, 0.99, 1e-8, weight_decay, 1.0, step, 0)
        theirs.grad = g
        opt.step()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, opt.state[theirs]["exp_avg"], rtol=1e-5, atol=1e-7)


def test_grad_scale_is_applied_in_kernel():
    torch.manual_seed(2)
    p, g = torch.randn(500), torch.randn(500)
    a, b = p.clone(), p.clone()
    state = lambda: (torch.zeros(500), torch.zeros(500))  # noqa: E731
    e = torch.empty(0)
    R.adamw8bit_step(a, g, *state(), e, e, e, e, None, None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.25, 1, 0)
    R.adamw8bit_step(b, g * 0.25, *state(), e, e, e, e, None, None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0, 1, 0)
    assert torch.equal(a, b)


def test_found_inf_skips_everything():
    p = torch.randn(5000)
    q1, q2 = R.dynamic_map(True), R.dynamic_map(False)
    m, a1 = R.quantize_blockwise(torch.randn(5000), q1)
    v, a2 = R.quantize_blockwise(torch.rand(5000), q2)
    before = [t.clone() for t in (p, m, v, a1, a2)]
    R.adamw8bit_step(p, torch.randn(5000), m, v, a1, a2, q1, q2, None, torch.ones(1), 1e-3, 0.9, 0.999, 1e-8,
                     0.01, 1.0, 1, 0)
    for x, y in zip(before, (p, m, v, a1, a2)):
        assert torch.equal(x, y)


def test_stochastic_rounding_is_unbiased_and_brackets_the_value():
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # between two bf16 neighbours, 1/8 of the way up
    rounded = R.stochastic_round_to_bf16(x, seed=123).float()
    lo, hi = 1.0, 1.0 + 2 ** -7
    assert set(torch.unique(rounded).tolist()) == {lo, hi}
    frac_up = (rounded == hi).float().mean().item()
    assert abs(frac_up - 0.125) < 0.005
    assert not torch.equal(rounded, R.stochastic_round_to_bf16(x, seed=124).float())
    assert torch.equal(rounded, R.stochastic_round_to_bf16(x, seed=123).float())


def test_stochastic_rounding_bits_are_counter_based():
    whole = R.stochastic_rounding_bits(1000, seed=7, offset=2 ** 33)
    part = R.stochastic_rounding_bits(10, seed=7, offset=2 ** 33 + 500)
    assert torch.equal(whole[500:510], part)
    assert int(whole.max()) <= 0xFFFF and int(whole.min()) >= 0


def test_step_constants_reject_step_zero():
    with pytest.raises(ValueError, match="step must be >= 1"):
        R.StepConstants.make(1e-3, 0.9, 0.999, 1e-8, 0.0, step=0)


NAN_PATTERNS = [0x7FC00000, 0xFFC00000, 0x7FC12345, 0xFFFFFFFF, 0x7F800001]  # quiet, negative, payloads, signalling


def nan_floats(patterns) -> torch.Tensor:
    return torch.tensor([p - 2 ** 32 if p >= 2 ** 31 else p for p in patterns], dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("master", [torch.float32, torch.bfloat16])
def test_every_nan_output_is_the_canonical_nan(quantized, master):
    """NaN weights of any sign and payload, a NaN and an infinite gradient: every fp32 output that is NaN
    is 0x7FC00000, every bf16 one 0x7FC0, a NaN normalised moment is code 0 (none is below it)."""
    n = 5000 if quantized else 600
    torch.manual_seed(3)
    p = torch.randn(n)
    p[:: 53][: len(NAN_PATTERNS)] = nan_floats(NAN_PATTERNS)
    p = p.to(master)
    g = torch.randn(n)
    g[7], g[300] = math.nan, -math.inf  # blocks 0 and 1: a NaN absmax and an infinite one
    if quantized:
        q1, q2 = R.dynamic_map(True), R.dynamic_map(False)
        m, a1 = R.quantize_blockwise(torch.randn(n) * 1e-3, q1)
        v, a2 = R.quantize_blockwise(torch.rand(n) * 1e-6, q2)
    else:
        q1 = q2 = a1 = a2 = torch.empty(0)
        m, v = torch.randn(n) * 1e-3, torch.rand(n) * 1e-6
    copy = torch.empty(n, dtype=torch.bfloat16)
    R.adamw8bit_step(p, g, m, v, a1, a2, q1, q2, copy, None, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0, 3, 11)
    fp32_outputs = [p] if master == torch.float32 else []
    fp32_outputs += [a1, a2] if quantized else [m, v]
    assert int(torch.isnan(p.float()).sum()) >= len(NAN_PATTERNS) + 2
    for out in fp32_outputs:
        bits = out.view(torch.int32)[torch.isnan(out)]
        assert bits.numel() > 0 and bool((bits == R.CANONICAL_NAN).all())
    for out in [copy] + ([p] if master == torch.bfloat16 else []):
        bits = out.view(torch.int16)[torch.isnan(out)]
        assert bits.numel() > 0 and bool((bits == R.BF16_CANONICAL_NAN).all())
    if quantized:
        assert int(m[7]) == 0 and int(v[7]) == 0  # NaN * 0 is NaN: code 0
        assert int(m[300]) == 0  # -inf * 0 (inv of an infinite absmax) is NaN: code 0
        zero = int((q1 == 0).nonzero()[0])
        assert int(m[8]) == zero  # a finite moment in a NaN block: x * 0 = 0
