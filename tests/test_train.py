"""The trainer: configuration (flags, files, validation, exit code 2), exact gradient accumulation,
clipping, the schedule, and a short end-to-end run (the default job's pytest version)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from astrobio.model import build_model, get_config
from astrobio.model.presets import TRAINING_DEFAULTS
from astrobio.optim import AdamW8bit
from astrobio.train import ConfigError, main, parse_config, run
from astrobio.train.builders import WarmupCosine
from astrobio.train.local import LocalStepRunner, SingleProcess
from astrobio.train.optimizer import EightBitAdamW, TorchAdamW

REPO = Path(__file__).resolve().parents[1]


def small_args(out: Path, *extra: str) -> list[str]:
    """A run small enough for CI: tiny model, 300 built-in records, 4 x 32-token micro-batches."""
    return ["--data", "builtin:300", "--seq-len", "32", "--micro-batch-size", "4", "--eval-batches", "2",
            "--pipeline-stages", "1", "--output-dir", str(out), *extra]


# ------------------------------------------------------------------------------------ configuration

@pytest.mark.parametrize("flags, expected", [
    (["--pipeline-stages", "1"], (16, 16, 1)),
    (["--pipeline-stages", "2"], (16, 4, 4)),  # 4 micro-batches to fill the pipeline
    (["--batch-size", "8", "--micro-batch-size", "2"], (8, 2, 4)),
    (["--micro-batch-size", "2", "--gradient-accumulation-steps", "3"], (6, 2, 3)),
    (["--batch-size", "8", "--gradient-accumulation-steps", "2"], (8, 4, 2)),
    (["--batch-size", "12", "--micro-batch-size", "4", "--gradient-accumulation-steps", "3"], (12, 4, 3)),
])
def test_batch_sizes_resolve(monkeypatch, flags, expected):
    monkeypatch.setattr("astrobio.train.config.usable_cores", lambda: 1)  # one process
    config = parse_config(flags)
    assert (config.batch_size, config.micro_batch_size, config.gradient_accumulation_steps) == expected


@pytest.mark.parametrize("cores, flags, expected", [
    (2, [], (1, "2", 16, 8, 1)),  # the default job: one replica per core, 16 sequences a step
    (8, [], (1, "2", 16, 8, 1)),  # two processes, as on two cores (each then takes 4 threads)
    (1, [], (1, "1", 16, 16, 1)),  # one core: one process
    (2, ["--batch-size", "32"], (1, "2", 32, 16, 1)),
    (2, ["--micro-batch-size", "4", "--gradient-accumulation-steps", "2"], (1, "2", 16, 4, 2)),
    (2, ["--batch-size", "9"], (1, "1", 9, 9, 1)),  # does not split over two: one process
    (2, ["--pipeline-stages", "2"], (2, "1", 16, 4, 4)),  # the pipeline when asked for
    (2, ["--data-parallel", "1"], (1, "1", 16, 16, 1)),
    (2, ["--data-parallel", "3"], (1, "3", 48, 16, 1)),
    (2, ["--modalities", "text,graph"], (1, "1", 16, 16, 1)),  # a prefix runs in one process
    (2, ["--device", "cuda"], (1, "1", 16, 16, 1)),  # one device may not hold two NCCL ranks
])
def test_default_layout(monkeypatch, cores, flags, expected):
    monkeypatch.setattr("astrobio.train.config.usable_cores", lambda: cores)
    config = parse_config(flags)
    assert (config.pipeline_stages, config.data_parallel, config.batch_size, config.micro_batch_size,
            config.gradient_accumulation_steps) == expected


def test_default_layout_under_torchrun_is_torchruns(monkeypatch):
    monkeypatch.setattr("astrobio.train.config.usable_cores", lambda: 2)
    monkeypatch.setattr("astrobio.train.config.torchrun_world_size", lambda: 4)
    config = parse_config([])
    assert (config.pipeline_stages, config.data_parallel, config.batch_size) == (1, "4", 64)


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "8", "--micro-batch-size", "3"], "--micro-batch-size 3 does not divide --batch-size 8"),
    (["--batch-size", "8", "--micro-batch-size", "2", "--gradient-accumulation-steps", "3"], "agree"),
    (["--batch-size", "9", "--gradient-accumulation-steps", "2"], "does not divide --batch-size 9"),
])
def test_inconsistent_batch_sizes_are_refused(flags, words):
    with pytest.raises(ConfigError, match=words):
        parse_config(flags)


FILE_VALUES = {"model": "tiny", "steps": 7, "batch-size": 8, "micro_batch_size": 2, "lr": 0.001,
               "use-8bit-optimizer": False, "use_mixed_precision": True, "data": "builtin:50",
               "wandb_name": "probe"}
FLAGS = ["--model", "tiny", "--steps", "7", "--batch-size", "8", "--micro-batch-size", "2", "--lr", "0.001",
         "--no-use-8bit-optimizer", "--use-mixed-precision", "--data", "builtin:50", "--wandb-name", "probe"]


def toml_text(values: dict) -> str:
    def literal(v):
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)
    return "".join(f"{k} = {literal(v)}\n" for k, v in values.items())


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_file_equals_flags(tmp_path, suffix):
    import yaml
    path = tmp_path / f"run{suffix}"
    path.write_text(yaml.safe_dump(FILE_VALUES) if suffix == ".yaml" else toml_text(FILE_VALUES))
    from_file = parse_config(["--config", str(path)])
    assert from_file == parse_config(FLAGS)
    assert from_file != parse_config([])  # the file did change something
    # a flag given on the command line wins over the file
    assert parse_config(["--config", str(path), "--lr", "0.002"]).lr == 0.002


@pytest.mark.parametrize("text, words", [
    ("bogus_key: 1\n", "unknown key 'bogus_key'"),
    ("lr: fast\n", "lr in .* must be float"),
    ("model: huge\n", "model in .* must be one of"),
    ("- 1\n- 2\n", "must hold a mapping"),
])
def test_bad_config_file_is_refused(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        parse_config(["--config", str(path)])


def bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return [
        (["--model", "huge"], "invalid choice: 'huge'"),
        (["--batch-size", "8", "--micro-batch-size", "3"], "does not divide"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--lr", "-0.001"], "lr must be a positive number"),
        (["--steps", "5", "--epochs", "1"], "not both"),
        (["--seq-len", "100000"], "exceeds model 'tiny'"),
        (["--data", str(tmp_path / "missing.jsonl")], "not found"),
        (["--data", "builtin:0"], "positive whole number"),
        (["--pipeline-stages", "5"], "exceeds model 'tiny''s 4 layers"),
        (["--use-cpu-offloading", "--no-use-8bit-optimizer"], "runs the 8-bit AdamW on the host"),
        (["--master-weights", "bf16-sr"], "add --use-cpu-offloading"),
        (["--modalities", "text,audio"], "unknown modality 'audio'"),
        (["--memory-alert-fraction", "1.5"], "--memory-alert-fraction must be in (0, 1]"),
        (["--resume", str(tmp_path / "nowhere")], "pass a run's --output-dir, one of its checkpoints/step-N"),
        (["--output-dir", str(blocker / "run")], "is a file"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
        (["--beta2", "1.0"], "--beta2 must be in [0, 1)"),
        (["--output-dir", "/proc/astrobio-no"], "--output-dir /proc/astrobio-no"),
    ]


def test_bad_configurations_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    for flags, words in bad_cases(tmp_path):
        out = tmp_path / "run"
        code = main(small_args(out) + flags)
        err = capsys.readouterr().err
        assert code == 2, flags
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, (flags, err)
        assert not out.exists(), flags


def test_cli_bad_configuration_has_no_traceback(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "astrobio.train", "--output-dir", str(out),
                             "--batch-size", "8", "--micro-batch-size", "3"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "--micro-batch-size 3 does not divide --batch-size 8" in result.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------- the step

def tiny_model(seed: int = 0):
    return build_model(get_config("tiny", vocab_size=259), seed=seed)


def test_gradient_accumulation_equals_full_batch():
    torch.manual_seed(0)
    tokens = torch.randint(0, 259, (8, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    reference = tiny_model()
    loss = F.cross_entropy(reference(inputs).flatten(0, 1), targets.flatten())
    loss.backward()

    model = tiny_model()
    micro_batches = [(inputs[i:i + 2], targets[i:i + 2]) for i in range(0, 8, 2)]
    accumulated = LocalStepRunner(model, torch.device("cpu"), False).forward_backward(micro_batches)

    assert accumulated == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def loop_optimizer(params: list, eight_bit: bool, max_grad_norm: float):
    """The trainer's optimizer (one process) over ``params``, as build_optimizer makes it."""
    if eight_bit:
        return EightBitAdamW(AdamW8bit(params, lr=1e-2), params, max_grad_norm, SingleProcess().global_norm)
    return TorchAdamW(torch.optim.AdamW(params, lr=1e-2), params, max_grad_norm, SingleProcess().global_norm)


