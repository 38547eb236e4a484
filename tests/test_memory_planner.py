"""The memory planner: its counts against what autograd, the optimizer and the model really hold, the 13B
plan on 2 x 24 GB (docs/MEMORY.md), refusals that say what to change, and planned vs measured peak memory."""

import importlib.util
import json
from dataclasses import replace

import pytest
import torch

from astrobio.memory import PlanConfig, PlanError, check_fits, format_plan, get_hardware, parse_bytes, plan, preflight
from astrobio.memory.peak import occupancy
from astrobio.memory.planner import moments_bytes
from astrobio.memory.validate import CpuCase, measure_cpu, measure_cuda, run_stage
from astrobio.model import build_model, build_stage, get_config
from astrobio.optim.adamw8bit import AdamW8bit
from astrobio.plan import main as plan_cli
from _saved_bytes import last_stage_saved_bytes, saved_and_planned_bytes

GIB = 2 ** 30


@pytest.fixture(scope="module")
def plan_13b():
    return plan(PlanConfig(model="13b", stages=2, gpu_memory=24 * GIB, host_memory=256 * GIB, seq_len=2048,
                           micro_batch_size=1, hardware="a5000"))


# --- counts against the real thing ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_block_saved_bytes_equal_what_autograd_saves(dtype, autocast):
    measured, planned = saved_and_planned_bytes(dtype, autocast)
    assert measured == pytest.approx(planned, rel=0.01)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_stage_saved_bytes_equal_the_plan_and_the_eager_loss(checkpointing):
    """The last stage's loss from its input (the pipeline's): what autograd keeps is the planner's count
    plus the eager cross-entropy's fp32 log-probabilities (the planner's loss term); the fused kernels'
    chunked loss keeps no logits (tests/test_model_kernels.py)."""
    result = last_stage_saved_bytes("eager", checkpointing)
    assert result["holds_logits"]
    assert result["measured"] == pytest.approx(result["planned"] + result["logits_fp32"], rel=0.01)


def test_the_fused_kernels_plan_the_chunked_loss():
    """kernels="fused": the last stage plans the chunked loss's working set (one chunk of logits, the
    fp32 head-weight gradient) instead of the eager loss's 12 bytes per logit, every block keeps less;
    a bad value is refused naming it."""
    config = dict(model=get_config("tiny", vocab_size=32768), stages=2, seq_len=256, micro_batch_size=4,
                  micro_batches=4, checkpointing=False, offload=False, hardware="a5000", param_dtype="fp32")
    eager, fused = (plan(PlanConfig(**config, kernels=k)) for k in ("eager", "fused"))
    term = lambda p, s, name: next(t.bytes for t in p.devices[s].terms if t.name == name)  # noqa: E731
    logits = 4 * 4 * 256 * 32768
    assert term(eager, 1, "logits + loss") >= 3 * logits  # the eager loss's backward: 12 bytes per logit
    # one chunk of logits (here all 1024 tokens' in fp32, 4 bytes per logit) and the fp32 head gradient
    assert term(fused, 1, "logits + loss") == logits + 4 * 32768 * 128 + 4 * 1024
    assert term(fused, 0, "activations") < term(eager, 0, "activations")
    assert fused.devices[1].total < eager.devices[1].total - logits
    with pytest.raises(ValueError, match="kernels='triton'"):
        PlanConfig(kernels="triton")
    # on the CPU the fused layers (the C++ kernels) keep the eager loss: its logits are planned
    cpu_eager, cpu_fused = (plan(PlanConfig(**{**config, "hardware": "cpu"}, kernels=k)) for k in ("eager", "fused"))
    assert term(cpu_fused, 1, "logits + loss") == term(cpu_eager, 1, "logits + loss") >= 3 * logits
    assert term(cpu_fused, 0, "activations") < term(cpu_eager, 0, "activations")


def test_the_cli_takes_the_kernels(capsys):
    args = ["--model", "13b", "--seq-len", "2048", "--no-checkpointing", "--hardware", "h200", "--json"]
    totals = {}
    for kernels in ("eager", "fused"):
        assert plan_cli([*args, "--kernels", kernels]) == 0
        out = json.loads(capsys.readouterr().out)
        totals[kernels] = out["devices"][1]["total"]
        cli = plan(PlanConfig(model="13b", seq_len=2048, checkpointing=False, hardware="h200", kernels=kernels))
        assert totals[kernels] == cli.devices[1].total
    assert totals["fused"] < totals["eager"]


