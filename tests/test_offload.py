"""The offload engine against device-resident AdamW8bit on the same micro-batches, with its gradients
accumulated on the host and on the device.

The baseline runs the model with plain autograd, sums each micro-batch's gradients into accumulators of
the engine's dtype by hand, computes the global norm in fp64 over all of them, and steps AdamW8bit with the
clipping coefficient as ``grad_scale``; for fp32 master weights of a bf16 model it steps fp32 copies and
rounds them into the model. Everything is compared bit for bit: the engine runs the same kernel on the
same sums; its norm sums fp64 partials per bucket in another order, which moves the fp64 norm by an ulp
at most, and the kernel rounds the coefficient to fp32, where such a difference vanishes.
"""

from __future__ import annotations

import io
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from astrobio.optim import AdamW8bit, OffloadEngine

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 320), torch.nn.GELU(), torch.nn.Linear(320, 24),
                                       torch.nn.GELU(), torch.nn.Linear(24, 1))

    def forward(self, x):
        return self.net(x)


class WideCheap(torch.nn.Module):
    """A very wide layer that costs next to nothing to run: an optimizer step on it takes longer than
    its forward, so a forward that does not wait for the step reads stale weights."""

    def __init__(self, width=1 << 17):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.randn(width) * 0.1 + 1.0)
        self.shift = torch.nn.Parameter(torch.randn(width) * 0.1)
        self.out = torch.nn.Parameter(torch.randn(width) / width ** 0.5)
        self.width = width

    def forward(self, x):
        h = torch.tanh(x.repeat(1, self.width // x.shape[1]) * self.scale + self.shift)
        return (h * self.out).sum(dim=1, keepdim=True)


def make_model(kind, dtype, seed=0):
    torch.manual_seed(seed)
    return (Mlp() if kind == "mlp" else WideCheap()).to(dtype)


def make_batches(steps, micro, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(4, 16, generator=g), torch.randn(4, 1, generator=g)) for _ in range(micro)]
            for _ in range(steps)]


def loss_of(model, x, y):
    dtype = next(model.parameters()).dtype
    return torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)


class DeviceResident:
    """AdamW8bit on the device, fed by hand-accumulated, hand-clipped gradients."""

    def __init__(self, model, accum_dtype, master_weights, max_grad_norm):
        self.model, self.max_grad_norm = model, max_grad_norm
        self.accum_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[accum_dtype]
        params = list(model.parameters())
        self.separate = master_weights == "fp32" and params[0].dtype == torch.bfloat16
        self.masters = [torch.nn.Parameter(p.detach().float()) for p in params] if self.separate else params
        for m in self.masters:
            m.grad_dtype = None  # the accumulator's dtype may differ from the master's
        self.opt = AdamW8bit(self.masters, **HYPER)

    def step(self, micro_batches, before=None):
        params, accums, losses = list(self.model.parameters()), None, []
        for k, (x, y) in enumerate(micro_batches):
            if before is not None:
                before(k)
            loss = loss_of(self.model, x, y)
            loss.backward()
            losses.append(loss.item())
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if accums is None:
                accums = [g.to(self.accum_dtype) for g in grads]
            else:
                for a, g in zip(accums, grads):
                    a.add_(g)
            self.model.zero_grad(set_to_none=True)
        norm = math.sqrt(sum(float((a.double() ** 2).sum()) for a in accums))
        coef = 1.0 if self.max_grad_norm is None else min(1.0, self.max_grad_norm / (norm + 1e-6))
        for m, a in zip(self.masters, accums):
            m.grad = a
        self.opt.step(grad_scale=coef)
        self.opt.zero_grad(set_to_none=True)
        if self.separate:
            with torch.no_grad():
                for p, m in zip(params, self.masters):
                    p.copy_(m)
        return losses, norm


def run_engine(engine, model, micro_batches, before=None):
    engine.begin_step(len(micro_batches))
    losses = []
    for k, (x, y) in enumerate(micro_batches):
        if before is not None:
            before(k)
        loss = loss_of(model, x, y)
        loss.backward()
        losses.append(loss.item())
        assert all(p.grad is None for p in model.parameters())  # device gradients are freed
    return losses, engine.end_step()


def random_delays(seed=0, most=0.002):
    rng = random.Random(seed)
    return lambda: time.sleep(rng.random() * most)