@pytest.mark.parametrize("eight_bit", [False, True])
def test_optimizer_step_clips_like_clip_grad_norm(eight_bit):
    def make(model):
        params = list(model.parameters())
        opt = AdamW8bit(params, lr=1e-2) if eight_bit else torch.optim.AdamW(params, lr=1e-2)
        return params, opt

    torch.manual_seed(1)
    tokens = torch.randint(0, 259, (2, 17))
    ours, reference = tiny_model(), tiny_model()
    for model in (ours, reference):
        (F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()) * 50).backward()
    params = list(ours.parameters())
    stats = loop_optimizer(params, eight_bit, max_grad_norm=0.5).end_step(lr=1e-2)
    norm, skipped = stats.grad_norm, stats.skipped
    ref_params, ref_opt = make(reference)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
    ref_opt.step()
    assert not skipped and norm > 0.5 and norm == pytest.approx(ref_norm.item(), rel=1e-6)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert p.grad is None  # the step leaves no gradient behind


@pytest.mark.parametrize("eight_bit", [False, True])
def test_non_finite_gradient_skips_the_step(eight_bit):
    model = tiny_model()
    params = list(model.parameters())
    optimizer = loop_optimizer(params, eight_bit, max_grad_norm=1.0)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[3].grad[0] = float("nan")
    stats = optimizer.end_step(lr=1e-2)
    norm, skipped = stats.grad_norm, stats.skipped
    assert skipped and math.isnan(norm)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("model", sorted(TRAINING_DEFAULTS))
