"""What autograd keeps for one transformer block, and for a pipeline's last stage, against the memory
planner's count (astrobio.memory.activations, astrobio.memory.peak): shared by the planner's tests (eager)
and the fused kernels' tests."""

from __future__ import annotations

import torch

from astrobio.memory import activations as act
from astrobio.memory.peak import StageShape, micro_batch_activations
from astrobio.model import build_stage, get_config, use_kernels
from astrobio.model.transformer import TransformerBlock, rotary_tables


class SavedBytes:
    """A ``saved_tensors_hooks`` pair that adds up the storages autograd saves, each once, except the
    ``skip``ped ones (parameters, rotary tables), and the shapes of the saved tensors."""

    def __init__(self, skip: list[torch.Tensor]):
        self.skip = {t.untyped_storage().data_ptr() for t in skip}
        self.saved: dict[int, int] = {}
        self.shapes: list[tuple[int, ...]] = []

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.saved[storage.data_ptr()] = storage.nbytes()
            self.shapes.append(tuple(t.shape))
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.saved.values())

    def holds_logits(self, tokens: int, vocab_size: int) -> bool:
        """Whether a saved tensor has the shape of all the logits ([tokens, vocab] or [batch, seq, vocab])."""
        return any(len(s) >= 2 and s[-1] == vocab_size and s[:-1].numel() == tokens
                   for s in map(torch.Size, self.shapes))


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
    saved = SavedBytes([*block.parameters(), cos, sin])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), saved.hooks():
        block(x, cos, sin)
    tokens, precision = act.Tokens(batch, seq), act.Precision.of(dtype.itemsize, autocast, cpu=True)
    planned = (act.block_saved_bytes(config, tokens, precision, kernels)
               + act.block_input_saved(config, tokens, precision, kernels))
    casts = sum(2 * p.numel() for name, p in block.named_parameters() if "norm" not in name) if autocast else 0
    return saved.total - casts, planned


def last_stage_saved_bytes(kernels: str, checkpointing: bool = False) -> dict:
    """A last pipeline stage (2 of 3 layers, fp32) computing its loss from a received input with its own
    ``loss``, as the pipeline executor runs it: what autograd saves (``measured``; the rotary tables'
    cos and sin, computed per call, left out as in the block count), whether a saved tensor has the
    logits' shape, the planner's ``micro_batch_activations`` for that stage (``planned``) and the bytes
    of the fp32 logits."""
    config = get_config("tiny", d_model=96, n_heads=3, ffn_hidden=200, n_layers=3, vocab_size=301)
    stage = build_stage(config, 1, [1, 2], seed=1, kernels=kernels)
    stage.gradient_checkpointing = checkpointing
    batch, seq = 2, 37
    x = torch.randn(batch, seq, config.d_model, requires_grad=True)
    targets = torch.randint(0, config.vocab_size, (batch, seq))
    cos, sin = rotary_tables(seq, config.head_dim, config.rope_theta, "cpu")
    saved = SavedBytes(list(stage.parameters()))
    with saved.hooks():
        stage.loss(x, targets)
    tokens, precision = act.Tokens(batch, seq), act.Precision.of(4, False)
    shape = StageShape(config, tokens, 2, False, True, precision, kernels)
    return {"measured": saved.total - cos.nbytes - sin.nbytes,
            "holds_logits": saved.holds_logits(tokens.count, config.vocab_size),
            "planned": micro_batch_activations(shape, checkpointing),
            "logits_fp32": 4 * tokens.count * config.vocab_size}
