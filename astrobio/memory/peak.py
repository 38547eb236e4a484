"""The device peak of one pipeline stage, taken at the worst moment of its steady-state step: the
backward of the last in-flight micro-batch, walked layer by layer (the loss, then each block from the
last), with the other in-flight micro-batches' activations, the gradients alive at that moment and
autograd's casts; and, when the optimizer runs on the device, the optimizer step itself.

How many micro-batches a stage holds at each backward comes from the schedule itself
(astrobio.parallel.schedules); what one micro-batch holds from the layer's shapes
(astrobio.memory.activations). docs/MEMORY.md explains each term.
"""

from __future__ import annotations

from dataclasses import dataclass

from astrobio.memory import activations as act
from astrobio.memory.budget import PlanConfig
from astrobio.model import ModelConfig
from astrobio.parallel.schedules import compute_order, normalize_kind


@dataclass
class StageShape:
    model: ModelConfig
    tokens: act.Tokens
    layers: int
    is_first: bool
    is_last: bool
    precision: act.Precision
    kernels: str = "eager"  # the model's layers and loss (astrobio.memory.activations.KERNELS)
    chunked_loss: bool | None = None  # None: with the fused kernels (on the CPU they keep the eager loss)

    @property
    def fused(self) -> bool:
        """Whether the loss is the fused kernels' chunked cross-entropy (no logits kept)."""
        return self.kernels == "fused" if self.chunked_loss is None else self.chunked_loss


def splits_backward(schedule: str, stage: int) -> bool:
    """ZB-H1 splits B and W on every stage but the first (the executor: stage 0 has no input to wait for)."""
    return schedule == "zb-h1" and stage > 0


def occupancy(schedule: str, stages: int, stage: int, micro_batches: int) -> list[tuple[int, int]]:
    """For each backward of the stage, in the schedule's order: how many other micro-batches it holds
    waiting for their B, and how many waiting for their W (from astrobio.parallel's schedule)."""
    split = splits_backward(schedule, stage)
    waiting_b: set[int] = set()
    waiting_w: set[int] = set()
    out = []
    for op, mb in compute_order(normalize_kind(schedule), stage, stages, micro_batches):
        if op == "F":
            waiting_b.add(mb)
        elif op == "B":
            waiting_b.discard(mb)
            out.append((len(waiting_b), len(waiting_w)))
            if split:
                waiting_w.add(mb)
        else:
            waiting_w.discard(mb)
    return out


def micro_batch_activations(s: StageShape, checkpointing: bool) -> int:
    """What one micro-batch leaves on a stage between its forward and its backward. A sent output is
    released once sent (the executor keeps its autograd edge only); a received input is kept for B."""
    m, t, p, k = s.model, s.tokens, s.precision, s.kernels
    head = act.head_saved_bytes(m, t, p, k, s.fused) if s.is_last else 0
    if checkpointing:
        return s.layers * act.hidden_bytes(m, t, p) + head
    per_layer = act.block_saved_bytes(m, t, p, k) + act.block_input_saved(m, t, p, k)
    # the received input is kept for B; the first block counts it already where its norm saves its input
    held_input = act.hidden_bytes(m, t, p) if not (s.is_first or act.block_input_saved(m, t, p, k)) else 0
    return s.layers * per_layer + held_input + head


def caught_grad_bytes(s: StageShape, layers: int) -> int:
    """Gradients of Linear outputs that a split backward keeps for W: q, k, v, o, down (h wide),
    gate, up (f wide) per block; the logits' gradient on the last stage (not with the fused chunked
    loss, which computes the head's gradient in F)."""
    m, t, e = s.model, s.tokens.count, s.precision.matmul
    head = e * t * m.vocab_size if s.is_last and not s.fused else 0
    return layers * e * t * (5 * m.d_model + 2 * m.ffn_hidden) + head


