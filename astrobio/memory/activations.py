"""Activation memory of RebuiltLLMIntegration, counted from its shapes.

What autograd keeps for one TransformerBlock (astrobio/model/transformer.py) over T = batch x seq
tokens, h = d_model, f = ffn_hidden, n = heads, with matrix products giving ``e`` bytes per element and
the residual stream ``r`` (bf16 weights: e = r = 2; fp32: e = r = 4; bf16 autocast over fp32 weights:
e = 2, r = 4, since the residual adds promote to fp32). Each line is a tensor the block's backward needs
(``saved_tensors_hooks`` on the real block lists exactly these; tests/test_memory_planner.py checks the
count against it in all three precisions):

    attn_norm   x.float(): a new fp32 copy when r < 4 (when r = 4 it is the block input itself)  4Th or 0
                normalised fp32 (saved by the weight multiply)                                   4Th
    mlp_norm    the residual in fp32 (a copy when r < 4, the residual itself otherwise)         4Th
                normalised fp32                                                                  4Th
    linears     the norms' outputs as wq/wk/wv and w_gate/w_up inputs: once each (2rTh) when
                e = r, else autocast's five separate bf16 casts (5eTh)
    attention   q and k after rotary, v (SDPA / flash keep q, k, v and the output)               3aTh
                the output (input of wo), logsumexp fp32                                         aTh + 4Tn
                (a = e, except on the CPU under autocast, where attention runs in fp32: a = 4, and wo
                keeps a bf16 cast of the output besides, eTh)
    SwiGLU      gate output (silu's input), silu output, up output, their product                4eTf

Rotary multiplies by constant tables and so saves only the (shared) cos / sin tables. The block input
is not saved by the block when r < 4 (a dtype copy and a residual add keep nothing); under activation
checkpointing the checkpoint keeps it (rTh per layer) and the backward recomputes one block at a time.

Backward of one block additionally holds a few gradients at once; the largest moment is the SwiGLU
product's backward: the product's gradient and the two it produces (3eTf), plus the residual stream's
gradient in and out (2rTh).

With the fused kernels (``kernels="fused"``, astrobio/model/fast.py) the block keeps less:

    attn_norm   the block input itself and one fp32 rstd per token                             rTh + 4T
    mlp_norm    the residual stream h = x + attention (its kernel adds and normalises)          rTh + 4T
    linears     as above
    attention   as above (the rotary kernel keeps only the tables)
    SwiGLU      gate and up (silu * up recomputes the sigmoid), the product as w_down's input   3eTf

and the loss (``linear_cross_entropy``) computes its gradients in the forward, chunk by chunk: it keeps
the gradients of the head's input and of the head weight until the backward, never all the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from astrobio.model import ModelConfig

FP32 = 4
KERNELS = ("eager", "fused")


@dataclass(frozen=True)
class Tokens:
    """One micro-batch's shape."""
    batch: int
    seq: int

    @property
    def count(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class Precision:
    """Bytes per element of matrix-product outputs, of the residual stream, and of what attention keeps
    (the model's ``attend`` runs attention in fp32 on the CPU under autocast)."""
    matmul: int
    residual: int
    attention: int | None = None  # None: the matmul dtype's

    @classmethod
    def of(cls, param_bytes: int, autocast: bool, cpu: bool = False) -> "Precision":
        matmul = 2 if (param_bytes == 2 or autocast) else 4
        return cls(matmul, param_bytes, FP32 if (cpu and autocast) else None)


def check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")


def block_saved_bytes(config: ModelConfig, tokens: Tokens, p: Precision, kernels: str = "eager") -> int:
    """Bytes one block's autograd graph keeps, not counting the block input (see ``block_input_saved``)."""
    check_kernels(kernels)
    t, h, f, e, r = tokens.count, config.d_model, config.ffn_hidden, p.matmul, p.residual
    if kernels == "fused":
        norms = r * t * h  # mlp_norm's residual stream; attn_norm's input is the block input
        mlp = 3 * e * t * f
    else:
        norms = (FP32 * t * h if r < FP32 else 0) + 3 * FP32 * t * h
        mlp = 4 * e * t * f
    linear_inputs = 2 * r * t * h if e == r else 5 * e * t * h
    a = p.attention or e
    attention = 4 * a * t * h + (e * t * h if a != e else 0) + FP32 * t * config.n_heads
    rsqrt = 2 * FP32 * t
    return norms + linear_inputs + attention + mlp + rsqrt


def block_input_saved(config: ModelConfig, tokens: Tokens, p: Precision, kernels: str = "eager") -> int:
    """The block input is saved by attn_norm only when it already is fp32 (``x.float()`` is ``x``);
    the fused kernel always keeps it."""
    check_kernels(kernels)
    keeps = p.residual == FP32 or kernels == "fused"
    return p.residual * tokens.count * config.d_model if keeps else 0


def hidden_bytes(config: ModelConfig, tokens: Tokens, p: Precision) -> int:
    """One residual-stream tensor [batch, seq, d_model]: a checkpoint, a stage boundary."""
    return p.residual * tokens.count * config.d_model


def block_backward_transient(config: ModelConfig, tokens: Tokens, p: Precision) -> int:
    """Gradients alive at once inside one block's backward (see the module docstring)."""
    t = tokens.count
    return t * (3 * p.matmul * config.ffn_hidden + 2 * p.residual * config.d_model)


def head_saved_bytes(config: ModelConfig, tokens: Tokens, p: Precision, kernels: str = "eager",
                     chunked_loss: bool | None = None) -> int:
    """Final RMSNorm (fp32 input copy or the fp32 input, normalised fp32; fused: its input and rstd) and
    the head's input; with the chunked loss (``chunked_loss``, by default the fused kernels': on the CPU
    the fused layers keep the eager loss) the head's input gradient and weight gradient instead, computed
    in the forward and kept until the backward."""
    check_kernels(kernels)
    t, h = tokens.count, config.d_model
    chunked = kernels == "fused" if chunked_loss is None else chunked_loss
    norm = p.residual * t * h + FP32 * t if kernels == "fused" else 2 * FP32 * t * h
    return norm + p.matmul * t * h + (p.matmul * config.vocab_size * h if chunked else 0)


def loss_working_bytes(config: ModelConfig, tokens: Tokens, chunks: int = 1) -> int:
    """Cross-entropy over the logits, at its backward's peak.

    ``cross_entropy(logits.float(), ...)`` keeps the fp32 log-softmax output; the logits in the
    activation dtype are released once their fp32 copy exists (the trainer and the pipeline executor
    keep only the loss), so the forward holds at most (e + 8) bytes per logit. The backward holds the
    saved log-probabilities, the dense fp32 gradient of the log-probabilities and that of the logits at
    once: 12 bytes per logit, the larger of the two. Computed ``chunks`` pieces at a time (head + loss
    per chunk of the sequence) it divides by ``chunks``.
    """
    return -(-3 * FP32 * tokens.count * config.vocab_size // chunks)


def fused_loss_working_bytes(config: ModelConfig, tokens: Tokens, p: Precision, chunk_tokens: int | None = None) -> int:
    """The chunked loss's forward peak beyond what ``head_saved_bytes(kernels="fused")`` counts: one
    chunk of logits in the matmul dtype, the fp32 head-weight gradient being accumulated, and one fp32
    loss per token (astrobio.kernels.cross_entropy; its default chunk holds 2**26 logits)."""
    v = config.vocab_size
    chunk = min(tokens.count, chunk_tokens or max(1, (1 << 26) // v))
    return p.matmul * chunk * v + FP32 * v * config.d_model + FP32 * tokens.count