def test_optimizer_defaults_come_from_the_preset(model):
    config = parse_config(["--model", model])
    defaults = TRAINING_DEFAULTS[model]
    assert (config.lr, config.min_lr, config.warmup_steps) == (defaults.lr, defaults.min_lr, defaults.warmup_steps)
    assert (config.beta1, config.beta2) == defaults.betas
    assert TRAINING_DEFAULTS["13b"].lr < TRAINING_DEFAULTS["tiny"].lr  # the large model takes smaller steps


def test_an_explicit_optimizer_setting_wins_over_the_preset(tmp_path):
    config = parse_config(["--model", "13b", "--lr", "2e-4", "--warmup-steps", "3", "--beta2", "0.99"])
    assert (config.lr, config.warmup_steps, config.beta1, config.beta2) == (2e-4, 3, 0.9, 0.99)
    assert config.min_lr == pytest.approx(2e-5)  # a tenth of the given --lr, not the preset's floor
    file = tmp_path / "run.toml"
    file.write_text("lr = 5e-4\nmin_lr = 0.0\nbeta1 = 0.8\n")
    config = parse_config(["--model", "13b", "--config", str(file)])
    assert (config.lr, config.min_lr, config.beta1) == (5e-4, 0.0, 0.8)
    assert parse_config(["--config", str(file), "--lr", "1e-3"]).lr == 1e-3  # the command line wins the file
    # a --lr below the preset's floor no longer trips over the preset's --min-lr
    assert parse_config(["--lr", "1e-5"]).min_lr == pytest.approx(1e-6)


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(peak=1e-3, floor=1e-4, warmup=4, total=20)
    lrs = [schedule(s) for s in range(21)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)
    assert lrs[12] == pytest.approx(5.5e-4)  # half-way through the decay: the mean of peak and floor
    assert lrs[20] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


