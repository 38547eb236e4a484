"""Placing a run's ranks: GPUs of their own (NCCL) or shared (gloo through host memory), and
--gpu-memory-limit, which caps each process and which the memory preflight plans against. The GPU side
runs on a lent GPU (docs/TRAINING.md, "Two stages on one GPU"); these check the decisions on the CPU."""

from __future__ import annotations

import pytest
import torch

from astrobio.memory.units import parse_bytes
from astrobio.train import ConfigError, main, parse_config
from astrobio.train.devices import backend_for, gpu_memory_limit, process_gpu_budget, ranks_per_gpu
from astrobio.train.memory import plan_config

GIB = 2 ** 30


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_ranks_share_a_gpu_over_gloo_when_there_are_fewer_gpus_than_stages(monkeypatch):
    cuda = torch.device("cuda")
    for gpus, stages, backend, sharing in ((1, 2, "gloo", 2), (2, 2, "nccl", 1), (2, 4, "gloo", 2), (4, 2, "nccl", 1)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        assert backend_for(cuda, stages) == backend and ranks_per_gpu(stages) == sharing
    assert backend_for(torch.device("cpu"), 2) == "gloo"


def test_each_rank_plans_with_its_cap_or_its_share_of_the_gpu(one_gpu):
    config = parse_config(["--model", "13b", "--pipeline-stages", "2", "--gpu-memory-limit", "24GiB"])
    assert process_gpu_budget(config, 141 * GIB) == 24 * GIB
    uncapped = parse_config(["--model", "13b", "--pipeline-stages", "2"])
    assert process_gpu_budget(uncapped, 141 * GIB) == 141 * GIB // 2
    too_much = parse_config(["--model", "13b", "--pipeline-stages", "2", "--gpu-memory-limit", "80GiB"])
    with pytest.raises(ConfigError, match="--gpu-memory-limit 80GiB for each of 2 ranks"):
        process_gpu_budget(too_much, 141 * GIB)


def test_the_preflight_plans_against_the_cap(one_gpu, monkeypatch):
    monkeypatch.setattr("astrobio.train.memory.hardware_of", lambda device: ("h200", 141 * GIB))
    config = parse_config(["--model", "13b", "--pipeline-stages", "2", "--device", "cuda", "--gpu-memory-limit",
                           "24GiB", "--seq-len", "2048", "--micro-batch-size", "1"])
    assert plan_config(config, 32768, torch.device("cuda")).gpu_memory == parse_bytes("24GiB")


def test_a_bad_limit_names_the_flag():
    with pytest.raises(ConfigError, match="--gpu-memory-limit: cannot read 'lots'"):
        gpu_memory_limit(parse_config(["--gpu-memory-limit", "lots"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a run without a GPU")
def test_a_limit_on_the_cpu_is_refused_with_one_line(tmp_path, capsys):
    assert main(["--gpu-memory-limit", "24GiB", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu-memory-limit 24GiB caps a GPU" in err[0]
    assert not (tmp_path / "run").exists()