def assert_same_weights(engine, model, baseline):
    engine.synchronize()
    for i, (p, q) in enumerate(zip(model.parameters(), baseline.model.parameters())):
        assert torch.equal(p, q), f"device parameter {i}"
    state = engine.state_dict()["state"]
    for i, m in enumerate(baseline.masters):
        assert torch.equal(state[i]["master"], m.detach().to(state[i]["master"].dtype)), f"master {i}"
        for key in ("exp_avg", "exp_avg_sq", "absmax1", "absmax2"):
            if key in baseline.opt.state[m]:
                assert torch.equal(state[i][key], baseline.opt.state[m][key]), f"{key} of parameter {i}"


def compare(kind, dtype, master_weights, accum_dtype, micro, steps, delays=False, attach=True, workers=1,
            bucket_bytes=6000, max_grad_norm=0.05, location="host"):
    model, twin = make_model(kind, dtype), make_model(kind, dtype)
    baseline = DeviceResident(twin, accum_dtype, master_weights, max_grad_norm)
    engine = OffloadEngine(model.parameters(), **HYPER, max_grad_norm=max_grad_norm, accum_dtype=accum_dtype,
                           master_weights=master_weights, bucket_bytes=bucket_bytes,
                           module=model if attach else None, num_workers=workers, grad_accum_location=location)
    if delays:
        engine.worker_delay = random_delays()
    batches = make_batches(steps, micro)
    runs = [run_engine(engine, model, b) for b in batches]  # back to back: nothing else gives workers time
    for (losses, stats), micro_batches in zip(runs, batches):
        want_losses, want_norm = baseline.step(micro_batches)
        assert losses == want_losses
        assert not stats.skipped and stats.grad_norm == pytest.approx(want_norm, rel=1e-12)
    assert any(stats.clip_coef < 1.0 for _, stats in runs)  # clipping really acted
    assert_same_weights(engine, model, baseline)
    engine.close()


CASES = [  # model dtype, master weights, accumulator dtype
    (torch.float32, "fp32", "fp32"),
    (torch.bfloat16, "fp32", "fp32"),
    (torch.bfloat16, "bf16-sr", "fp32"),
    (torch.bfloat16, "bf16-sr", "bf16"),
]


LOCATIONS = ["host", "device"]


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize("micro", [1, 8])
@pytest.mark.parametrize("dtype, master_weights, accum_dtype", CASES)
def test_offload_equals_device_resident(dtype, master_weights, accum_dtype, micro, location):
    compare("mlp", dtype, master_weights, accum_dtype, micro, steps=4, location=location)


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize("dtype, master_weights, accum_dtype", CASES)
def test_offload_equals_device_resident_with_random_worker_delays(dtype, master_weights, accum_dtype, location):
    compare("mlp", dtype, master_weights, accum_dtype, micro=8, steps=3, delays=True, workers=2, location=location)


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize("attach", [True, False], ids=["forward-hooks", "synchronous"])
def test_wide_cheap_layer_sees_every_update(attach, location):
    compare("wide", torch.float32, "fp32", "fp32", micro=2, steps=4, delays=True, attach=attach, workers=2,
            bucket_bytes=1 << 19, max_grad_norm=0.5, location=location)


@pytest.mark.parametrize("accum_dtype", ["fp32", "bf16"])
def test_device_and_host_accumulation_train_the_same_weights(accum_dtype):
    """The two locations against each other (not through a baseline): the same bf16 model, 6 steps of 8
    micro-batches with bf16-sr masters; the weights, masters and moments end up bit-identical."""
    models = {where: make_model("mlp", torch.bfloat16) for where in LOCATIONS}
    engines = {where: OffloadEngine(models[where].parameters(), **HYPER, max_grad_norm=0.05, accum_dtype=accum_dtype,
                                    master_weights="bf16-sr", bucket_bytes=6000, module=models[where],
                                    grad_accum_location=where) for where in LOCATIONS}
    for micro_batches in make_batches(6, 8):
        results = {where: run_engine(engines[where], models[where], micro_batches) for where in LOCATIONS}
        assert results["host"][0] == results["device"][0]
        assert results["host"][1] == results["device"][1]  # the same norm, bit for bit
    states = {where: engines[where].state_dict()["state"] for where in LOCATIONS}
    for p, q in zip(models["host"].parameters(), models["device"].parameters()):
        assert torch.equal(p, q)
    for i, entry in states["host"].items():
        for key, value in entry.items():
            other = states["device"][i][key]
            assert (other == value) if key == "step" else torch.equal(other, value), f"{key} of parameter {i}"
    for engine in engines.values():
        engine.close()


