"""Checkpoints: exact round trips of state dicts, atomic saves with keep-last-K, refusal of truncated or
altered files, and resume reproducing an uninterrupted run's losses exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from astrobio.model import build_model, get_config
from astrobio.optim import AdamW8bit
from astrobio.train import main, parse_config, run
from astrobio.train.checkpoint import (CheckpointError, Checkpointer, decode_tree, encode_tree, load_checkpoint,
                                       verify)

REPO = Path(__file__).resolve().parents[1]


def assert_same_tree(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


def trained_optimizer(kind: str):
    model = build_model(get_config("tiny", vocab_size=259))
    params = list(model.parameters())
    opt = AdamW8bit(params, lr=1e-3) if kind == "8bit" else torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", ["torch", "8bit"])
def test_state_dicts_round_trip_exactly(tmp_path, kind):
    model, opt = trained_optimizer(kind)
    state = {"optimizer": opt.state_dict(), "rng": {"python": __import__("random").getstate()},
             "mixed": {3: (1, 2.5, None, "x"), "__odd": [True]}}
    path = Checkpointer(tmp_path, keep_last_k=1).save(7, model.state_dict(), state)
    model_state, loaded, step = load_checkpoint(path)
    assert step == 7
    assert_same_tree(loaded, state)
    assert_same_tree(dict(sorted(model_state.items())), dict(sorted(model.state_dict().items())))
    again = type(opt)(list(model.parameters()), lr=1e-3)
    again.load_state_dict(loaded["optimizer"])
    assert_same_tree(again.state_dict(), opt.state_dict())


def test_tree_encoding_refuses_objects():
    with pytest.raises(TypeError, match="cannot store object at state.x"):
        encode_tree({"x": object()}, {})
    tensors = {}
    skeleton = encode_tree({"a": (torch.ones(2), [1, {"b": torch.zeros(1)}])}, tensors)
    json.dumps(skeleton)  # plain JSON, tensors referenced by name
    assert set(tensors) == {"state.a.0", "state.a.1.1.b"}
    assert_same_tree(decode_tree(skeleton, tensors), {"a": (torch.ones(2), [1, {"b": torch.zeros(1)}])})


def save_steps(root: Path, steps, keep: int) -> Checkpointer:
    ckpt = Checkpointer(root, keep_last_k=keep)
    for step in steps:
        ckpt.save(step, {"w": torch.full((3,), float(step))}, {"step": step})
    return ckpt


def test_keep_last_k_and_no_temporary_left(tmp_path):
    ckpt = save_steps(tmp_path, [1, 2, 10, 3], keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10", "step-3"]
    assert [p.name for p in ckpt.checkpoints()] == ["step-3", "step-10"]  # ordered by step, not by name


def corrupt(path: Path, how: str) -> None:
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    if how == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data[-1] ^= 0xFF
        target.write_bytes(data)
    elif how == "manifest":
        (path / "manifest.json").unlink()


@pytest.mark.parametrize("how, words", [("truncate", "truncated"), ("flip", "does not match its digest"),
                                        ("manifest", "manifest.json is missing")])
def test_corrupt_checkpoint_is_refused_and_the_previous_one_used(tmp_path, how, words):
    ckpt = save_steps(tmp_path, [5, 10], keep=3)
    corrupt(tmp_path / "step-10", how)
    with pytest.raises(CheckpointError, match=words):
        verify(tmp_path / "step-10")
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(tmp_path / "step-10")
    path, skipped = ckpt.latest_valid()
    assert path == tmp_path / "step-5" and len(skipped) == 1 and "step-10" in skipped[0]
    model_state, _, step = load_checkpoint(path)
    assert step == 5 and torch.equal(model_state["w"], torch.full((3,), 5.0))


# ------------------------------------------------------------------------------- resuming a run

def run_args(out: Path, *extra: str) -> list[str]:
    return ["--pipeline-stages", "1", "--data", "builtin:200", "--seq-len", "32", "--micro-batch-size", "2",
            "--gradient-accumulation-steps", "2", "--steps", "20", "--warmup-steps", "3",
            "--eval-every-n-steps", "0", "--eval-batches", "1", "--save-every-n-steps", "5",
            "--keep-last-k", "5", "--output-dir", str(out), *extra]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("optimizer", ["--use-8bit-optimizer", "--no-use-8bit-optimizer"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, optimizer):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(parse_config(run_args(straight, optimizer)))
    first = run(parse_config(run_args(split, optimizer, "--stop-at-step", "10")))
    assert first["steps"] == 10 and sorted(losses(split)) == list(range(1, 11))
    run(parse_config(run_args(split, optimizer, "--resume", "auto")))
    expected = losses(straight)
    assert sorted(expected) == list(range(1, 21))
    assert losses(split) == expected  # exactly equal floats


def test_resume_auto_skips_a_corrupt_checkpoint(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(parse_config(run_args(straight, "--steps", "12")))
    run(parse_config(run_args(split, "--steps", "12", "--stop-at-step", "10")))
    corrupt(split / "checkpoints" / "step-10", "truncate")
    capsys.readouterr()

    assert main(run_args(split, "--steps", "12", "--resume", str(split / "checkpoints" / "step-10"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step-10 is corrupt" in err and "truncated" in err

    assert main(run_args(split, "--steps", "12", "--resume", "auto")) == 0
    captured = capsys.readouterr()
    assert "skipping checkpoint" in captured.err and "step-10" in captured.err
    assert "resumed from" in captured.out and "step-5" in captured.out
    assert losses(split) == losses(straight)


def test_resume_with_another_model_shape_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    run(parse_config(run_args(out, "--steps", "5")))
    capsys.readouterr()
    assert main(run_args(out, "--steps", "6", "--seq-len", "16", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained with --seq-len 32 but this run has 16" in err


def test_sigint_checkpoints_and_resume_continues_exactly(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "astrobio.train", *run_args(out, "--steps", "400", "--save-every-n-steps", "0")]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(losses(out) if metrics.exists() else {}) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped at step" in err and "--resume auto" in err
    stopped = max(losses(out))
    assert 3 <= stopped < 400
    assert (out / "checkpoints" / f"step-{stopped}" / "manifest.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == stopped
    more = ["--steps", "400", "--save-every-n-steps", "0", "--stop-at-step", str(stopped + 2)]
    assert main(run_args(out, *more, "--resume", "auto")) == 0
    run(parse_config(run_args(tmp_path / "straight", *more)))
    assert sorted(losses(out)) == list(range(1, stopped + 3))
    assert losses(out) == losses(tmp_path / "straight")


# ------------------------------------------------------------------------------- streamed files

def odd_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"f32": torch.randn(257, 3, generator=g), "bf16": torch.randn(1000, generator=g).bfloat16(),
            "f16": torch.randn(5, generator=g).half(), "i64": torch.arange(7),
            "u8": torch.arange(255, dtype=torch.uint8),
            "i8": torch.tensor([-3, 4], dtype=torch.int8), "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.empty(0, 4),
            "strided": torch.randn(40, 30, generator=g).t(), "big": torch.randn(300_000, generator=g)}


def test_streamed_files_are_safetensors_both_ways(tmp_path):
    from safetensors.torch import load_file, save_file

    from astrobio.train.checkpoint import IoStats, read_tensors, write_tensors
    tensors, stats = odd_tensors(), IoStats()
    record = write_tensors(tmp_path / "ours.safetensors", tensors, stats)
    assert record.bytes == (tmp_path / "ours.safetensors").stat().st_size == stats.bytes and stats.seconds > 0
    assert_same_tree(dict(sorted(load_file(tmp_path / "ours.safetensors").items())),
                     {k: v.contiguous() for k, v in sorted(tensors.items())})
    assert_same_tree(dict(sorted(read_tensors(tmp_path / "ours.safetensors").items())),
                     dict(sorted(tensors.items())))
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors")
    assert_same_tree(dict(sorted(read_tensors(tmp_path / "theirs.safetensors").items())),
                     dict(sorted(tensors.items())))


def test_loaded_tensors_are_copy_on_write(tmp_path):
    from astrobio.train.checkpoint import digest_of, read_tensors, write_tensors
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, {"big": torch.ones(1 << 19)})
    loaded = read_tensors(path)["big"]
    loaded.mul_(3)
    assert digest_of(path) == record.digest
    assert torch.equal(read_tensors(path)["big"], torch.ones(1 << 19))


def independent_chunked_digest(data: bytes, piece: int) -> str:
    """The format-2 digest as the docstring of astrobio.train.checkpoint defines it, computed plainly."""
    import hashlib
    pieces = [data[i:i + piece] for i in range(0, len(data), piece)] or [b""]
    return hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in pieces)).hexdigest()


@pytest.mark.parametrize("numel", [0, 1, 255, 256, 257, 1024, 3000])
def test_chunked_digest_matches_its_definition_at_piece_boundaries(tmp_path, monkeypatch, numel):
    import astrobio.train.checkpoint as checkpoint
    monkeypatch.setattr(checkpoint, "HASH_CHUNK", 1024)  # pieces of 1 KiB: the tensors below cross many
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.arange(numel, dtype=torch.float32), "b": torch.ones(7, dtype=torch.bfloat16),
               "c": torch.arange(numel // 3, dtype=torch.uint8)}
    record = checkpoint.write_tensors(path, tensors)
    expected = independent_chunked_digest(path.read_bytes(), 1024)
    assert record.digest == expected == checkpoint.digest_of(path)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert checkpoint.digest_of(empty) == independent_chunked_digest(b"", 1024)


def test_a_changed_byte_in_any_piece_is_found(tmp_path, monkeypatch):
    import astrobio.train.checkpoint as checkpoint
    monkeypatch.setattr(checkpoint, "HASH_CHUNK", 4096)
    model, opt = trained_optimizer("8bit")
    path = Checkpointer(tmp_path, keep_last_k=1).save(3, model.state_dict(), {"optimizer": opt.state_dict()})
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    assert len(data) > 3 * 4096  # several pieces: change a byte of the last full one
    data[(len(data) // 4096 - 1) * 4096 + 17] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its digest"):
        checkpoint.verify(path)


def test_a_format_1_checkpoint_still_loads(tmp_path):
    """Checkpoints written before the chunked digest (format 1: a plain sha256 per file) verify and load;
    one altered file is still refused."""
    import hashlib
    from astrobio.train.checkpoint import verify
    model, opt = trained_optimizer("8bit")
    path = Checkpointer(tmp_path, keep_last_k=1).save(3, model.state_dict(), {"optimizer": opt.state_dict()})
    manifest = json.loads((path / "manifest.json").read_text())
    files = {name: {"bytes": entry["bytes"], "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
             for name, entry in manifest["files"].items()}
    (path / "manifest.json").write_text(json.dumps({"format": 1, "step": 3, "files": files}))
    model_state, state, step = load_checkpoint(path)
    assert step == 3 and set(model_state) == set(model.state_dict())
    corrupt(path, "flip")
    with pytest.raises(CheckpointError, match="does not match its digest"):
        verify(path)


def test_a_malformed_tensor_file_is_refused(tmp_path):
    from astrobio.train.checkpoint import read_tensors, write_tensors
    path = tmp_path / "t.safetensors"
    write_tensors(path, {"a": torch.ones(10), "b": torch.zeros(3)})
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match="cover"):
        read_tensors(path)


def test_save_and_load_report_bytes_and_seconds(tmp_path):
    from astrobio.train.checkpoint import IoStats
    model, opt = trained_optimizer("8bit")
    saved, loaded = IoStats(), IoStats()
    path = Checkpointer(tmp_path, keep_last_k=1).save(3, model.state_dict(), {"optimizer": opt.state_dict()},
                                                     stats=saved)
    tensor_files = [p for p in path.iterdir() if p.suffix == ".safetensors"]
    assert saved.bytes == sum(p.stat().st_size for p in tensor_files) and saved.gbps > 0
    load_checkpoint(path, stats=loaded)
    manifest = json.loads((path / "manifest.json").read_text())
    assert loaded.bytes == sum(f["bytes"] for f in manifest["files"].values()) and loaded.gbps > 0


PEAK_SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from astrobio.optim import OffloadEngine
from astrobio.train.checkpoint import Checkpointer, load_checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

root, width, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).bfloat16()
engine = OffloadEngine(model.named_parameters(), lr=1e-3, master_weights="bf16-sr", accum_dtype="bf16")
engine.begin_step(1)
model(torch.randn(4, width, dtype=torch.bfloat16)).float().square().mean().backward()
engine.end_step()
engine.synchronize()
reset_peak()
before = status("VmRSS")
path = Checkpointer(root, keep_last_k=1).save(1, model.state_dict(), {"optimizer": engine.state_dict()})
save_peak = status("VmHWM") - before
reset_peak()
before = status("VmRSS")
model_state, loaded, _ = load_checkpoint(path)
load_peak = status("VmHWM") - before
engine.load_state_dict(loaded["optimizer"])
print(json.dumps({"save_peak": save_peak, "load_peak": load_peak,
                  "same": all(torch.equal(model_state[k], v) for k, v in model.state_dict().items())}))
"""


