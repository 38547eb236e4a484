"""The pipeline's last stage computes its loss from its input with the stage's own ``loss``
(astrobio.parallel.executor's ``loss_from_input``): with the fused kernels (the Triton interpreter, so
on the CPU) two gloo ranks give the eager whole model's loss and gradients within the fused model's fp32
tolerance (docs/MODEL.md: rtol 1e-4, atol 1e-5), under 1F1B and ZB-H1 (whose split backward must
give the head, used by the chunked loss without a Linear call, its gradient in B), with and without
activation checkpointing; and what the last stage keeps from each forward to its backward holds no
fp32 logits and equals the memory planner's count with ``kernels="fused"``."""

import pytest
import torch

from astrobio.memory import activations as act
from astrobio.memory.peak import StageShape, micro_batch_activations
from astrobio.model import build_model, build_stage, get_config
from astrobio.parallel.executor import run_pipeline_step
from astrobio.parallel.launch import launch
from _saved_bytes import SavedBytes

pytest.importorskip("triton")

CONFIG = get_config("tiny", d_model=64, n_heads=4, ffn_hidden=176, n_layers=3, vocab_size=300)
SPLIT = [1, 2]
# (kernels, schedule, checkpointing)
CASES = [("eager", "1f1b", False), ("fused", "1f1b", False), ("fused", "zb-h1", False), ("fused", "1f1b", True),
         ("fused", "zb-h1", True)]
RTOL, ATOL = 1e-4, 1e-5


def micro_batches():
    gen = torch.Generator().manual_seed(5)
    out = []
    for length in (9, 16, 5, 12):
        tokens = torch.randint(0, CONFIG.vocab_size, (2, length + 1), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


class ForwardSaves:
    """On the last stage: what autograd saves during each F of the schedule (its on_action hook)."""

    def __init__(self, stage):
        self.skip = list(stage.parameters())
        self.by_micro_batch: dict[int, SavedBytes] = {}
        self.current: SavedBytes | None = None

    def on_action(self, action):
        self.current = SavedBytes(self.skip) if action.op == "F" else None
        if self.current is not None:
            self.by_micro_batch[action.micro_batch] = self.current

    def pack(self, t):
        return t if self.current is None else self.current.pack(t)


def run_cases(ctx):
    results = []
    for kernels, kind, checkpointing in CASES:
        stage = build_stage(CONFIG, ctx.rank, SPLIT, seed=3, kernels=kernels)
        assert stage.fused == (kernels == "fused")
        stage.gradient_checkpointing = checkpointing
        saves = ForwardSaves(stage) if stage.is_last else None
        with torch.autograd.graph.saved_tensors_hooks(saves.pack if saves else (lambda t: t), lambda t: t):
            step = run_pipeline_step(stage, kind, micro_batches(), None, guard=ctx.guard,
                                     on_action=saves.on_action if saves else None,
                                     loss_from_input=stage.loss if stage.is_last else None)
        saved = None if saves is None else {
            mb: (s.total, s.holds_logits(x.numel(), CONFIG.vocab_size))
            for (mb, s), (x, _) in zip(sorted(saves.by_micro_batch.items()), micro_batches())}
        results.append(dict(losses=step.micro_batch_losses, saved=saved,
                            grads={n: p.grad.clone() for n, p in stage.named_parameters()}))
    return results


@pytest.fixture(scope="module")
def reference():
    model = build_model(CONFIG, seed=3)
    losses = [model.loss(x, y) for x, y in micro_batches()]
    (sum(losses) / len(losses)).backward()
    return [loss.item() for loss in losses], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def pipeline_runs():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")  # the spawned ranks run the Triton kernels on CPU tensors
        return launch(run_cases, 2, timeout_s=300, backend="gloo")


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{k}-{s}-ckpt{int(c)}" for k, s, c in CASES])
def test_pipeline_with_the_stage_loss_matches_the_eager_model(case, reference, pipeline_runs):
    ref_losses, ref_grads = reference
    ranks = [pipeline_runs[r][case] for r in (0, 1)]
    for run in ranks:
        assert run["losses"] == pytest.approx(ref_losses, rel=RTOL, abs=ATOL)
    grads = {**ranks[0]["grads"], **ranks[1]["grads"]}
    assert sorted(grads) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{k}-{s}-ckpt{int(c)}" for k, s, c in CASES])
def test_the_last_stage_keeps_what_the_planner_counts(case, pipeline_runs):
    kernels, _, checkpointing = CASES[case]
    saved = pipeline_runs[1][case]["saved"]
    for mb, (x, _) in enumerate(micro_batches()):
        measured, holds_logits = saved[mb]
        tokens = act.Tokens(*x.shape)
        shape = StageShape(CONFIG, tokens, SPLIT[1], False, True, act.Precision.of(4, False), kernels)
        tables = 2 * 4 * x.shape[1] * CONFIG.head_dim // 2  # the rotary cos and sin of the call
        planned = micro_batch_activations(shape, checkpointing)
        logits = 4 * tokens.count * CONFIG.vocab_size
        if kernels == "fused":
            assert not holds_logits
            assert measured - tables == pytest.approx(planned, rel=0.01), mb
        else:  # the eager loss keeps the fp32 log-probabilities, which the planner counts as the loss's
            assert holds_logits
            assert measured - tables == pytest.approx(planned + logits, rel=0.01), mb