@pytest.mark.parametrize("location", LOCATIONS)
def test_timings_record_each_phase(location):
    model = make_model("mlp", torch.float32)
    engine = OffloadEngine(model.parameters(), **HYPER, bucket_bytes=6000, module=model, grad_accum_location=location)
    assert engine.last_timings is None
    batches = make_batches(3, 4)
    for micro_batches in batches:
        run_engine(engine, model, micro_batches)
    # NOTE: worker time lands in the record open when it finishes; wait for the third step's updates, so
    # that on a loaded machine they are not still running when begin_step closes its record
    engine.synchronize()
    engine.begin_step(1)  # closes the third step's record
    timings = engine.last_timings
    assert timings.location == location
    assert timings.grad_hooks_s > 0 and timings.optimizer_s > 0 and timings.norm_wait_s > 0
    assert timings.weight_wait_s > 0  # the third step's forwards waited in the pre-hooks
    assert timings.stream_stall_s == timings.weight_wait_s  # no streams on the CPU: the host's wait
    numel = sum(p.numel() for p in model.parameters())
    if location == "host":  # 4 micro-batches: one copy (read + write) and three adds (read + read + write)
        assert timings.host_accumulate_bytes == numel * 4 * (2 + 3 * 3)
        assert timings.host_accumulate_gbps > 0 and timings.norm_s > 0
    else:
        assert timings.host_accumulate_bytes == 0 and timings.host_accumulate_gbps is None
        assert timings.staging_wait_s == 0
    assert set(timings.as_dict()) >= {"grad_hooks_s", "optimizer_s", "upload_s", "host_accumulate_gbps",
                                      "stream_stall_s"}
    engine.close()


def test_each_wait_for_weights_is_reported_as_a_stall():
    model = make_model("mlp", torch.float32)
    engine = OffloadEngine(model.parameters(), **HYPER, bucket_bytes=6000, module=model)
    stalls = []
    engine.on_stall = lambda start, end: stalls.append((start, end))
    batches = make_batches(2, 2)
    run_engine(engine, model, batches[0])
    assert stalls == []  # the first step's forwards have nothing to wait for
    run_engine(engine, model, batches[1])  # its forwards wait for the first step's weights
    assert stalls and all(start <= end for start, end in stalls)
    engine.begin_step(1)
    assert engine.last_timings.stream_stall_s == pytest.approx(sum(end - start for start, end in stalls))
    engine.close()


class ThreadAllReduce:
    """An in-process stand-in for an all-reduce over pipeline ranks (one thread per rank): every rank
    gets the sum of all ranks' values, added in rank order."""

    def __init__(self, ranks):
        self.values, self.barrier = [None] * ranks, threading.Barrier(ranks)

    def for_rank(self, rank):
        def reduce(value):
            self.values[rank] = value
            self.barrier.wait()
            total = sum(self.values)
            self.barrier.wait()
            return total
        return reduce


@pytest.mark.parametrize("master_weights", ["fp32", "bf16-sr"])
def test_two_pipeline_stages_clip_globally_like_one_device(master_weights):
    """Two engines over the two halves of a model (as two pipeline ranks would hold them), their norms
    summed across by end_step(sum_across=...), equal one device-resident optimizer over the whole model."""
    model, twin = make_model("mlp", torch.bfloat16), make_model("mlp", torch.bfloat16)
    baseline = DeviceResident(twin, "fp32", master_weights, max_grad_norm=0.05)
    params = list(model.parameters())
    options = dict(**HYPER, max_grad_norm=0.05, master_weights=master_weights, bucket_bytes=6000, module=model)
    stages = [OffloadEngine(params[:4], **options), OffloadEngine(params[4:], **options, index_offset=4)]
    reducer = ThreadAllReduce(2)
    for micro_batches in make_batches(3, 4):
        for engine in stages:
            engine.begin_step(4)
        losses = []
        for x, y in micro_batches:
            loss = loss_of(model, x, y)
            loss.backward()
            losses.append(loss.item())
        with ThreadPoolExecutor(2) as ranks:
            stats = list(ranks.map(lambda r: stages[r].end_step(sum_across=reducer.for_rank(r)), range(2)))
        want_losses, want_norm = baseline.step(micro_batches)
        assert losses == want_losses
        assert stats[0].grad_norm == stats[1].grad_norm == pytest.approx(want_norm, rel=1e-12)
    for engine in stages:
        engine.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    for engine in stages:
        engine.close()