def w_pending_bytes(s: StageShape, checkpointing: bool) -> int:
    """A micro-batch between its B and its W: the retained graph (its activations, and on the last
    stage the eager loss's fp32 log-probabilities) and the caught output gradients."""
    loss_saved = act.FP32 * s.tokens.count * s.model.vocab_size if s.is_last and not s.fused else 0
    return micro_batch_activations(s, checkpointing) + loss_saved + caught_grad_bytes(s, s.layers)


def module_key(name: str) -> str:
    """``layers.7.attn.wq.weight`` -> ``7``; ``embed.weight`` -> ``embed``."""
    return name.split(".")[1] if name.startswith("layers.") else name.split(".")[0]


def layer_grad_bytes(tensors: list[tuple[str, int]], grad_bytes: int) -> dict[str, int]:
    """Gradient bytes per block (keyed by its global index) and for the rest (embed, norm, head)."""
    out: dict[str, int] = {}
    for name, n in tensors:
        out[module_key(name)] = out.get(module_key(name), 0) + grad_bytes * n
    return out


def backward_moments(s: StageShape, cfg: PlanConfig, grads: dict[str, int], others: int, split: bool,
                     grads_resident: bool, grad_in_flight) -> list[tuple[str, int, int, int]]:
    """(moment, activations, loss working set, gradients) through one micro-batch's backward.

    Under a split backward (ZB-H1) the graph is retained for W, so nothing is freed as B proceeds and
    the caught Linear-output gradients pile up."""
    m, t, p = s.model, s.tokens, s.precision
    full = micro_batch_activations(s, cfg.checkpointing)
    layer_keys = sorted((k for k in grads if k.isdigit()), key=int)
    accumulated = sum(grads.values()) if (grads_resident and cfg.micro_batches > 1) else 0
    out = []
    done = 0
    if s.is_last and s.fused:
        # the chunked loss's forward (one chunk of logits, the fp32 head-weight gradient being summed),
        # then its backward: the head's gradient, and the hidden states' gradient scaled
        out.append(("forward of the chunked loss", others + full, act.fused_loss_working_bytes(m, t, p),
                    accumulated))
        done = grads.get("head", 0) + grads.get("norm", 0)
        out.append(("backward of the chunked loss", others + full, p.matmul * t.count * m.d_model,
                    (accumulated or done) if grads_resident else grad_in_flight("head")))
    elif s.is_last:
        loss = act.loss_working_bytes(m, t, cfg.loss_chunks)
        # no gradient of this micro-batch exists yet; then the head's backward holds the logits'
        # gradient in the activation dtype and produces the head's (largest) weight gradient
        out.append(("backward of the loss", others + full, loss, accumulated))
        done = grads.get("head", 0) + grads.get("norm", 0)
        logits_grad = -(-p.matmul * t.count * m.vocab_size // cfg.loss_chunks)
        out.append(("backward of the head", others + full, logits_grad,
                    (accumulated or done) if grads_resident else grad_in_flight("head")))
    hidden = act.hidden_bytes(m, t, p)
    # under checkpointing the block input is the checkpoint itself, already counted in ``hidden``
    saved = (act.block_saved_bytes(m, t, p, s.kernels)
             + (0 if cfg.checkpointing else act.block_input_saved(m, t, p, s.kernels)))
    transient = act.block_backward_transient(m, t, p)
    head_saved = act.head_saved_bytes(m, t, p, s.kernels, s.fused) if s.is_last else 0
    retained_loss = act.FP32 * t.count * m.vocab_size if (split and s.is_last and not s.fused) else 0
    for i in range(s.layers - 1, -1, -1):
        if split:
            held = full + retained_loss + caught_grad_bytes(s, s.layers - i) + transient
            held += saved if cfg.checkpointing else 0
        elif cfg.checkpointing:
            held = (i + 1) * hidden + saved + transient
        else:
            held = full - (s.layers - 1 - i) * saved - head_saved + transient
        done += grads[layer_keys[i]]
        g = (accumulated or done) if grads_resident else grad_in_flight(layer_keys[i])
        out.append((f"backward of block {layer_keys[i]}", others + held, 0, g))
    if s.is_first:
        g = (accumulated or sum(grads.values())) if grads_resident else grad_in_flight("embed")
        out.append(("backward of the embedding", others, 0, g))
    if s.is_first and "prefix" in grads:
        g = (accumulated or sum(grads.values())) if grads_resident else grad_in_flight("prefix")
        out.append(("backward of the prefix encoders", others, 0, g))
    return out


def largest_gradient(tensors: list[tuple[str, int]], param_bytes: int) -> dict[str, int]:
    """The largest parameter gradient of each block (keyed by its index) and of embed, norm, head."""
    out: dict[str, int] = {}
    for name, n in tensors:
        out[module_key(name)] = max(out.get(module_key(name), 0), param_bytes * n)
    return out


@dataclass
class PeakMoment:
    name: str
    activations: int
    loss: int
    gradients: int
    casts: int      # autocast's bf16 copies of fp32 weights
    waiting_b: int  # other micro-batches held, waiting for their B
    waiting_w: int  # ... waiting for their W

    @property
    def total(self) -> int:
        return self.activations + self.loss + self.gradients + self.casts


@dataclass
class CastCopies:
    """Bytes of autocast's bf16 copies of fp32 matrix weights: of the whole stage (the cache at the end
    of a forward, and what a graph without checkpointing saves), of one block (a recomputed block's
    graph) and of the head (saved outside the checkpointed blocks)."""
    stage: int = 0
    block: int = 0
    head: int = 0

    @classmethod
    def of(cls, cfg: PlanConfig, tensors: list[tuple[str, int]], param_bytes: int,
           chunked_loss: bool = False) -> "CastCopies":
        if not (cfg.autocast and param_bytes == 4):
            return cls()
        # the chunked loss casts the head's weight itself and keeps no copy
        matrices = {name: n for name, n in tensors if name.endswith("weight") and "norm" not in name
                    and not name.startswith("embed") and not (chunked_loss and name == "head.weight")}
        per_block = layer_grad_bytes([(k, n) for k, n in matrices.items() if k.startswith("layers.")], 2)
        return cls(stage=2 * sum(matrices.values()), block=max(per_block.values(), default=0),
                   head=2 * matrices.get("head.weight", 0))


def peak_moment(cfg: PlanConfig, s: StageShape, stage: int, tensors: list[tuple[str, int]],
                param_bytes: int) -> PeakMoment:
    """The moment of the step when the stage's activations, loss and gradients add up the most."""
    grads = layer_grad_bytes(tensors, param_bytes)
    largest = largest_gradient(tensors, param_bytes)

    def grad_in_flight(key: str) -> int:
        """The engine copies each gradient out and frees it: the largest of ``key``'s being produced
        while the previous one copies."""
        return cfg.device_grads_in_flight * largest[key]

    per_mb, per_w = micro_batch_activations(s, cfg.checkpointing), w_pending_bytes(s, cfg.checkpointing)
    n_b, n_w = max(occupancy(cfg.schedule, cfg.stages, stage, cfg.micro_batches),
                   key=lambda bw: bw[0] * per_mb + bw[1] * per_w)
    others = n_b * per_mb + n_w * per_w
    split = splits_backward(cfg.schedule, stage)
    casts = CastCopies.of(cfg, tensors, param_bytes, s.fused)
    held_casts = (n_b + n_w) * (casts.head if cfg.checkpointing else casts.stage)
    own_casts = casts.block + casts.head if cfg.checkpointing else casts.stage
    moments = [PeakMoment(name, a, loss, g, held_casts + own_casts, n_b, n_w) for name, a, loss, g
               in backward_moments(s, cfg, grads, others, split, not cfg.offload, grad_in_flight)]
    accumulated = sum(grads.values()) if (not cfg.offload and cfg.micro_batches > 1) else 0
    if casts.stage:
        moments.append(PeakMoment("end of a forward", others + per_mb, 0, accumulated, held_casts + casts.stage,
                                  n_b, n_w))
    if not cfg.offload:
        moments.append(PeakMoment("optimizer step", 0, 0, sum(grads.values()), 0, n_b, n_w))
    return max(moments, key=lambda moment: moment.total)
