"""The offload engine with its optimizer state sharded across 2 data-parallel replicas (gloo, 2 processes)
against one unsharded engine in the same process.

Every rank runs every case (one launch pays for process start-up once). With both replicas fed the same
micro-batches, the replicas' mean is exact ((g + g) / 2 == g, and the 1/2 is a power of two inside the
kernel's grad_scale), so the sharded weights, masters and moments equal the unsharded engine's bit for
bit. With different micro-batches per replica, the unsharded engine is fed both replicas' micro-batches
with grad_scale 1/2 (the mean: the same sums, so within 1e-6, in practice equal). A NaN in one replica's gradient
skips the step on both.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from astrobio.optim import OffloadEngine
from astrobio.parallel.launch import launch

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
BUCKET_BYTES = 100_000  # several buckets, one parameter larger than a bucket
STEPS, MICRO = 5, 3
LOCATIONS = ("host", "device")


class Net(torch.nn.Module):
    """Parameters of sizes that do not divide the block (300, 19200 = 75 blocks, 60000, 201) and small
    ones (fp32 moments)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.GELU(), torch.nn.Linear(300, 200),
                                       torch.nn.GELU(), torch.nn.Linear(200, 1))

    def forward(self, x):
        return self.net(x)


def make_model(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return Net().to(device=device, dtype=dtype)


def make_batches(seed, steps=STEPS, micro=MICRO):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(4, 64, generator=g), torch.randn(4, 1, generator=g)) for _ in range(micro)]
            for _ in range(steps)]


def loss_of(model, x, y):
    p = next(model.parameters())
    return torch.nn.functional.mse_loss(model(x.to(p.device, p.dtype)).float(), y.to(p.device))


def make_engine(model, location, replicas=None, master_weights="fp32", max_grad_norm=0.05):
    return OffloadEngine(model.named_parameters(), **HYPER, max_grad_norm=max_grad_norm, master_weights=master_weights,
                         bucket_bytes=BUCKET_BYTES, module=model, grad_accum_location=location, replicas=replicas)


def train(engine, model, batches, grad_scale=1.0):
    stats = []
    for micro_batches in batches:
        engine.begin_step(len(micro_batches))
        for x, y in micro_batches:
            loss_of(model, x, y).backward()
        stats.append(engine.end_step(grad_scale=grad_scale))
    engine.synchronize()
    return stats


def owned_state(engine):
    """Per parameter index: this rank's (lo, hi) and its state tensors, flat."""
    saved = engine.state_dict()["state"]
    return {i: {k: v.reshape(-1) if torch.is_tensor(v) else v for k, v in entry.items()} for i, entry in saved.items()}


def same_slices(sharded, whole):
    """Whether each slice of the sharded state equals the unsharded state's elements (and blocks)."""
    for i, entry in sharded.items():
        lo, hi = entry["range"]
        full = whole[i]
        for key in ("master", "exp_avg", "exp_avg_sq"):
            if not torch.equal(entry[key], full[key][lo:hi]):
                return f"{key} of parameter {i}"
        for key in ("absmax1", "absmax2"):
            if key in entry and not torch.equal(entry[key], full[key][lo // 256:lo // 256 + entry[key].numel()]):
                return f"{key} of parameter {i}"
        if entry["step"] != full["step"]:
            return f"step of parameter {i}"
    return None


def identical_gradients(group, location, dtype, device):
    """Both replicas see the same micro-batches: bit for bit the unsharded engine's."""
    model, twin = make_model(dtype, device), make_model(dtype, device)
    sharded, whole = make_engine(model, location, group), make_engine(twin, location)
    batches = make_batches(seed=1)
    stats, want = train(sharded, model, batches), train(whole, twin, batches)
    result = {"norms": [s.grad_norm for s in stats], "want_norms": [s.grad_norm for s in want],
              "clipped": any(s.clip_coef < 1.0 for s in stats),
              "weights_equal": all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters())),
              "state_mismatch": same_slices(owned_state(sharded), owned_state(whole)),
              "ranges": sharded.shard_ranges(), "bytes": sharded.host_bytes(), "whole_bytes": whole.host_bytes(),
              "codes": {i: e["exp_avg"].numel() for i, e in owned_state(sharded).items()}}
    sharded.close()
    whole.close()
    return result