def test_save_streams_and_load_maps_without_a_second_copy(tmp_path):
    """A bf16 model of 32M parameters under the offload engine (bf16-sr masters: 64 MiB, 8-bit moments:
    64 MiB): saving its state adds almost nothing to the host's peak (the masters are written from the
    engine's own buffers; the old save cloned them first, +64 MiB, and copied device weights whole), and
    loading it maps the files instead of reading them into memory. In a fresh process, with glibc
    returning freed memory at once and the peak reset before each."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    env = {**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), "2048", "8"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["same"]
    assert result["save_peak"] < 16 << 20, f"save added {result['save_peak'] >> 20} MiB"
    # verifying hashes pieces of the files in parallel, 4 MiB read buffers per thread: bounded, whatever
    # the size
    from astrobio.train.checkpoint import READ_BYTES, hash_threads
    bound = (32 << 20) + hash_threads() * READ_BYTES
    assert result["load_peak"] < bound, f"load added {result['load_peak'] >> 20} MiB"


def test_an_offload_engine_state_resumes_through_a_checkpoint(tmp_path):
    """The engine's live master views are saved as they are; the loaded engine owns copies."""
    from astrobio.optim import OffloadEngine
    model = build_model(get_config("tiny", vocab_size=259), dtype=torch.bfloat16)
    engine = OffloadEngine(model.named_parameters(), lr=1e-3, master_weights="bf16-sr", bucket_bytes=1 << 16)
    tokens = torch.randint(0, 259, (2, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        engine.begin_step(1)
        logits = model(tokens[:, :-1]).float()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        engine.end_step()
    saved = engine.state_dict()
    path = Checkpointer(tmp_path, keep_last_k=1).save(2, model.state_dict(), {"optimizer": saved})
    _, state, _ = load_checkpoint(path)
    twin = build_model(get_config("tiny", vocab_size=259), seed=9, dtype=torch.bfloat16)
    other = OffloadEngine(twin.named_parameters(), lr=1e-3, master_weights="bf16-sr", bucket_bytes=1 << 16)
    other.load_state_dict(state["optimizer"])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert_same_tree(other.state_dict()["state"], saved["state"])
    assert not any(v.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
                   for i in state["optimizer"]["state"] for v, w in
                   zip(other.state_dict()["state"][i].values(), state["optimizer"]["state"][i].values())
                   if torch.is_tensor(v) and v.numel())
    engine.close()
    other.close()