def test_the_trainer_plans_the_kernels_it_will_run(monkeypatch):
    """The preflight plans the kernels ``speed_up`` switches on: --kernels fused falls back to eager on
    the CPU where neither the C++ kernels are built nor the Triton interpreter is on."""
    from astrobio import ops
    from astrobio.train import parse_config
    from astrobio.train.memory import plan_config
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if ops.has_cpu_kernel():
        assert plan_config(parse_config([]), 259, cpu).kernels == "fused"
        assert plan_config(parse_config(["--kernels", "fused"]), 259, cpu).kernels == "fused"
    assert plan_config(parse_config(["--kernels", "eager"]), 259, cpu).kernels == "eager"
    monkeypatch.setattr(ops, "has_cpu_kernel", lambda: False)
    assert plan_config(parse_config([]), 259, cpu).kernels == "eager"
    assert plan_config(parse_config(["--kernels", "fused"]), 259, cpu).kernels == "eager"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("triton") is not None:
        assert plan_config(parse_config(["--kernels", "fused"]), 259, cpu).kernels == "fused"


def test_stage_parameter_counts_sum_to_the_model():
    for name, split in (("tiny", (1, 3)), ("small", (5, 5, 4)), ("13b", (28, 28))):
        config = get_config(name)
        p = plan(PlanConfig(model=name, stages=len(split), layers_per_stage=split, seq_len=64, micro_batches=4))
        assert sum(p.stage_params) == build_model(config, device="meta").num_parameters()
        assert p.devices[0].params == p.stage_params[0]
    assert sum(plan(PlanConfig(model="13b", seq_len=64)).stage_params) == pytest.approx(13.14e9, rel=0.005)


def test_moments_bytes_equal_adamw8bit_state():
    sizes = [1, 255, 4095, 4096, 4097, 70_001]
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = AdamW8bit(params, lr=1e-3)
    opt.step()
    held = sum(v.nbytes for state in opt.state.values() for v in state.values() if torch.is_tensor(v))
    assert moments_bytes(sizes, "adamw8bit", 4) == held


def test_occupancy_follows_the_schedules():
    # 1F1B keeps at most 2 micro-batches in flight on stage 0 of 2; GPipe keeps all of them (docs/PIPELINE.md)
    assert max(b for b, _ in occupancy("1f1b", 2, 0, 32)) + 1 == 2
    assert max(b for b, _ in occupancy("1f1b", 2, 1, 32)) + 1 == 1
    assert max(b for b, _ in occupancy("gpipe", 2, 0, 32)) + 1 == 32
    # ZB-H1 defers stage 1's W by one micro-batch; stage 0 runs its W right after B
    assert max(w for _, w in occupancy("zb-h1", 2, 1, 8)) == 1
    assert max(w for _, w in occupancy("zb-h1", 2, 0, 8)) == 0


def test_gpipe_holds_every_micro_batch_checkpoints(plan_13b):
    gpipe = plan(replace(plan_13b.config, schedule="gpipe"))
    term = lambda p: next(t.bytes for t in p.devices[0].terms if t.name == "activations")  # noqa: E731
    # a layer-boundary checkpoint is 2 s h bytes per layer per micro-batch (bf16)
    checkpoint = 2 * 2048 * 4352
    assert term(gpipe) - term(plan_13b) == (32 - 2) * 28 * checkpoint


# --- the 13B plan -----------------------------------------------------------------------------------


def test_13b_fits_on_two_a5000_under_22_gib(plan_13b):
    p = plan_13b
    assert p.fits
    check_fits(p)
    for device, params in zip(p.devices, p.stage_params):
        assert device.total <= 22 * GIB
        assert next(t.bytes for t in device.terms if t.name == "bf16 weights") == 2 * params
    # host: at least fp32 master + fp32 accumulators + 2 bytes of 8-bit moments per parameter
    assert p.host.total >= 10 * p.total_params and p.host.fits
    assert p.timing.tokens_per_s > 0 and p.timing.critical_path in ("compute", "link", "CPU (gradient accumulation)")
    text = format_plan(p)
    assert "FITS" in text and "tokens/s" in text and "stage 1" in text


