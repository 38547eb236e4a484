"""Meta-device build + materialisation gives the same weights as building on the CPU and moving."""

from __future__ import annotations

import pytest
import torch

from astrobio.model import build_model, build_stage, get_config
from astrobio.model.materialize import build_model_on, build_stage_on, materialize


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    named_a, named_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(named_a) == list(named_b)
    for name, p in named_a.items():
        q = named_b[name]
        assert p.dtype == q.dtype and p.device == q.device and p.requires_grad == q.requires_grad, name
        assert torch.equal(p, q), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_materialised_model_equals_the_cpu_build(dtype, threads):
    config = get_config("tiny", vocab_size=259)
    built = build_model(config, seed=11, dtype=dtype)
    materialised = build_model_on(config, seed=11, dtype=dtype, threads=threads)
    assert_same_parameters(materialised, built)
    assert not any(p.is_meta for p in materialised.parameters())
    tokens = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(materialised(tokens), built(tokens))


def test_materialised_stages_equal_the_stage_build():
    config = get_config("tiny", vocab_size=259)
    for stage in range(2):
        assert_same_parameters(build_stage_on(config, stage, [1, 3], seed=4, dtype=torch.bfloat16),
                               build_stage(config, stage, [1, 3], seed=4, dtype=torch.bfloat16))


def test_another_seed_gives_other_weights():
    config = get_config("tiny", vocab_size=259)
    a, b = build_model_on(config, seed=1), build_model_on(config, seed=2)
    assert not torch.equal(a.layers[0].attn.wq.weight, b.layers[0].attn.wq.weight)


def test_bad_inputs_are_refused():
    config = get_config("tiny", vocab_size=259)
    with pytest.raises(ValueError, match="not meta"):
        materialize(build_model(config, device="meta"), config, 0, "meta", torch.float32)
    with pytest.raises(ValueError, match="already on cpu"):
        materialize(build_model(config), config, 0, "cpu", torch.float32)