def test_grad_norm_matches_torch_clip_grad_norm():
    model, twin = make_model("mlp", torch.float32), make_model("mlp", torch.float32)
    engine = OffloadEngine(model.parameters(), **HYPER, max_grad_norm=1.0, bucket_bytes=4000, module=model)
    micro_batches = make_batches(1, 3)[0]
    _, stats = run_engine(engine, model, micro_batches)
    for x, y in micro_batches:
        loss_of(twin, x, y).backward()
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0).item()
    assert stats.grad_norm == pytest.approx(want, rel=1e-5)
    assert stats.clip_coef == pytest.approx(min(1.0, 1.0 / (want + 1e-6)), rel=1e-5)
    engine.close()


@pytest.mark.parametrize("location", LOCATIONS)
def test_parameter_without_gradient_in_a_micro_batch_counts_as_zero(location):
    model, twin = make_model("mlp", torch.float32), make_model("mlp", torch.float32)
    baseline = DeviceResident(twin, "fp32", "fp32", None)
    engine = OffloadEngine(model.parameters(), **HYPER, bucket_bytes=6000, module=model, grad_accum_location=location)

    def first_micro_batch_without_last_bias(m):  # a partial bucket fill, then a bucket short of micro-batches
        return lambda k: m.net[4].bias.requires_grad_(k > 0)

    for micro_batches in make_batches(3, 4):
        losses, _ = run_engine(engine, model, micro_batches, first_micro_batch_without_last_bias(model))
        assert losses == baseline.step(micro_batches, first_micro_batch_without_last_bias(twin))[0]
    assert_same_weights(engine, model, baseline)
    engine.close()


@pytest.mark.parametrize("location", LOCATIONS)
def test_non_finite_gradient_skips_the_step(location):
    model = make_model("mlp", torch.float32)
    engine = OffloadEngine(model.parameters(), **HYPER, bucket_bytes=6000, module=model, grad_accum_location=location)
    batches = make_batches(3, 2)
    run_engine(engine, model, batches[0])
    before = engine.state_dict()
    before = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in before["state"].items()}
    weights = [p.detach().clone() for p in model.parameters()]
    engine.begin_step(2)
    for k, (x, y) in enumerate(batches[1]):
        (loss_of(model, x, y) * (float("nan") if k == 1 else 1.0)).backward()
    stats = engine.end_step()
    assert stats.skipped and not math.isfinite(stats.grad_norm) and engine.skipped_steps == 1
    engine.synchronize()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    after = engine.state_dict()
    for i, entry in before.items():
        for key, value in entry.items():
            assert (after["state"][i][key] == value) if key == "step" else torch.equal(after["state"][i][key], value)
    assert after["skipped_steps"] == 1
    _, stats = run_engine(engine, model, batches[2])  # the accumulators start afresh
    assert not stats.skipped and math.isfinite(stats.grad_norm)
    assert engine.state_dict()["state"][0]["step"] == 2
    engine.close()


def round_trip(saved):
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("saved_at, loaded_at", [("host", "host"), ("device", "device"), ("host", "device"),
                                                 ("device", "host")])
