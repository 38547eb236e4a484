"""Sharded offload state in checkpoints: saved by 2 replicas x 2 stages, resumed by 1 process with one
engine over the whole model, saved again, resumed by 2 replicas x 2 stages: the same weights and state as
a straight run, bit for bit.

Each rank process holds both "stages" (two engines over the two halves of the parameters, each with a
replicas group of its own) and both replicas see the same micro-batches, so every configuration computes
the same bits (tests/test_offload_sharded.py shows sharded == unsharded); no clipping, so the stages'
norms need no sum across. The checkpoints are written as the trainer writes them: every rank its part
(``write_rank_part``), then rank 0 the training state and the manifest.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist

from astrobio.optim import OffloadEngine
from astrobio.parallel.launch import launch
from astrobio.train.checkpoint import (CheckpointError, Checkpointer, load_checkpoint, load_offload_state,
                                       optimizer_by_name, write_part, write_rank_part)

from test_offload_sharded import HYPER, loss_of, make_batches, make_model

BATCHES = make_batches(seed=3, steps=6)
SPLIT = 2  # stage 0: the first two parameters (Linear(64, 300)); stage 1: the rest


def stages_of(model):
    named = list(model.named_parameters())
    return [named[:SPLIT], named[SPLIT:]]


def make_engines(model, parts, groups):
    return [OffloadEngine(named, **HYPER, bucket_bytes=100_000, module=model, grad_accum_location="host",
                          index_offset=SPLIT * s, replicas=group)
            for s, (named, group) in enumerate(zip(parts, groups))]


def train(engines, model, batches):
    for micro_batches in batches:
        for engine in engines:
            engine.begin_step(len(micro_batches))
        for x, y in micro_batches:
            loss_of(model, x, y).backward()
        for engine in engines:
            engine.end_step()
    for engine in engines:
        engine.synchronize()


def save(root, step, model, engines, parts, replica, sharded, barrier=lambda: None):
    """As a pipeline x data-parallel job saves: each rank its stages' parts, rank 0 the rest."""
    checkpointer = Checkpointer(root, keep_last_k=10)
    tmp = checkpointer.begin(step) if replica == 0 else checkpointer.root / f".tmp-step-{step}"
    barrier()
    weights = model.state_dict()
    for stage, (engine, named) in enumerate(zip(engines, parts)):
        names = [n for n, _ in named]
        write_rank_part(tmp, stage, replica, {n: weights[n] for n in names},
                        optimizer_by_name(engine.state_dict(), names), sharded)
    barrier()
    if replica == 0:
        write_part(tmp, None, None, "state", {"step": step})
        checkpointer.finish(tmp, step)
    barrier()
    return checkpointer.root / f"step-{step}"


def load(path, model, engines, parts):
    model_state, _, step = load_checkpoint(path)
    model.load_state_dict(model_state)
    for engine, named in zip(engines, parts):
        engine.load_state_dict(load_offload_state(path, [n for n, _ in named], engine.shard_ranges()))
    return step


def states(engines):
    return [engine.state_dict()["state"] for engine in engines]


def straight_and_first_save(ctx, root):
    groups = [dist.new_group([0, 1]) for _ in range(2)]
    straight = make_model()
    engines = make_engines(straight, stages_of(straight), groups)
    train(engines, straight, BATCHES)
    result = {"weights": [p.detach().clone() for p in straight.parameters()], "states": states(engines)}
    for engine in engines:
        engine.close()
    model = make_model()
    engines = make_engines(model, stages_of(model), groups)
    train(engines, model, BATCHES[:2])
    save(root, 2, model, engines, stages_of(model), ctx.rank, sharded=True, barrier=dist.barrier)
    for engine in engines:
        engine.close()
    return result


def resume_sharded(ctx, path):
    groups = [dist.new_group([0, 1]) for _ in range(2)]
    model = make_model()
    with torch.no_grad():  # other weights than the run's: the checkpoint must restore them
        for p in model.parameters():
            p.add_(1.0)
    engines = make_engines(model, stages_of(model), groups)
    step = load(path, model, engines, stages_of(model))
    train(engines, model, BATCHES[step:])
    result = {"weights": [p.detach().clone() for p in model.parameters()], "states": states(engines)}
    for engine in engines:
        engine.close()
    return result


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded") / "checkpoints"
    straight = launch(straight_and_first_save, 2, (root,), timeout_s=120, backend="gloo")
    # one process, one stage, no replicas: reshards the 2 x 2 parts into whole parameters
    model = make_model()
    whole = [list(model.named_parameters())]
    engines = [OffloadEngine(whole[0], **HYPER, bucket_bytes=100_000, module=model, grad_accum_location="host")]
    step = load(root / "step-2", model, engines, whole)
    train(engines, model, BATCHES[step:4])
    save(root, 4, model, engines, whole, replica=0, sharded=False)
    engines[0].close()
    resumed = launch(resume_sharded, 2, (root / "step-4",), timeout_s=120, backend="gloo")
    return {"root": root, "straight": straight, "resumed": resumed}


