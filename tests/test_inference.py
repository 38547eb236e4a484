"""Sampling filters, seeded generation, and Hugging Face export equivalence."""

import json

import pytest
import torch

from astrobio.inference.export import export_weights, interleaved_to_halves
from astrobio.inference.sampling import SamplingConfig, filter_logits, generate_tokens
from astrobio.model import build_model, get_config


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_logits(logits, top_k=2, top_p=None)
    assert torch.isfinite(kept).nonzero()[:, 1].tolist() == [1, 3]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), top_k=None, top_p=0.75)
    assert torch.isfinite(kept).nonzero()[:, 1].tolist() == [0, 1]  # 0.5 < 0.75, 0.8 >= 0.75
    assert torch.isfinite(filter_logits(probs.log(), None, 0.01)).sum() == 1  # the top token always stays


def test_bad_sampling_settings_are_clear_errors():
    with pytest.raises(ValueError, match="top_p must lie in"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingConfig(temperature=-1)


def test_generation_is_deterministic_with_a_seed_and_greedy_matches_argmax():
    cfg = get_config("tiny")
    model = build_model(cfg, seed=0).eval()
    prompt = [256, 72, 105]
    sample = lambda seed: list(generate_tokens(model, prompt, SamplingConfig(20, 1.0, None, 0.9, seed)))  # noqa: E731
    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    greedy = list(generate_tokens(model, prompt, SamplingConfig(8, temperature=0.0)))
    ids = list(prompt)
    with torch.no_grad():  # independent: full forward each step, no cache
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(prompt):]


def test_interleaved_to_halves_permutes_rows_within_each_head():
    w = torch.arange(8.0).repeat_interleave(3).view(8, 3)  # 2 heads of 4 rows
    assert interleaved_to_halves(w, n_heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_hf_export_gives_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = get_config("tiny")
    model = build_model(cfg, seed=1).eval()
    written = export_weights(iter(model.state_dict().items()), cfg, str(tmp_path), fmt="hf",
                             dtype=torch.float32, shard_bytes=1 << 20)
    assert sum(f.endswith(".safetensors") for f in written) > 1  # sharded: streamed, not whole
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == len(model.state_dict())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-4, atol=1e-5)