@pytest.mark.parametrize("master_weights, dtype", [("fp32", torch.bfloat16), ("bf16-sr", torch.bfloat16)])
@pytest.mark.parametrize("where", ["between-steps", "between-micro-batches"])
def test_state_dict_resumes_exactly(where, master_weights, dtype, saved_at, loaded_at):
    options = dict(**HYPER, max_grad_norm=0.05, master_weights=master_weights, bucket_bytes=6000)
    batches = make_batches(5, 4)
    straight = make_model("mlp", dtype)
    engine = OffloadEngine(straight.parameters(), **options, module=straight)
    straight_losses = [run_engine(engine, straight, b)[0] for b in batches]
    engine.synchronize()

    first = make_model("mlp", dtype)
    engine_a = OffloadEngine(first.parameters(), **options, module=first, grad_accum_location=saved_at)
    losses = [run_engine(engine_a, first, b)[0] for b in batches[:2]]
    if where == "between-micro-batches":
        engine_a.begin_step(4)
        for x, y in batches[2][:3]:
            loss_of(first, x, y).backward()
    saved = round_trip(engine_a.state_dict())
    engine_a.close()

    resumed = make_model("mlp", dtype, seed=5)  # other weights: the engine restores them from its masters
    engine_b = OffloadEngine(resumed.parameters(), **options, module=resumed, grad_accum_location=loaded_at)
    engine_b.load_state_dict(saved)
    rest = batches[2:]
    if where == "between-micro-batches":
        x, y = batches[2][3]
        loss_of(resumed, x, y).backward()
        engine_b.end_step()
        rest = batches[3:]
    losses += [run_engine(engine_b, resumed, b)[0] for b in rest]
    engine_b.synchronize()
    if where == "between-steps":
        assert losses == straight_losses
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    final_a, final_b = engine.state_dict()["state"], engine_b.state_dict()["state"]
    for i in final_a:
        for key, value in final_a[i].items():
            assert (final_b[i][key] == value) if key == "step" else torch.equal(final_b[i][key], value)
    engine.close()
    engine_b.close()


def test_load_rejects_a_state_of_another_configuration():
    model = make_model("mlp", torch.float32)
    engine = OffloadEngine(model.parameters(), **HYPER, module=model)
    run_engine(engine, model, make_batches(1, 1)[0])
    saved = engine.state_dict()
    other = OffloadEngine(make_model("mlp", torch.float32).parameters(), master_weights="bf16-sr")
    with pytest.raises(ValueError, match="master_weights"):
        other.load_state_dict(saved)
    fewer = OffloadEngine(list(make_model("mlp", torch.float32).parameters())[:-1])
    with pytest.raises(ValueError, match="parameters"):
        fewer.load_state_dict(saved)
    bad = dict(saved, state={i: dict(s) for i, s in saved["state"].items()})
    bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"][:1]
    with pytest.raises(ValueError, match="exp_avg"):
        OffloadEngine(make_model("mlp", torch.float32).parameters()).load_state_dict(bad)
    fresh_model = make_model("mlp", torch.float32, seed=3)
    fresh = OffloadEngine(fresh_model.parameters(), **HYPER)
    before = [p.detach().clone() for p in fresh_model.parameters()]
    for changes, match in (({"max_grad_norm": -1.0}, "max_grad_norm"), ({"lr": float("nan")}, "lr"),
                           ({"skipped_steps": -2}, "skipped_steps")):
        broken = dict(saved, hyperparameters={**saved["hyperparameters"], **changes}, **changes)
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(broken)
    assert all(torch.equal(p, b) for p, b in zip(fresh_model.parameters(), before))  # nothing was loaded
    assert fresh.state_dict()["state"][0]["step"] == 0 and fresh.skipped_steps == 0
    for e in (engine, other, fewer, fresh):
        e.close()


@pytest.mark.parametrize("location", LOCATIONS)
def test_protocol_errors_are_clear(location):
    model = make_model("mlp", torch.float32)
    engine = OffloadEngine(model.parameters(), **HYPER, grad_accum_location=location)
    x, y = make_batches(1, 1)[0][0]
    with pytest.raises(RuntimeError, match="begin_step"):
        loss_of(model, x, y).backward()
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="begin_step"):
        engine.end_step()
    engine.begin_step(1)
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match="more than the 1 micro-batches"):
        loss_of(model, x, y).backward()
    with pytest.raises(ValueError, match="lr must be a finite number"):
        engine.end_step(lr=float("inf"))
    assert not engine.end_step().skipped  # the refused lr left the step open and the engine's lr as it was
    assert engine.lr == HYPER["lr"]
    engine.close()


