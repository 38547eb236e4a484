"""What autograd keeps for one transformer block, against the memory planner's count
(astrobio.memory.activations): shared by the planner's tests (eager block) and the fused kernels' tests."""

from __future__ import annotations

import torch

from astrobio.memory import activations as act
from astrobio.model import get_config, use_kernels
from astrobio.model.transformer import TransformerBlock, rotary_tables


def saved_and_planned_bytes(dtype: torch.dtype, autocast: bool, kernels: str = "eager") -> tuple[int, int]:
    """(bytes autograd saves for one block's backward, less autocast's bf16 weight casts, which the
    planner counts apart; the planner's bytes for the same block). The norms' fp32 weight copies under
    bf16 weights (2 x 4h bytes) are the only saved tensors the planner does not count."""
    config = get_config("tiny", d_model=96, n_heads=3, ffn_hidden=200)
    block = TransformerBlock(config).to(dtype)
    if kernels != "eager":
        use_kernels(block, kernels)
    batch, seq = 2, 37
    x = torch.randn(batch, seq, config.d_model, dtype=dtype, requires_grad=True)
    cos, sin = rotary_tables(seq, config.head_dim, config.rope_theta, "cpu")
    skip = {t.untyped_storage().data_ptr() for t in [*block.parameters(), cos, sin]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x, cos, sin)
    tokens, precision = act.Tokens(batch, seq), act.Precision.of(dtype.itemsize, autocast)
    planned = (act.block_saved_bytes(config, tokens, precision, kernels)
               + act.block_input_saved(config, tokens, precision, kernels))
    casts = sum(2 * p.numel() for name, p in block.named_parameters() if "norm" not in name) if autocast else 0
    return sum(saved.values()) - casts, planned