def replica_sums(model, batches):
    """Each replica's gradients of one step summed over its micro-batches, by plain autograd on a copy
    of ``model`` (the engine sums them in the same order and dtype)."""
    probe = make_model()
    probe.load_state_dict(model.state_dict())
    sums = []
    for micro_batches in batches:
        for x, y in micro_batches:
            loss_of(probe, x, y).backward()
        sums.append([p.grad.clone() for p in probe.parameters()])
        probe.zero_grad(set_to_none=True)
    return sums


def train_on_mean(engine, model, per_replica):
    """The unsharded engine fed the replicas' mean: their sums (added as the reduce-scatter adds them) as
    one micro-batch's gradients, with grad_scale 1/2."""
    stats = []
    for step_batches in zip(*per_replica):
        sums = replica_sums(model, step_batches)
        engine.begin_step(1)
        torch.autograd.backward(list(model.parameters()), [a + b for a, b in zip(*sums)])
        stats.append(engine.end_step(grad_scale=0.5))
        engine.synchronize()
    return stats


def different_gradients(group, location):
    """Each replica its own micro-batches, against the unsharded engine fed their mean."""
    rank = dist.get_rank(group)
    model, twin = make_model(), make_model()
    sharded, whole = make_engine(model, location, group), make_engine(twin, location)
    per_replica = [make_batches(seed=10 + r) for r in range(2)]
    stats = train(sharded, model, per_replica[rank])
    want = train_on_mean(whole, twin, per_replica)
    result = {"norms": [s.grad_norm for s in stats], "want_norms": [s.grad_norm for s in want],
              "clipped": any(s.clip_coef < 1.0 for s in stats),
              "max_diff": max(float((p - q).abs().max()) for p, q in zip(model.parameters(), twin.parameters()))}
    sharded.close()
    whole.close()
    return result


def one_replica_nan(group, location):
    """A NaN in replica 1's second step: both replicas skip it, and the third step trains again."""
    rank = dist.get_rank(group)
    model = make_model()
    engine = make_engine(model, location, group)
    batches = make_batches(seed=1, steps=3)
    train(engine, model, batches[:1])
    before = [p.detach().clone() for p in model.parameters()]
    engine.begin_step(MICRO)
    for k, (x, y) in enumerate(batches[1]):
        (loss_of(model, x, y) * (float("nan") if rank == 1 and k == 2 else 1.0)).backward()
    skipped = engine.end_step()
    engine.synchronize()
    unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    after = train(engine, model, batches[2:])[0]
    result = {"skipped": skipped.skipped, "norm": skipped.grad_norm, "unchanged": unchanged,
              "skipped_steps": engine.skipped_steps, "then": after.skipped,
              "steps": sorted({e["step"] for e in engine.state_dict()["state"].values()})}
    engine.close()
    return result


def bf16_stochastic_rounding(group):
    """bf16-sr masters, one step: the kernel draws its rounding bits by element index within the slice it
    is given, so where a rank's slice starts past element 0 of a parameter the new weights may round the
    other way than unsharded: apart by one bf16 step at most (both round the same fp32 value)."""
    model, twin = make_model(torch.bfloat16), make_model(torch.bfloat16)
    sharded = make_engine(model, "host", group, master_weights="bf16-sr")
    whole = make_engine(twin, "host", master_weights="bf16-sr")
    batches = make_batches(seed=1, steps=1)
    train(sharded, model, batches)
    train(whole, twin, batches)
    steps = [(p.detach().view(torch.int16).int() - q.detach().view(torch.int16).int()).abs()
             for p, q in zip(model.parameters(), twin.parameters())]
    sharded.close()
    whole.close()
    return {"most_steps_apart": max(int(d.max()) for d in steps), "differing": sum(int((d > 0).sum()) for d in steps)}


def run_cases(ctx, device):
    group = dist.new_group([0, 1])  # the engine's own: its collectives run in its order
    out = {}
    for location in LOCATIONS:
        for dtype in (torch.float32, torch.bfloat16):
            out[("identical", location, str(dtype))] = identical_gradients(group, location, dtype, device)
        if device == "cpu":
            out[("different", location)] = different_gradients(group, location)
            out[("nan", location)] = one_replica_nan(group, location)
    if device == "cpu":
        out["bf16-sr"] = bf16_stochastic_rounding(group)
    return out