@pytest.mark.parametrize("make, error, match", [
    (lambda p: OffloadEngine(p, accum_dtype="fp16"), ValueError, "accum_dtype"),
    (lambda p: OffloadEngine(p, master_weights="fp16"), ValueError, "master_weights"),
    (lambda p: OffloadEngine(p, max_grad_norm=0.0), ValueError, "max_grad_norm"),
    (lambda p: OffloadEngine(p + p[:1]), ValueError, "twice"),
    (lambda p: OffloadEngine([torch.nn.Parameter(torch.ones(3), requires_grad=False)]), ValueError, "trainable"),
    (lambda p: OffloadEngine([]), ValueError, "empty"),
    (lambda p: OffloadEngine(p, lr=-1.0), ValueError, "lr"),
    (lambda p: OffloadEngine(p, grad_accum_location="auto"), ValueError, "grad_accum_location"),
], ids=["accum", "master", "clip", "duplicate", "frozen", "empty", "lr", "location"])
def test_bad_options_raise(make, error, match):
    with pytest.raises(error, match=match):
        make(list(make_model("mlp", torch.float32).parameters()))


def test_close_stops_the_workers_even_after_a_failed_task():
    before = set(threading.enumerate())
    model = make_model("mlp", torch.float32)
    engine = OffloadEngine(model.parameters(), **HYPER, bucket_bytes=6000, num_workers=2)

    def fail():
        raise RuntimeError("worker task failed")

    engine.worker_delay = fail
    engine.begin_step(1)
    x, y = make_batches(1, 1)[0][0]
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match="worker task failed"):
        engine.end_step()
    with pytest.raises(RuntimeError, match="worker task failed"):
        engine.close()
    assert [t for t in threading.enumerate() if t not in before] == []
    assert all(p.grad is None for p in model.parameters())
    loss_of(model, x, y).backward()  # the hooks are gone: gradients stay on the parameters
    assert all(p.grad is not None for p in model.parameters())


def test_a_failed_accumulation_is_reported_even_when_later_ones_succeed():
    model = make_model("mlp", torch.float32)
    engine = OffloadEngine(model.parameters(), **HYPER, bucket_bytes=6000)
    calls = iter(range(10**6))

    def fail_once():
        if next(calls) == 0:
            raise RuntimeError("first accumulation failed")

    engine.worker_delay = fail_once
    engine.begin_step(3)
    for x, y in make_batches(1, 3)[0]:
        loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match="first accumulation failed"):
        engine.end_step()
    with pytest.raises(RuntimeError, match="first accumulation failed"):
        engine.close()


@pytest.mark.parametrize("location", LOCATIONS)
def test_a_state_without_masters_loads_them_from_the_parameters(location):
    """bf16-sr masters of a bf16 model are the parameters: a state saved without them, loaded after the
    model's weights, resumes exactly; fp32 masters of a bf16 model cannot be left out."""
    options = dict(**HYPER, max_grad_norm=0.05, master_weights="bf16-sr", bucket_bytes=6000,
                   grad_accum_location=location)
    batches = make_batches(4, 3)
    straight = make_model("mlp", torch.bfloat16)
    engine = OffloadEngine(straight.parameters(), **options, module=straight)
    for b in batches:
        run_engine(engine, straight, b)
    first = make_model("mlp", torch.bfloat16)
    engine_a = OffloadEngine(first.parameters(), **options, module=first)
    for b in batches[:2]:
        run_engine(engine_a, first, b)
    assert engine_a.masters_in_parameters
    saved = round_trip(engine_a.state_dict(masters=False))
    weights = round_trip(first.state_dict())
    assert saved["masters"] == "parameters" and all("master" not in s for s in saved["state"].values())
    resumed = make_model("mlp", torch.bfloat16, seed=5)
    resumed.load_state_dict(weights)
    engine_b = OffloadEngine(resumed.parameters(), **options, module=resumed)
    engine_b.load_state_dict(saved)
    for b in batches[2:]:
        run_engine(engine_b, resumed, b)
    engine.synchronize()
    engine_b.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    fp32_masters = OffloadEngine(make_model("mlp", torch.bfloat16).parameters(),
                                 **{**options, "master_weights": "fp32"})
    assert not fp32_masters.masters_in_parameters
    with pytest.raises(ValueError, match="must be saved"):
        fp32_masters.state_dict(masters=False)
    with pytest.raises(ValueError, match="saved without master weights"):
        fp32_masters.load_state_dict({**saved, "master_weights": "fp32"})
    for e in (engine, engine_a, engine_b, fp32_masters):
        e.close()
