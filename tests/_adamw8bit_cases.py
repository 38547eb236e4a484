"""The initial state of one adamw8bit_step test case, shared by tests/test_adamw8bit_gpu.py and
tests/test_adamw8bit_triton.py (both compare a kernel with the reference from this state)."""

import torch

from astrobio.spec import adamw8bit as R

NAN_WITH_PAYLOAD = -0x3EDCBB  # int32 bits 0xFFC12345: a negative quiet NaN with a payload


def initial_state(n: int, quantized: bool, param_dtype: torch.dtype, copy: bool, edge: bool,
                  gen: torch.Generator) -> dict:
    """Random weights; random codes and absmax (8-bit moments: the first call already dequantizes)
    or random fp32 moments; a NaN-filled bf16 copy buffer when `copy`. `edge`: every 37th weight is
    NaN_WITH_PAYLOAD, and block 0's absmax is 1e-40, so that with zero gradients there its new
    absmax is subnormal (inverse 0, the zero code)."""
    state = {"param": torch.randn(n, generator=gen).to(param_dtype)}
    if edge:
        state["param"].view(torch.int32)[::37] = NAN_WITH_PAYLOAD
    if quantized:
        state["exp_avg"] = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
        state["exp_avg_sq"] = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
        state["absmax1"] = torch.rand(R.num_blocks(n), generator=gen) * 1e-2
        state["absmax2"] = torch.rand(R.num_blocks(n), generator=gen) * 1e-4
        if edge:
            state["absmax1"][0] = state["absmax2"][0] = 1e-40
    else:
        state["exp_avg"] = torch.randn(n, generator=gen) * 1e-2
        state["exp_avg_sq"] = torch.rand(n, generator=gen) * 1e-4
        state["absmax1"] = state["absmax2"] = torch.empty(0)
    state["param_bf16"] = torch.full((n,), float("nan"), dtype=torch.bfloat16) if copy else None
    return state


def edge_gradients(grad: torch.Tensor) -> None:
    """The edge case's gradients, in place: zero in block 0 (see initial_state); where the tensor is
    long enough, a NaN at element 300 and +inf at element 600 (blocks 1 and 2: NaN and inf moments,
    so the absmax is the canonical NaN or inf and the codes of NaN are 0), as a step that is given
    found_inf = 0 computes them."""
    grad[:R.BLOCK_SIZE] = 0.0
    if grad.numel() > 600:
        grad[300] = float("nan")
        grad[600] = float("inf")