# ------------------------------------------------------------------------------------ a real run

def test_short_run_learns_and_writes_its_outputs(tmp_path):
    out = tmp_path / "run"
    summary = run(parse_config(small_args(out, "--steps", "30", "--eval-every-n-steps", "10",
                                          "--save-every-n-steps", "10", "--log-every-n-steps", "2")))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(val) == [0, 10, 20, 30]
    assert val[0] == pytest.approx(math.log(259), abs=0.15)  # an untrained model is near uniform
    assert val[30] <= 0.75 * val[0]
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == list(range(2, 31, 2))
    for r in trained:
        assert {"lr", "grad_norm", "tokens_per_s", "rss_mib", "peak_rss_mib"} <= set(r)
        assert r["tokens_per_s"] > 0 and math.isfinite(r["grad_norm"])
    assert trained[-1]["loss"] < trained[0]["loss"]

    assert summary["initial_val_loss"] == val[0] and summary["final_val_loss"] == val[30]
    assert json.loads((out / "summary.json").read_text())["steps"] == 30
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["steps"] == 30 and resolved["batch_size"] == 4 and resolved["gradient_accumulation_steps"] == 1
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20", "step-30"]  # keep_last_k 2
    assert (out / "checkpoints" / "step-30" / "manifest.json").is_file()


def test_epochs_set_the_step_count(tmp_path):
    out = tmp_path / "run"
    summary = run(parse_config(["--pipeline-stages", "1", "--data", "builtin:20", "--seq-len", "32",
                                "--micro-batch-size", "8",
                                "--gradient-accumulation-steps", "2", "--epochs", "2", "--output-dir", str(out),
                                "--eval-batches", "1"]))
    from astrobio.data import ByteTokenizer, PackedLoader, build_token_splits, load_records
    train_ids, _ = build_token_splits(load_records("builtin:20"), ByteTokenizer())
    per_epoch = PackedLoader(train_ids, 32, 8, seed=0).batches_per_epoch // 2
    assert summary["steps"] == 2 * per_epoch
    assert json.loads((out / "config.json").read_text())["steps"] == 2 * per_epoch


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(small_args(out, "--steps", "2")) == 0
    capsys.readouterr()
    assert main(small_args(out, "--steps", "3")) == 2  # another run than the one there
    assert "--resume auto" in capsys.readouterr().err
    assert main(small_args(out, "--steps", "3", "--overwrite")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # the old run's records are gone


def step_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_gradient_checkpointing_and_bf16_autocast(tmp_path):
    base = small_args(tmp_path / "fp32", "--steps", "3", "--eval-batches", "1")
    run(parse_config(base))
    run(parse_config(small_args(tmp_path / "ckpt", "--steps", "3", "--eval-batches", "1",
                                "--use-gradient-checkpointing")))
    run(parse_config(small_args(tmp_path / "bf16", "--steps", "3", "--eval-batches", "1",
                                "--use-mixed-precision")))
    fp32 = step_losses(tmp_path / "fp32")
    assert step_losses(tmp_path / "ckpt") == pytest.approx(fp32, rel=1e-5)  # recomputation changes nothing
    bf16 = step_losses(tmp_path / "bf16")
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-2)  # bf16 rounding, same model and data


class FakeWandb:
    """Stands in for the wandb module: records what the logger hands it."""

    def __init__(self):
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.mark.parametrize("env, mode", [({}, "offline"), ({"WANDB_API_KEY": "secret-key"}, "online"),
                                       ({"WANDB_API_KEY": "secret-key", "WANDB_MODE": "disabled"}, "disabled")])