def test_13b_on_one_gpu_without_offload_is_refused_naming_the_term():
    p = plan(PlanConfig(model="13b", stages=1, offload=False, gpu_memory=24 * GIB, seq_len=2048))
    assert not p.fits
    with pytest.raises(PlanError) as caught:
        check_fits(p)
    message = str(caught.value)
    assert "stage 0 needs" in message and "over its budget" in message
    assert "bf16 weights" in message and "fp32 master weights" in message
    assert "offload" in message  # what to change
    assert caught.value.plan is p


def test_host_over_budget_suggests_the_lean_plan():
    p = plan(PlanConfig(model="13b", host_memory=96 * GIB, seq_len=2048))
    with pytest.raises(PlanError, match="host needs") as caught:
        check_fits(p)
    assert "bf16 master weights" in str(caught.value) or "bf16 gradient accumulators" in str(caught.value)
    assert preflight(p.config, force=True, log=lambda line: None).host.total == p.host.total


def test_bad_configuration_names_the_value():
    with pytest.raises(ValueError, match="schedule='2f2b'"):
        PlanConfig(schedule="2f2b")
    with pytest.raises(ValueError, match="unknown hardware profile 'tpu'"):
        get_hardware("tpu")
    with pytest.raises(ValueError, match="max_seq_len"):
        plan(PlanConfig(model="tiny", seq_len=4096))
    assert parse_bytes("24GiB") == 24 * GIB and parse_bytes("256 GB") == 256 * 10 ** 9
    with pytest.raises(ValueError, match="24XB"):
        parse_bytes("24XB")