@pytest.fixture(scope="module")
def runs():
    return launch(run_cases, 2, ("cpu",), timeout_s=120, backend="gloo")


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
@pytest.mark.parametrize("location", LOCATIONS)
def test_identical_gradients_train_the_unsharded_weights_bit_for_bit(runs, location, dtype):
    for rank in (0, 1):
        result = runs[rank][("identical", location, dtype)]
        assert result["clipped"]  # the global norm's clipping acted
        assert result["norms"] == pytest.approx(result["want_norms"], rel=1e-12)
        assert result["weights_equal"]
        assert result["state_mismatch"] is None


@pytest.mark.parametrize("location", LOCATIONS)
def test_each_element_has_one_owner_and_the_host_state_halves(runs, location):
    """Per rank, master + moments bytes are half the unsharded engine's, up to the block rounding:
    every parameter starts on a block, and the bucket is padded to 2 blocks."""
    results = [runs[rank][("identical", location, "torch.float32")] for rank in (0, 1)]
    net = make_model()
    numels = [p.numel() for p in net.parameters()]
    for i, n in enumerate(numels):  # the two ranks' ranges tile each parameter
        spans = sorted(r["ranges"][i] for r in results if i in r["ranges"])
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(lo % 256 == 0 for lo, _ in spans)
        assert sum(r["codes"].get(i, 0) for r in results) == n
    whole = results[0]["whole_bytes"]
    pad = (len(numels) + 2) * 256 * (4 + 2 + 1)  # elements of master and 2 codes per padded block
    for r in results:
        state = r["bytes"]["master"] + r["bytes"]["moments"]
        assert abs(state - (whole["master"] + whole["moments"]) / 2) <= pad
    assert sum(r["bytes"]["moments"] for r in results) == whole["moments"]  # blocks split whole


@pytest.mark.parametrize("location", LOCATIONS)
def test_different_gradients_train_the_mean(runs, location):
    for rank in (0, 1):
        result = runs[rank][("different", location)]
        assert result["clipped"]
        assert result["norms"] == pytest.approx(result["want_norms"], rel=1e-12)
        assert result["max_diff"] <= 1e-6
    assert runs[0][("different", location)]["norms"] == runs[1][("different", location)]["norms"]


@pytest.mark.parametrize("location", LOCATIONS)
def test_a_nan_in_one_replica_skips_the_step_on_both(runs, location):
    for rank in (0, 1):
        result = runs[rank][("nan", location)]
        assert result["skipped"] and not math.isfinite(result["norm"])
        assert result["unchanged"] and result["skipped_steps"] == 1
        assert not result["then"] and result["steps"] == [2]


def test_bf16_stochastic_rounding_differs_by_one_rounding_step(runs):
    """Documented in the engine: sharded bf16-sr masters round with slice-local bits."""
    for rank in (0, 1):
        result = runs[rank]["bf16-sr"]
        assert result["most_steps_apart"] == 1 and result["differing"] > 0


def identical_on_cuda(ctx):
    return run_cases(ctx, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_gloo_replicas_sharing_a_gpu():
    """The engine on a GPU with a gloo group (two ranks on one device): the host-collective path with the
    device's streams and pinned buffers."""
    runs = launch(identical_on_cuda, 2, timeout_s=300, backend="gloo")
    for rank in (0, 1):
        for location in LOCATIONS:
            for dtype in ("torch.float32", "torch.bfloat16"):
                result = runs[rank][("identical", location, dtype)]
                assert result["weights_equal"] and result["state_mismatch"] is None


def test_after_a_failed_collective_task_no_later_one_is_issued():
    """A rank whose task failed (e.g. its shard's step raised before the all-gather) issues none of the
    later collectives, which would pair with its peers' earlier ones, and closes without waiting."""
    import torch.distributed as dist

    from astrobio.optim.replicas import Replicas
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        replicas = Replicas(dist.group.WORLD, torch.device("cpu"))
        ran = []

        def fails():
            raise ValueError("the shard's step failed")

        with pytest.raises(ValueError, match="shard's step failed"):
            replicas.submit(fails).result()
        later = replicas.submit(ran.append, "issued")
        with pytest.raises(RuntimeError, match="earlier collective of the replicas failed"):
            later.result()
        assert ran == []
        replicas.close()
    finally:
        dist.destroy_process_group()