def test_wandb_mirrors_metrics_offline_by_default(tmp_path, monkeypatch, env, mode):
    from astrobio.train.logging import MetricsLogger
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = parse_config(small_args(tmp_path)).to_dict()
    logger = MetricsLogger(tmp_path, config, wandb_project="astro", wandb_name="probe")
    logger.log({"step": 3, "loss": 1.5})
    logger.close()
    assert fake.init_kwargs["mode"] == mode and fake.init_kwargs["project"] == "astro"
    assert "secret-key" not in json.dumps(fake.init_kwargs["config"])
    assert fake.logged == [(3, {"loss": 1.5})] and fake.finished
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "loss": 1.5}


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_project_without_wandb_is_a_config_error(tmp_path, capsys):
    assert main(small_args(tmp_path / "run", "--wandb-project", "astro")) == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_a_peers_stop_request_is_not_a_second_ctrl_c():
    import signal

    from astrobio.train.trainer import StopSignal
    stop = StopSignal()
    stop.received = signal.SIGINT  # agreed after a peer rank's Ctrl-C, before this process saw its own
    stop.handle(signal.SIGINT, None)  # this process's copy of the same Ctrl-C: keep stopping cleanly
    assert stop.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C to this process interrupts at once
        stop.handle(signal.SIGINT, None)


def test_a_signal_during_the_stop_gather_is_kept_for_the_next_step():
    import signal
    from types import SimpleNamespace

    from astrobio.train.trainer import StopSignal, Trainer
    stop = StopSignal()

    def gather(value):  # every rank sent None; this rank's Ctrl-C lands while the gather runs
        stop.handle(signal.SIGINT, None)
        return [value, None]

    trainer = SimpleNamespace(ranks=SimpleNamespace(gather_all=gather))
    assert Trainer.stopping(trainer, stop) is False  # the ranks agreed on no signal this step...
    assert stop.received == signal.SIGINT  # ...but it is not lost: the next gather carries it
    trainer.ranks.gather_all = lambda value: [value, None]
    assert Trainer.stopping(trainer, stop) is True


# ------------------------------------------------------------------------------ running it again

def test_the_same_command_twice_reports_the_complete_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = small_args(out, "--steps", "2", "--eval-batches", "1")
    assert main(args) == 0
    first = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(args) == 0  # as the README's default job run a second time
    printed = capsys.readouterr().out
    assert "already holds this run, complete (2 of 2 steps)" in printed
    assert json.loads((out / "summary.json").read_text()) == first  # nothing trained or rewritten
    assert main(small_args(out, "--steps", "3", "--eval-batches", "1")) == 2  # another run: refused as before
    assert "already holds a run" in capsys.readouterr().err


def test_resume_accepts_a_run_directory_and_the_summary_adds_up(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(small_args(out, "--steps", "4", "--stop-at-step", "2", "--eval-batches", "1")) == 0
    capsys.readouterr()
    assert main(small_args(out, "--steps", "4", "--eval-batches", "1", "--resume", str(out))) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoints' / 'step-2'} (step 2)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    # this run's steps are part of its wall time; the steps since step 0 include the first run's
    assert summary["train_time_s"] <= summary["wall_time_s"] < summary["wall_time_s"] + summary["train_time_since_step_0_s"]
    assert summary["train_time_since_step_0_s"] > summary["train_time_s"]
    outputs = next(line for line in printed.splitlines() if line.startswith("outputs"))
    assert outputs.endswith(", checkpoints/step-4") and "plots/ (loss, memory, step_timeline)" in outputs


def test_a_pipeline_job_draws_one_progress_bar(tmp_path, capfd):
    out = tmp_path / "run"
    assert main(small_args(out, "--steps", "2", "--eval-batches", "1", "--pipeline-stages", "2",
                           "--gradient-accumulation-steps", "2")) == 0
    err = capfd.readouterr().err
    # tqdm redraws its bar in place; a second bar (another rank's) would start at 0 of the steps again
    assert err.count("train:   0%") == 1, err


def test_the_memory_plot_knows_it_ran_on_the_cpu(tmp_path, monkeypatch):
    """On the CPU the "device" is host memory: the records say so, so that plots/memory.png draws the
    resident set (and its peak) instead of four copies of it."""
    plotted = []
    monkeypatch.setattr("astrobio.train.memory.plot_memory", lambda samples, path, alert: plotted.extend(samples))
    out = tmp_path / "run"
    assert main(small_args(out, "--steps", "2", "--eval-batches", "1")) == 0
    assert plotted and {sample["device"] for sample in plotted} == {"cpu"}