def test_the_checkpoint_holds_one_part_per_stage_and_replica(chain):
    names = {p.name for p in (chain["root"] / "step-2").iterdir()}
    assert {f"optimizer-stage{s}-replica{r}.json" for s in (0, 1) for r in (0, 1)} <= names
    assert {"model-stage0.safetensors", "model-stage1.safetensors"} <= names
    assert not any(n.startswith("model-stage") and "replica" in n for n in names)
    assert "optimizer-stage0.json" in {p.name for p in (chain["root"] / "step-4").iterdir()}


def test_two_replicas_to_one_process_and_back_equals_the_straight_run(chain):
    for rank in (0, 1):
        straight, resumed = chain["straight"][rank], chain["resumed"][rank]
        assert all(torch.equal(a, b) for a, b in zip(straight["weights"], resumed["weights"]))
        for want, got in zip(straight["states"], resumed["states"]):
            assert sorted(want) == sorted(got)
            for i in want:
                for key, value in want[i].items():
                    other = got[i][key]
                    assert torch.equal(other, value) if torch.is_tensor(value) else other == value, (rank, i, key)


def test_each_rank_loads_only_its_own_elements(chain):
    """A replica's resharded state holds its slices only, in memory of its own (not the mapped files)."""
    model = make_model()
    parts = stages_of(model)
    names = [n for n, _ in parts[1]]
    ranges = {0: (256, 512), 1: (0, 200)}  # the second block of net.2.weight (60000 elements), net.2.bias
    saved = load_offload_state(chain["root"] / "step-2", names, ranges)["state"]
    assert saved[0]["exp_avg"].numel() == 256 and saved[0]["absmax1"].numel() == 1 and saved[0]["range"] == [256, 512]
    assert saved[1]["master"].numel() == 200 and "absmax1" not in saved[1]  # small: fp32 moments
    whole = OffloadEngine(parts[1], **HYPER, bucket_bytes=100_000, module=model)  # unsharded, over stage 1
    whole.load_state_dict(load_offload_state(chain["root"] / "step-2", names, whole.shard_ranges()))
    full = {i: {k: v.reshape(-1) if torch.is_tensor(v) else v for k, v in e.items()}
            for i, e in whole.state_dict()["state"].items()}
    whole.close()
    assert torch.equal(saved[0]["master"], full[0]["master"][256:512])
    assert torch.equal(saved[0]["exp_avg_sq"], full[0]["exp_avg_sq"][256:512])
    assert torch.equal(saved[0]["absmax2"], full[0]["absmax2"][1:2])
    assert torch.equal(saved[1]["exp_avg"], full[1]["exp_avg"])
    assert saved[0]["master"].untyped_storage().nbytes() == 256 * 4  # its own memory, not the mapping


def test_a_missing_replica_part_is_named(chain, tmp_path):
    broken = tmp_path / "step-2"
    shutil.copytree(chain["root"] / "step-2", broken)
    for suffix in (".json", ".safetensors"):
        (broken / f"optimizer-stage1-replica1{suffix}").unlink()
    names = [n for n, _ in stages_of(make_model())[1]]
    with pytest.raises(CheckpointError, match=r"no optimizer state for elements \d+\.\.60000 of net.2.weight"):
        load_offload_state(broken, names, {0: (0, 60000)})


def test_a_checkpoint_missing_a_replicas_part_is_refused_naming_it(tmp_path):
    """Rank 0 checks every rank's part before the manifest: on machines without a shared output
    directory, another machine's slices never arrive here."""
    from types import SimpleNamespace

    from astrobio.train.checkpoint import CheckpointError, Checkpointer
    from astrobio.train.pipeline import StagedCheckpoint
    ranks = SimpleNamespace(stages=2, replicas=2)
    writer = StagedCheckpoint(Checkpointer(tmp_path / "checkpoints", 2), ranks, sharded=True)
    parts = ["model-stage0.safetensors", "model-stage1.safetensors", "optimizer-stage0-replica0.json",
             "optimizer-stage0-replica1.json", "optimizer-stage1-replica0.json", "optimizer-stage1-replica1.json"]
    for name in parts:
        if name != "optimizer-stage1-replica1.json":
            (tmp_path / name).write_text("{}")
    with pytest.raises(CheckpointError, match=r"lacks optimizer-stage1-replica1\.json .* must be a directory all"):
        writer.check_parts(tmp_path)
    (tmp_path / "optimizer-stage1-replica1.json").write_text("{}")
    writer.check_parts(tmp_path)  # complete: no error
    unsharded = StagedCheckpoint(Checkpointer(tmp_path / "checkpoints", 2), ranks, sharded=False)
    with pytest.raises(CheckpointError, match=r"optimizer-stage0\.json, optimizer-stage1\.json"):
        unsharded.check_parts(tmp_path)


def test_a_slice_off_the_block_grid_is_refused_as_such(tmp_path):
    """The 8-bit moments' absmax covers blocks of 256 elements: a saved slice that starts off the grid
    cannot be cut, and the error says so (rather than reporting a missing part)."""
    from astrobio.train.checkpoint import CheckpointError, assemble
    entry = {"step": 3, "exp_avg": torch.zeros(300, dtype=torch.uint8)}
    with pytest.raises(CheckpointError, match="do not meet on a block of 256 elements"):
        assemble(tmp_path, "w", 0, 600, [(0, 300, entry), (300, 600, entry)])
    assert assemble(tmp_path, "w", 0, 300, [(0, 300, entry)])["range"] == [0, 300]
