"""RebuiltLLMIntegration: parameter counts, deterministic initialisation, stages equal to the whole
model, activation checkpointing and the KV cache change nothing."""

import pytest
import torch

from astrobio.model import build_model, build_stage, compile_blocks, even_split, get_config, split_model, use_kernels


def test_13b_preset_counts_13_14b_on_meta_without_allocating():
    model = build_model(get_config("13b"), device="meta")
    n = model.num_parameters()
    assert abs(n - 13.14e9) / 13.14e9 < 0.005
    assert all(p.is_meta for p in model.parameters())
    c = get_config("13b")  # the 13B shape of docs/MEMORY.md, as an independent check
    per_layer = 4 * c.d_model ** 2 + 3 * c.d_model * c.ffn_hidden + 2 * c.d_model
    assert n == c.n_layers * per_layer + 2 * c.vocab_size * c.d_model + c.d_model


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'huge'; choose one of tiny, small, 13b"):
        get_config("huge")


def test_initialisation_is_deterministic_and_seeded():
    cfg = get_config("tiny")
    a, b, c = build_model(cfg, seed=1), build_model(cfg, seed=1), build_model(cfg, seed=2)
    for (name, x), y, z in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(x, y), name
        if "norm" not in name:
            assert not torch.equal(x, z), name


@pytest.mark.parametrize("split", [[2, 2], [1, 3], [1, 1, 2]])
def test_stages_equal_the_whole_model(split):
    cfg = get_config("tiny")
    model = build_model(cfg, seed=5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    expected = model(tokens)
    x = tokens
    for s in range(len(split)):  # built separately, as each pipeline rank does
        x = build_stage(cfg, s, split, seed=5)(x)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    x = tokens
    for stage in split_model(model, split):
        x = stage(x)
    assert torch.equal(x, expected)
    names = set()
    for s in range(len(split)):
        names |= set(build_stage(cfg, s, split, device="meta").state_dict())
    assert names == set(model.state_dict())


def test_even_split_and_bad_splits():
    assert even_split(56, 2) == [28, 28] and even_split(5, 2) == [3, 2]
    with pytest.raises(ValueError, match="cannot cut 4 layers into 5 stages"):
        even_split(4, 5)
    with pytest.raises(ValueError, match="summing to 4"):
        build_stage(get_config("tiny"), 0, [1, 2])


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = get_config("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    grads = []
    for ckpt in (False, True):
        model = build_model(cfg, seed=3)
        model.gradient_checkpointing = ckpt
        torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_kv_cache_decoding_matches_full_forward():
    cfg = get_config("tiny")
    model = build_model(cfg, seed=4).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        caches = [{} for _ in range(cfg.n_layers)]
        outs = [model(tokens[:, :5], kv_caches=caches)]
        for t in range(5, 12):
            outs.append(model(tokens[:, t:t + 1], kv_caches=caches, position_offset=t))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)


def test_prefix_embeddings_are_prepended():
    cfg = get_config("tiny")
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    prefix = torch.randn(1, 3, cfg.d_model, requires_grad=True)
    out = model(tokens, prefix=prefix)
    assert out.shape == (1, 11, cfg.vocab_size)
    out[:, -1].sum().backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0


def test_too_long_sequence_is_a_clear_error():
    cfg = get_config("tiny")
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        build_model(cfg)(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))


def test_loss_is_the_cross_entropy_of_the_logits():
    cfg = get_config("tiny")
    model = build_model(cfg, seed=6)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    targets = tokens[:, 1:].clone()
    targets[0, :4] = -100
    expected = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model.loss(tokens[:, :-1], targets), expected, rtol=1e-6, atol=1e-6)
    prefix = torch.randn(2, 3, cfg.d_model)
    logits = model(tokens[:, :-1], prefix=prefix)[:, 3:]
    torch.testing.assert_close(model.loss(tokens[:, :-1], targets, prefix=prefix),
                               torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    first, last = split_model(model, [2, 2])
    torch.testing.assert_close(last.loss(first(tokens[:, :-1]), targets), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="the loss is the last stage's"):
        first.loss(tokens[:, :-1], targets)


def test_fused_kernels_fall_back_to_eager_on_a_cpu_without_the_extension(monkeypatch, capsys):
    from astrobio import ops
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "has_cpu_kernel", lambda: False)
    model = build_model(get_config("tiny"))
    assert use_kernels(model, "fused") == "eager"
    assert not any(getattr(m, "fused", False) for m in model.modules())
    assert "fused kernels off" in capsys.readouterr().err
    assert use_kernels(model, "eager") == "eager"
    with pytest.raises(ValueError, match="kernels must be one of eager, fused"):
        use_kernels(model, "fast")


def _loss_and_grads(model, tokens):
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_give_the_eager_loss_and_gradients(checkpointing):
    cfg = get_config("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    eager, compiled = build_model(cfg, seed=8), build_model(cfg, seed=8)
    for model in (eager, compiled):
        model.gradient_checkpointing = checkpointing
    if not compile_blocks(compiled):
        pytest.skip("torch.compile is unsupported here")
    assert set(compiled.state_dict()) == set(eager.state_dict())
    for a, b in zip(_loss_and_grads(compiled, tokens), _loss_and_grads(eager, tokens)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_pipeline_stages_give_the_eager_loss():
    cfg = get_config("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    model = build_model(cfg, seed=9)
    expected = model.loss(tokens[:, :-1], tokens[:, 1:])
    stages = [build_stage(cfg, s, [2, 2], seed=9) for s in range(2)]
    if not all(compile_blocks(stage) for stage in stages):
        pytest.skip("torch.compile is unsupported here")
    loss = stages[1].loss(stages[0](tokens[:, :-1]), tokens[:, 1:])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype, checkpointing", [(torch.float32, False), (torch.float32, True),
                                                  (torch.bfloat16, False)])
def test_fused_projections_equal_the_separate_ones(dtype, checkpointing):
    """fuse_projections: one product for q, k, v and one for gate, up, equal to the separate products
    within fp32 rounding (rtol 1e-5) or bf16's (2e-2: bf16 products of different shapes accumulate in
    their own order); parameter names and state dicts unchanged."""
    from astrobio.model import fuse_projections
    cfg = get_config("tiny", vocab_size=300)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    results = []
    for fused in (False, True):
        model = build_model(cfg, seed=6, dtype=dtype)
        model.gradient_checkpointing = checkpointing
        fuse_projections(model, fused)
        assert all(m.fused_projections == fused for m in model.modules() if hasattr(m, "fused_projections"))
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((model, loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, loss_p, grads_p), (fused, loss_f, grads_f) = results
    assert list(fused.state_dict()) == list(plain.state_dict())
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (2e-2, 2e-2)
    torch.testing.assert_close(loss_f, loss_p, rtol=rtol, atol=atol)
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_f[name], g, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_fused_projections_with_the_kv_cache():
    """Generation with the KV cache: the fused projections give the logits of the full forward."""
    from astrobio.model import fuse_projections
    cfg = get_config("tiny", vocab_size=300)
    model = build_model(cfg, seed=7)
    fuse_projections(model)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(tokens)
        caches = [{} for _ in range(cfg.n_layers)]
        first = model(tokens[:, :8], kv_caches=caches)
        steps = [model(tokens[:, i:i + 1], kv_caches=caches, position_offset=i) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-4, atol=1e-5)
