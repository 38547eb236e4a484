"""Two gloo ranks running each schedule equal one process running the whole model.

One launch runs every case (schedule x checkpointing x layer split, ZB-H1 with every W at its place in
the schedule, and each schedule with NCCL's way of posting) so the test pays for process start-up once.
The reference is the whole model, built independently in this process, on the same micro-batches (of
different sequence lengths): loss = sum_i loss_i / m, one backward.
"""

import contextlib
import weakref

import pytest
import torch
import torch.nn.functional as F

from astrobio.model import build_model, build_stage, get_config
from astrobio.parallel import transport
from astrobio.parallel.executor import run_pipeline_step
from astrobio.parallel.launch import launch
from astrobio.parallel.schedules import Action, schedule
from astrobio.parallel.trace import gather_traces, measured_bubble

CONFIG = get_config("tiny", d_model=64, n_heads=4, ffn_hidden=128)
KINDS = ("gpipe", "1f1b", "zb-h1")
# (kind, checkpointing, layer split, how many W may run late, how the transport posts)
CASES = [(kind, ckpt, split, 1, "gloo") for kind in KINDS for ckpt in (False, True) for split in ((2, 2), (1, 3))]
CASES += [("zb-h1", ckpt, (1, 3), 0, "gloo") for ckpt in (False, True)]
CASES += [(kind, False, (2, 2), 1, "nccl") for kind in KINDS]
MICRO_BATCHES = 4


def loss_fn(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def micro_batches():
    gen = torch.Generator().manual_seed(7)
    out = []
    for length in (9, 16, 5, 12):  # every micro-batch its own sequence length
        tokens = torch.randint(0, CONFIG.vocab_size, (2, length + 1), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


class OutputWatch:
    """Weak references to a stage's outputs, checked when stage 0 of GPipe starts its second backward:
    by then stage 1 has received every activation, so the executor must hold none of them."""

    def __init__(self, stage):
        self.refs = []
        self.alive_at_check = None
        stage.register_forward_hook(lambda mod, inp, out: self.refs.append(weakref.ref(out)))

    def on_action(self, action):
        if action == Action("B", 1):
            self.alive_at_check = sum(r() is not None for r in self.refs)


@contextlib.contextmanager
def posting_as_on_nccl():
    """The transport's NCCL path over gloo: sends and receives posted in batches (``batch_isend_irecv``),
    headers on a side gloo group, each activation's receive posted by its F once the header is in.
    NOTE: NCCL itself needs one GPU per rank; this runs that path's order of posts and waits anywhere."""
    plain = transport.StageTransport.__init__

    def as_on_nccl(self, group, *args, **kwargs):
        plain(self, group, *args, **kwargs)
        self.nccl, self.header_group = True, transport.side_gloo_group(group)

    transport.StageTransport.__init__ = as_on_nccl
    try:
        yield
    finally:
        transport.StageTransport.__init__ = plain


def run_cases(ctx):
    results = []
    for kind, ckpt, split, late, posting in CASES:
        stage = build_stage(CONFIG, ctx.rank, list(split), seed=3)
        stage.gradient_checkpointing = ckpt
        watch = OutputWatch(stage) if ctx.rank == 0 and kind == "gpipe" else None
        with posting_as_on_nccl() if posting == "nccl" else contextlib.nullcontext():
            step = run_pipeline_step(stage, kind, micro_batches(), loss_fn, guard=ctx.guard,
                                     on_action=watch.on_action if watch else None, max_late_weight_passes=late)
        traces = gather_traces(step.trace)
        results.append(dict(losses=step.micro_batch_losses, loss=step.loss,
                            grads={n: p.grad.clone() for n, p in stage.named_parameters()},
                            trace=[(e.op, e.micro_batch, e.start, e.end) for e in step.trace],
                            bubble=measured_bubble(traces),
                            outputs_alive=None if watch is None else watch.alive_at_check))
    return results


@pytest.fixture(scope="module")
def reference():
    model = build_model(CONFIG, seed=3)
    losses = [loss_fn(model(x), y) for x, y in micro_batches()]
    (sum(losses) / len(losses)).backward()
    return [loss.item() for loss in losses], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def pipeline_runs():
    return launch(run_cases, 2, timeout_s=60, backend="gloo")


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{k}-ckpt{int(c)}-split{s[0]}{s[1]}-late{n}-{p}" for k, c, s, n, p in CASES])
def test_matches_one_process(case, reference, pipeline_runs):
    ref_losses, ref_grads = reference
    ranks = [pipeline_runs[r][case] for r in (0, 1)]
    for run in ranks:  # every rank gets every micro-batch's loss
        assert run["losses"] == pytest.approx(ref_losses, rel=1e-6)
        assert run["loss"] == pytest.approx(sum(ref_losses) / len(ref_losses), rel=1e-6)
    grads = {**ranks[0]["grads"], **ranks[1]["grads"]}
    assert sorted(grads) == sorted(ref_grads)  # the stages hold every parameter, each once
    assert not set(ranks[0]["grads"]) & set(ranks[1]["grads"])
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_sent_outputs_are_freed(pipeline_runs):
    for case, (kind, *_) in enumerate(CASES):
        if kind == "gpipe":
            assert pipeline_runs[0][case]["outputs_alive"] == 0


def test_trace_follows_the_schedule(pipeline_runs):
    """Every stage computes F and B in the schedule's order. A W runs after its B, never before its
    place in the schedule, at most ``late`` places after it, and exactly there with ``late`` = 0
    (ZB-H1's last stage: W0 after B1, deferred). The measured bubble is a fraction."""
    for case, (kind, _, _, late, _) in enumerate(CASES):
        for rank in (0, 1):
            order = [(op, mb) for op, mb, _, _ in pipeline_runs[rank][case]["trace"]]
            planned = [(a.op, a.micro_batch) for a in schedule(kind, 2, MICRO_BATCHES).actions[rank]
                       if a.is_compute and not (a.op == "W" and rank == 0)]  # stage 0's B is whole
            assert [c for c in order if c[0] != "W"] == [c for c in planned if c[0] != "W"]
            if late == 0:
                assert order == planned
            for w in (c for c in planned if c[0] == "W"):
                ran_before = set(order[:order.index(w)])
                assert set(planned[:planned.index(w)]) <= ran_before  # never early
                later = [c for c in planned[planned.index(w) + 1:] if c[0] != "W"]
                assert len([c for c in later if c in ran_before]) <= 2 * late  # F and B per late W
        assert 0.0 < pipeline_runs[0][case]["bubble"] < 1.0