def test_cli_prints_json_and_exit_status(capsys):
    rc = plan_cli(["--model", "tiny", "--stages", "2", "--hardware", "cpu", "--seq-len", "64", "--micro-batches", "4",
                   "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"]
    assert out["total_params"] == build_model(get_config("tiny"), device="meta").num_parameters()
    assert [d["label"] for d in out["devices"]] == ["stage 0", "stage 1"]
    assert plan_cli(["--model", "13b", "--stages", "1", "--no-offload", "--gpu-memory", "24GiB"]) == 1
    assert "will not fit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        plan_cli(["--gpu-memory", "lots"])
    assert bad.value.code == 2


def test_cli_counts_the_prefix_encoders_of_modalities(capsys):
    """--modalities adds the encoders (their real parameter count) to stage 0 only."""
    from astrobio.model.encoders import build_prefix
    base = ["--model", "tiny", "--stages", "2", "--hardware", "cpu", "--seq-len", "64", "--json"]
    assert plan_cli(base) == 0
    text = json.loads(capsys.readouterr().out)
    assert plan_cli([*base, "--modalities", "text,catalogue,graph"]) == 0
    multi = json.loads(capsys.readouterr().out)
    d_model = get_config("tiny").d_model
    encoders = sum(p.numel() for p in build_prefix(d_model, ("catalogue", "graph"), device="meta").parameters())
    assert multi["total_params"] - text["total_params"] == encoders > 0
    assert plan_cli([*base, "--modalities", "text,sound"]) == 2
    assert "unknown modality 'sound'" in capsys.readouterr().err


# --- multimodal prefix encoders --------------------------------------------------------------------


MULTIMODAL = ("--modalities", "text,catalogue,graph", "--seq-len", "48", "--micro-batch-size", "4",
              "--gradient-accumulation-steps", "4")


def test_the_plan_counts_the_prefix_encoders_on_stage_zero():
    """The trainer's plan of a multimodal run against the modules its builders make (not on meta)."""
    from astrobio.train import parse_config
    from astrobio.train.memory import plan_config
    from astrobio.train.builders import build_prefix as trainer_prefix
    from astrobio.train.builders import build_stage_model
    cpu = torch.device("cpu")
    for stages in (1, 2):
        config = parse_config([*MULTIMODAL, "--pipeline-stages", str(stages)])
        p = plan(plan_config(config, 259, cpu))
        prefix = trainer_prefix(config, cpu)
        encoders = sum(t.numel() for t in prefix.parameters())
        modules = [build_stage_model(config, 259, cpu, s)[0] for s in range(stages)]
        real = [sum(t.numel() for t in m.parameters()) for m in modules]
        real[0] += encoders
        assert p.stage_params == real and p.devices[0].params == real[0]
        assert next(t.bytes for t in p.devices[0].terms if t.name == "prefix encoder weights") == 4 * encoders
    # stage 0's 8-bit AdamW state (on the device without offload) covers the encoders' parameters
    params = [*modules[0].parameters(), *prefix.parameters()]
    for t in params:
        t.grad = torch.randn_like(t)
    optimizer = AdamW8bit(params, lr=1e-3)
    optimizer.step()
    held = sum(v.nbytes for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    assert next(t.bytes for t in p.devices[0].terms if t.name.startswith("optimizer moments")) == held
    offload = plan(plan_config(replace(config, use_cpu_offloading=True), 259, cpu))
    assert next(t.bytes for t in offload.host.terms if t.name.startswith("master weights")) == 4 * sum(real)
    # the prefix positions come before the 48 tokens: stage 1 (no encoders) is planned as text of 52 tokens
    text = plan(replace(p.config, modalities=(), seq_len=52))
    assert p.devices[1].total == text.devices[1].total
    assert p.devices[0].total > text.devices[0].total
    with pytest.raises(ValueError, match=r"seq_len 510 \+ 4 prefix positions exceeds"):
        plan(replace(p.config, seq_len=510))


# --- what the trainer plans for a GPU ----------------------------------------------------------------


def test_the_trainer_plans_bf16_weights_for_offload_on_a_gpu(monkeypatch):
    """With CPU offload on a GPU the device computes with bf16 weights (the trainer builds them so):
    the trainer's preflight of 13b on 2 x A5000 is the plan of ``python -m astrobio.plan``, and fits."""
    from astrobio.train import parse_config
    from astrobio.train.memory import plan_config, preflight_run, weights_dtype
    monkeypatch.setattr("astrobio.train.memory.hardware_of", lambda device: ("a5000", 24 * GIB))
    monkeypatch.setattr("astrobio.train.memory.host_total", lambda: 256 * GIB)
    gpu = torch.device("cuda", 0)
    config = parse_config(["--model", "13b", "--device", "cuda", "--pipeline-stages", "2", "--seq-len", "2048",
                           "--micro-batch-size", "1", "--gradient-accumulation-steps", "32",
                           "--use-gradient-checkpointing"])
    assert config.use_cpu_offloading and weights_dtype(config, gpu) == torch.bfloat16
    assert plan_config(config, 32768, gpu).param_dtype == "bf16"
    trainer_plan = preflight_run(config, 32768, gpu)  # raises ConfigError when it does not fit
    cli_plan = plan(PlanConfig(model="13b", stages=2, gpu_memory=24 * GIB, host_memory=256 * GIB, seq_len=2048,
                               micro_batch_size=1, micro_batches=32, hardware="a5000"))
    assert [d.total for d in trainer_plan.devices] == [d.total for d in cli_plan.devices]
    stage0 = sum(t.numel() for t in build_stage(get_config("13b"), 0, [28, 28], device="meta").parameters())
    assert next(t.bytes for t in trainer_plan.devices[0].terms if t.name == "bf16 weights") == 2 * stage0
    assert max(d.total for d in trainer_plan.devices) <= 22 * GIB
    # fp32 where the trainer builds fp32: no offload on the GPU, or offload on the CPU
    no_offload = replace(config, use_cpu_offloading=False)
    assert weights_dtype(no_offload, gpu) == torch.float32 and plan_config(no_offload, 32768, gpu).param_dtype == "fp32"
    assert plan_config(config, 32768, torch.device("cpu")).param_dtype == "fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_offloaded_gpu_run_trains_with_bf16_weights(tmp_path):
    from safetensors.torch import load_file
    from astrobio.train import parse_config, run
    summary = run(parse_config(["--device", "cuda", "--use-cpu-offloading", "--pipeline-stages", "1", "--steps", "2",
                                "--data", "builtin:100", "--seq-len", "32", "--micro-batch-size", "4",
                                "--eval-batches", "1", "--output-dir", str(tmp_path / "run")]))
    weights = load_file(f"{summary['checkpoint']}/model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert summary["final_val_loss"] < summary["initial_val_loss"]


# --- planned against measured ----------------------------------------------------------------------


def test_planned_peak_matches_measured_on_the_cpu_within_20_percent():
    cases = [CpuCase("tiny", seq_len=256, micro_batch_size=4),  # activations dominate
             CpuCase("tiny", seq_len=256, micro_batch_size=4, checkpointing=True, optimizer="adamw8bit", autocast=True),
             # bf16 weights, gradients streamed to the OffloadEngine's fp32 master, accumulators, 8-bit moments
             CpuCase("small", seq_len=32, micro_batch_size=1, checkpointing=True, optimizer="offload")]
    tiny_plan = plan(PlanConfig(model="tiny", stages=1, seq_len=256, micro_batch_size=4, micro_batches=1,
                                checkpointing=False, offload=False, optimizer="adamw", hardware="cpu"))
    activations = next(t.bytes for t in tiny_plan.devices[0].terms if t.name == "activations")
    assert activations > 0.5 * tiny_plan.devices[0].total  # so the first case tests the activation count
    for result in measure_cpu(cases):
        assert 0.8 <= result.ratio <= 1.2, result.as_dict()


def test_gpu_check_stage_run_streams_every_gradient():
    """The stage run that benchmarks/validate_memory_plan.py measures on a GPU, here on tiny shapes."""
    p = plan(PlanConfig(model=get_config("tiny", vocab_size=300), stages=2, seq_len=32, micro_batches=4,
                        hardware="cpu", device_grads_in_flight=1))
    for stage in range(2):
        held = 1 + max(b for b, _ in occupancy("1f1b", 2, stage, 4))
        assert run_stage(p, stage, torch.device("cpu")) == held * 2 * p.stage_params[stage]  # bf16 gradients


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_planned_peak_matches_measured_on_a_gpu_within_10_percent():
    for result in measure_cuda(layers=4, seq_len=1024):
        assert 0.9 <= result.ratio <= 1.1, result.as_dict()


def one_h200(location: str):
    """The 13B one-process run of issue 14 (one H200, bf16-sr masters, bf16 accumulators, 16 micro-batches)."""
    return plan(PlanConfig(model="13b", stages=1, hardware="h200", host_memory=128 * GIB, seq_len=2048,
                           micro_batches=16, master_weights="bf16-sr", accum_dtype="bf16",
                           grad_accum_location=location))


def test_device_accumulation_moves_the_accumulators_and_the_transfers():
    host, device = one_h200("host"), one_h200("device")
    accumulators = 2 * host.total_params  # bf16, one per parameter
    (on_host_stage,), (on_device_stage,) = host.devices, device.devices
    assert on_device_stage.moment == on_host_stage.moment
    term = {t.name: t.bytes for t in on_device_stage.terms}["gradient accumulators (bf16)"]
    assert term == accumulators
    allocated = sum(t.bytes for t in on_device_stage.terms if t.name not in ("allocator slack", "CUDA context"))
    assert allocated == sum(t.bytes for t in on_host_stage.terms
                            if t.name not in ("allocator slack", "CUDA context")) + accumulators
    host_terms = {t.name for t in device.host.terms}
    assert "gradient accumulators (bf16)" not in host_terms and "gradient staging" not in host_terms
    assert device.host.total < host.host.total
    # one transfer of the sums (bf16) per step instead of 16 micro-batches' gradients, and no host adds
    n, link = host.total_params, host.hardware.host_link * 1e9
    assert device.timing.link_s == pytest.approx((2 + 2) * n / link)
    assert host.timing.link_s == pytest.approx((16 * 2 + 2) * n / link)
    assert device.timing.cpu_accumulate_s == 0 < host.timing.cpu_accumulate_s
    assert "on the device" in format_plan(device) and "once per step" in format_plan(device)


def test_auto_plans_where_the_trainer_accumulates():
    from astrobio.memory.accumulation import choose_accumulation
    for config in (one_h200("auto").config, replace(one_h200("auto").config, stages=2, hardware="a5000",
                                                    gpu_memory=24 * GIB)):
        chosen = choose_accumulation(plan(replace(config, grad_accum_location="host")), "auto").location
        assert plan(replace(config, grad_accum_location="auto")).config.grad_accum_location == chosen
    assert one_h200("auto").config.grad_accum_location == "device"  # 13B fits on an H200 with them


def test_the_cli_takes_the_accumulation_location(capsys):
    args = ["--model", "13b", "--stages", "1", "--hardware", "h200", "--host-memory", "128GiB",
            "--micro-batches", "16", "--master-weights", "bf16-sr", "--accum-dtype", "bf16", "--json"]
    assert plan_cli([*args, "--grad-accum-location", "device"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["config"]["grad_accum_location"] == "device"
    with pytest.raises(SystemExit):
        plan_cli([*args, "--grad-accum-location", "gpu"])
