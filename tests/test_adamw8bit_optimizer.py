"""AdamW8bit (the torch.optim.Optimizer) against an independent loop over the specification's functions.

The loop below keeps its own per-parameter moments and calls ``reference.adamw8bit_step`` directly; the
optimizer must match it bit for bit with the ``reference`` backend. The C++ kernel computes the same
arithmetic, but a SIMD path may round a division or a sqrt differently in the last bit, which can move a
moment across a code threshold: its budget is at most 0.1% of codes one code apart and weights within
1e-6 relative (fp32) or one bf16 ulp (bf16).
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from astrobio import ops
from astrobio.optim import AdamW8bit, step_seed
from astrobio.optim.adamw8bit import device_non_finite_flag
from astrobio.spec import adamw8bit as reference

BACKENDS = [b for b in ("cpu", "reference") if b in ops.available_backends("cpu")]
SIZES = (1, 255, 256, 257, 4095, 4097, 20_011)
CODE_BUDGET = 1e-3


def make_params(sizes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in sizes]


def make_grads(sizes, steps, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 2, (1,), generator=g)).to(dtype)
             for n in sizes] for _ in range(steps)]


class ReferenceLoop:
    """The specification stepped by hand: one moment state per tensor, one reference call per step."""

    def __init__(self, tensors, hyper, seed=0, min_8bit=reference.MIN_8BIT_NUMEL):
        self.params = [t.detach().clone() for t in tensors]
        self.hyper = hyper  # per tensor: dict(lr, betas, eps, weight_decay)
        self.seed, self.step_count = seed, 0
        self.qmap1, self.qmap2 = reference.dynamic_map(True), reference.dynamic_map(False)
        self.state = []
        for p in self.params:
            quantized = p.numel() >= min_8bit
            dtype = torch.uint8 if quantized else torch.float32
            blocks = reference.num_blocks(p.numel()) if quantized else 0
            self.state.append([torch.zeros(p.shape, dtype=dtype), torch.zeros(p.shape, dtype=dtype),
                               torch.zeros(blocks), torch.zeros(blocks)])

    def step(self, grads, lrs=None, grad_scale=1.0):
        self.step_count += 1
        for i, (p, g, s, h) in enumerate(zip(self.params, grads, self.state, self.hyper)):
            lr = h["lr"] if lrs is None else lrs[i]
            reference.adamw8bit_step(p, g, *s, self.qmap1, self.qmap2, None, None, lr, h["betas"][0],
                                     h["betas"][1], h["eps"], h["weight_decay"], grad_scale, self.step_count,
                                     step_seed(self.seed, self.step_count, i))


def hyper(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def run_optimizer(opt, params, grads, scheduler=None):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_close_to_loop(opt, params, loop, backend):
    for i, (p, q) in enumerate(zip(params, loop.params)):
        state, (m, v, a1, a2) = opt.state[p], loop.state[i]
        if backend == "reference":
            assert torch.equal(p.detach(), q), f"parameter {i}"
            assert torch.equal(state["exp_avg"], m) and torch.equal(state["exp_avg_sq"], v), f"moments {i}"
            if m.dtype == torch.uint8:
                assert torch.equal(state["absmax1"], a1) and torch.equal(state["absmax2"], a2)
            continue
        if m.dtype == torch.uint8:
            for got, want in ((state["exp_avg"], m), (state["exp_avg_sq"], v)):
                diff = (got.int() - want.int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() <= CODE_BUDGET, f"codes of parameter {i}"
        if p.dtype == torch.bfloat16:
            ulp = q.float().abs() * 2.0 ** -7 + 1e-30
            assert ((p.detach().float() - q.float()).abs() <= ulp).all(), f"parameter {i}"
        else:
            torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_loop(backend, dtype):
    params = make_params(SIZES, dtype)
    grads = make_grads(SIZES, 40, dtype)
    loop = ReferenceLoop(params, [hyper()] * len(params), seed=7)
    opt = AdamW8bit(params, lr=1e-2, backend=backend, seed=7)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        loop.step(step_grads)
    assert_close_to_loop(opt, params, loop, backend)
    assert all(opt.state[p]["step"] == 40 for p in params)
    assert all(p.dtype == dtype for p in params)
    quantized = [opt.state[p]["exp_avg"].dtype == torch.uint8 for p in params]
    assert quantized == [n >= reference.MIN_8BIT_NUMEL for n in SIZES]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension astrobio._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensor_on_cpu_against_loop(dtype):
    sizes = (1_000_003,)
    params = make_params(sizes, dtype)
    loop = ReferenceLoop(params, [hyper()], seed=11)
    opt = AdamW8bit(params, lr=1e-2, backend="cpu", seed=11)
    for step_grads in make_grads(sizes, 3, dtype):
        params[0].grad = step_grads[0].clone()
        opt.step()
        loop.step(step_grads)
    assert_close_to_loop(opt, params, loop, "cpu")


@settings(max_examples=12, deadline=None)
@given(size=st.integers(1, 9000), lr=st.floats(1e-5, 1e-1), beta1=st.floats(0.0, 0.99),
       beta2=st.floats(0.5, 0.9999), weight_decay=st.floats(0.0, 0.3), scale=st.sampled_from([0.25, 1.0, 3.0]))
def test_property_cpu_against_loop(size, lr, beta1, beta2, weight_decay, scale):
    backend = BACKENDS[0]
    h = hyper(lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    params = make_params([size], torch.float32, seed=size)
    loop = ReferenceLoop(params, [h])
    opt = AdamW8bit(params, backend=backend, **h)
    for step_grads in make_grads([size], 6, seed=size + 1):
        params[0].grad = step_grads[0].clone()
        opt.step(grad_scale=scale)
        loop.step(step_grads, grad_scale=scale)
    assert_close_to_loop(opt, params, loop, backend)


def test_grad_scale_is_applied_in_kernel():
    sizes = (300, 5000)
    grads = make_grads(sizes, 5)
    scaled = make_params(sizes, torch.float32)
    plain = make_params(sizes, torch.float32)
    opt_scaled, opt_plain = AdamW8bit(scaled), AdamW8bit(plain)
    for step_grads in grads:
        for p, q, g in zip(scaled, plain, step_grads):
            p.grad, q.grad = g * 2.0, g.clone()
        opt_scaled.step(grad_scale=0.5)  # a power of two: g * 2 * 0.5 == g exactly
        opt_plain.step()
    assert all(torch.equal(p, q) for p, q in zip(scaled, plain))


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_use_their_own_hyperparameters(backend):
    sizes = (5000, 300, 4100)
    params = make_params(sizes, torch.float32)
    h_a = hyper(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)
    h_b = hyper(lr=1e-3, betas=(0.95, 0.9995), eps=1e-8, weight_decay=0.1)
    opt = AdamW8bit([{"params": params[:2], **h_a}, {"params": params[2:], **h_b}], backend=backend)
    loop = ReferenceLoop(params, [h_a, h_a, h_b])
    grads = make_grads(sizes, 12)
    run_optimizer(opt, params, grads)
    for step_grads in grads:
        loop.step(step_grads)
    assert_close_to_loop(opt, params, loop, backend)


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * 0.9 ** s),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4),
], ids=["lambda", "cosine"])
def test_lr_scheduler_drives_lr_like_torch_adamw(make_scheduler):
    sizes = (5000, 100)
    params = make_params(sizes, torch.float32)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = AdamW8bit([{"params": params[:1]}, {"params": params[1:], "lr": 5e-3}], lr=2e-2)
    torch_opt = torch.optim.AdamW([{"params": twin[:1]}, {"params": twin[1:], "lr": 5e-3}], lr=2e-2)
    sched, torch_sched = make_scheduler(opt), make_scheduler(torch_opt)
    loop = ReferenceLoop(params, [hyper(lr=2e-2), hyper(lr=5e-3)])
    for step_grads in make_grads(sizes, 12):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == [g["lr"] for g in torch_opt.param_groups]
        for p, q, g in zip(params, twin, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        loop.step(step_grads, lrs=lrs)
        sched.step()
        torch_sched.step()
    assert_close_to_loop(opt, params, loop, BACKENDS[0])


def save_and_reload(opt, params, backend):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = AdamW8bit(params, lr=opt.defaults["lr"], backend=backend, seed=opt.seed)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_every_10_steps(dtype):
    sizes = (257, 4097, 9000)
    grads = make_grads(sizes, 30, dtype)
    straight, resumed = make_params(sizes, dtype), make_params(sizes, dtype)
    opt_a = AdamW8bit(straight, lr=1e-2, seed=3)
    opt_b = AdamW8bit(resumed, lr=1e-2, seed=3)
    for chunk in range(3):
        run_optimizer(opt_a, straight, grads[10 * chunk:10 * chunk + 10])
        run_optimizer(opt_b, resumed, grads[10 * chunk:10 * chunk + 10])
        before = opt_b.state_dict()
        opt_b = save_and_reload(opt_b, resumed, BACKENDS[0])
        after = opt_b.state_dict()
        for i, entry in before["state"].items():
            for key, value in entry.items():
                reloaded = after["state"][i][key]
                assert (value == reloaded) if key == "step" else torch.equal(value, reloaded)
    assert all(torch.equal(p, q) for p, q in zip(straight, resumed))
    for p, q in zip(straight, resumed):
        for key in opt_a.state[p]:
            a, b = opt_a.state[p][key], opt_b.state[q][key]
            assert (a == b) if key == "step" else torch.equal(a, b)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension astrobio._C is not built")
def test_state_saved_from_reference_continues_on_cpu():
    sizes = (300, 4097, 20_000)
    grads = make_grads(sizes, 16)
    params_ref, params_cpu = make_params(sizes, torch.float32), make_params(sizes, torch.float32)
    opt_ref = AdamW8bit(params_ref, lr=1e-2, backend="reference")
    run_optimizer(opt_ref, params_ref, grads[:8])
    for p, q in zip(params_cpu, params_ref):
        p.data.copy_(q)
    opt_cpu = AdamW8bit(params_cpu, lr=1e-2, backend="cpu")
    opt_cpu.load_state_dict(opt_ref.state_dict())
    run_optimizer(opt_ref, params_ref, grads[8:])
    run_optimizer(opt_cpu, params_cpu, grads[8:])
    loop = ReferenceLoop(make_params(sizes, torch.float32), [hyper()] * 3)
    for step_grads in grads:
        loop.step(step_grads)
    assert_close_to_loop(opt_ref, params_ref, loop, "reference")
    assert_close_to_loop(opt_cpu, params_cpu, loop, "cpu")


def snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in params}


def assert_unchanged(opt, params, snap):
    weights, state = snap
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    for p in params:
        for key, value in state[id(p)].items():
            assert (opt.state[p][key] == value) if key == "step" else torch.equal(opt.state[p][key], value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_gradient_skips_the_whole_step(backend, bad):
    sizes = (5000, 100)
    params = make_params(sizes, torch.float32)
    opt = AdamW8bit(params, backend=backend)
    run_optimizer(opt, params, make_grads(sizes, 2))
    snap = snapshot(opt, params)
    grads = make_grads(sizes, 1, seed=9)[0]
    grads[1][17] = bad  # only the second tensor is bad: the first must not move either
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert opt.skipped_steps == 1 and opt.state_dict()["skipped_steps"] == 1
    assert_unchanged(opt, params, snap)
    grads[1][17] = 0.0
    opt.step()
    assert all(opt.state[p]["step"] == 3 for p in params)
    assert not torch.equal(params[0], snap[0][0])


def test_found_inf_is_trusted_instead_of_a_scan():
    sizes = (5000,)
    params = make_params(sizes, torch.float32)
    opt = AdamW8bit(params)
    params[0].grad = make_grads(sizes, 1)[0][0]
    snap = snapshot(opt, params)
    opt.step(found_inf=torch.ones(1))
    assert opt.skipped_steps == 1 and not opt.state[params[0]]
    assert torch.equal(params[0], snap[0][0])
    opt.step(found_inf=torch.zeros(1))
    assert opt.skipped_steps == 1 and opt.state[params[0]]["step"] == 1
    restored = AdamW8bit(params)
    restored.load_state_dict(opt.state_dict())
    assert restored.skipped_steps == 1


def test_found_inf_false_is_trusted_even_over_a_nan():
    """Nothing is scanned when the caller says: a NaN gradient then reaches the kernel (and the weight)."""
    params = make_params((5000,), torch.float32)
    opt = AdamW8bit(params)
    params[0].grad = make_grads((5000,), 1)[0][0]
    params[0].grad[3] = float("nan")
    opt.step(found_inf=False)
    assert opt.skipped_steps == 0 and opt.state[params[0]]["step"] == 1
    assert bool(torch.isnan(params[0][3])) and bool(torch.isfinite(params[0][4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scan_finds_one_bad_element_anywhere(dtype, bad):
    """ops.any_non_finite (the native pass) against torch.isfinite, with the bad element at chunk edges,
    in the last of many tensors, and in tensors too small to split."""
    sizes = [1, 7, 65_535, 65_536, 65_537, 300_001]
    tensors = [torch.randn(n).to(dtype) * 1e30 for n in sizes]  # large but finite (bf16 tops out at 3.4e38)
    assert not ops.any_non_finite(tensors)
    assert not ops.any_non_finite([])
    for t in range(len(tensors)):
        for i in {0, tensors[t].numel() // 2, tensors[t].numel() - 1, min(65_536, tensors[t].numel() - 1)}:
            tensors[t][i] = bad
            assert ops.any_non_finite(tensors) == (not all(bool(torch.isfinite(x).all()) for x in tensors))
            assert ops.any_non_finite(tensors)
            tensors[t][i] = 1.0


@pytest.mark.skipif(not ops.has_cpu_kernel(), reason="needs astrobio._C")
def test_non_finite_scan_refuses_what_it_cannot_read():
    from astrobio import _C

    with pytest.raises(RuntimeError, match="tensor 1 must be contiguous"):
        _C.any_non_finite([torch.zeros(4), torch.zeros(8)[::2]])
    with pytest.raises(RuntimeError, match="tensor 0 is torch.float16"):
        _C.any_non_finite([torch.zeros(4, dtype=torch.float16)])


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_device_flag_is_one_exactly_when_a_gradient_is_not_finite(bad):
    """The flag GPU steps compute without a synchronization (run here on CPU tensors: the same torch ops)."""
    grads = [torch.randn(1000), torch.randn(10).bfloat16() * 1e30, torch.randn(70_000)]
    if bad is not None:
        grads[2][69_999] = bad
    flag = device_non_finite_flag(grads)
    assert flag.shape == (1,) and flag.dtype == torch.float32
    assert float(flag) == (0.0 if bad is None else 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("bad", [False, True])
def test_gpu_step_never_synchronizes_and_skips_on_the_device(backend, bad):
    if backend not in ops.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available")
    sizes = (5000, 100)
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(sizes, torch.float32)]
    opt = AdamW8bit(params, backend=backend)
    for p, g in zip(params, make_grads(sizes, 1)[0]):
        p.grad = g.cuda()
    opt.step()  # the first step builds state and maps (allocations, host-to-device copies)
    if bad:
        params[1].grad[17] = float("nan")
    before = [p.detach().clone() for p in params]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_steps == int(bad)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) == bad


def test_bf16_params_stay_bf16_and_track_fp32():
    sizes = (5000, 300)
    grads = make_grads(sizes, 30)
    p32, p16 = make_params(sizes, torch.float32), make_params(sizes, torch.bfloat16)
    opt32, opt16 = AdamW8bit(p32, lr=1e-2), AdamW8bit(p16, lr=1e-2)
    run_optimizer(opt32, p32, grads)
    run_optimizer(opt16, p16, [[g.bfloat16() for g in step] for step in grads])
    for a, b in zip(p32, p16):
        assert b.dtype == torch.bfloat16
        assert (a.detach() - b.detach().float()).abs().mean() < 0.05 * a.detach().abs().mean()


def test_bf16_stochastic_rounding_is_deterministic_per_seed():
    sizes = (5000,)
    grads = make_grads(sizes, 5, torch.bfloat16)
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        params = make_params(sizes, torch.bfloat16)
        run_optimizer(AdamW8bit(params, lr=1e-3, seed=seed), params, grads)
        runs[name] = params[0].detach()
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.equal(runs["a"], runs["c"])
    assert len({step_seed(0, s, i) for s in range(1, 50) for i in range(20)}) == 49 * 20


def test_closure_returns_loss():
    w = torch.nn.Parameter(torch.ones(3))
    opt = AdamW8bit([w])

    def closure():
        opt.zero_grad()
        loss = (w * 2).sum()
        loss.backward()
        return loss.detach()

    assert float(opt.step(closure)) == 6.0 and opt.state[w]["step"] == 1


@pytest.mark.parametrize("make, error, match", [
    (lambda: AdamW8bit([torch.nn.Parameter(torch.ones(4, dtype=torch.float16))]), TypeError, "float16"),
    (lambda: AdamW8bit([torch.nn.Parameter(torch.ones(4, 6).t())]), ValueError, "contiguous"),
    (lambda: AdamW8bit([torch.nn.Parameter(torch.ones(4))], lr=-1.0), ValueError, "lr"),
    (lambda: AdamW8bit([torch.nn.Parameter(torch.ones(4))], lr=float("nan")), ValueError, "lr"),
    (lambda: AdamW8bit([torch.nn.Parameter(torch.ones(4))], lr=float("inf")), ValueError, "lr"),
    (lambda: AdamW8bit([torch.nn.Parameter(torch.ones(4))], betas=(0.9, 1.0)), ValueError, "betas"),
    (lambda: AdamW8bit([torch.nn.Parameter(torch.ones(4))], eps=0.0), ValueError, "eps"),
    (lambda: AdamW8bit([torch.nn.Parameter(torch.ones(4))], weight_decay=-0.1), ValueError, "weight_decay"),
    (lambda: AdamW8bit([torch.nn.Parameter(torch.ones(4))], weight_decay=float("inf")), ValueError, "weight_decay"),
    (lambda: AdamW8bit([torch.nn.Parameter(torch.ones(4))], backend="bogus"), ValueError, "bogus"),
    (lambda: AdamW8bit([torch.nn.Parameter(torch.ones(4))], backend="cuda"), RuntimeError, "cuda"),
], ids=["fp16", "non-contiguous", "lr", "lr-nan", "lr-inf", "betas", "eps", "weight-decay", "weight-decay-inf",
        "backend", "backend-device"])
def test_bad_construction_raises(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("grad, error, match", [
    (lambda: torch.ones(8, 8).to_sparse(), RuntimeError, "sparse"),
    (lambda: torch.ones(8, 8, dtype=torch.float16), TypeError, "float16"),
    (lambda: torch.arange(64.0).view(8, 8).t(), ValueError, "contiguous"),
], ids=["sparse", "fp16", "non-contiguous"])
def test_bad_gradient_raises(grad, error, match):
    w = torch.nn.Parameter(torch.ones(8, 8))
    opt = AdamW8bit([w])
    w.grad_dtype = None  # let a gradient of another dtype through to the optimizer's own check
    w.grad = grad()
    with pytest.raises(error, match=match):
        opt.step()


def test_a_non_finite_lr_set_after_construction_raises_before_any_update():
    params = make_params((5000, 10), torch.float32)
    opt = AdamW8bit([{"params": params[:1]}, {"params": params[1:]}])
    run_optimizer(opt, params, make_grads((5000, 10), 1))
    snap = snapshot(opt, params)
    opt.param_groups[1]["lr"] = float("nan")  # the second group: the first would be stepped before it
    with pytest.raises(ValueError, match="lr must be a finite number"):
        run_optimizer(opt, params, make_grads((5000, 10), 1, seed=2))
    assert_unchanged(opt, params, snap)


def corrupted(saved, how):
    saved["state"] = {k: dict(v) for k, v in saved["state"].items()}
    entry = saved["state"][0]
    if how == "shape":
        entry["exp_avg"] = entry["exp_avg"][:-1]
    elif how == "dtype":
        entry["absmax1"] = entry["absmax1"].bfloat16()
    elif how == "missing":
        del entry["exp_avg_sq"]
    elif how == "groups":
        saved["param_groups"] = saved["param_groups"] + saved["param_groups"]
    elif how == "unknown-id":
        saved["state"][99] = entry
    return saved


@pytest.mark.parametrize("how", ["shape", "dtype", "missing", "groups", "unknown-id"])
def test_wrong_state_dict_raises_and_changes_nothing(how):
    params = make_params((5000, 10), torch.float32)
    opt = AdamW8bit(params)
    run_optimizer(opt, params, make_grads((5000, 10), 2))
    snap = snapshot(opt, params)
    with pytest.raises(ValueError):
        opt.load_state_dict(corrupted(opt.state_dict(), how))
    assert_unchanged(opt, params, snap)


def test_state_dict_for_another_model_raises():
    params = make_params((5000,), torch.float32)
    opt = AdamW8bit(params)
    run_optimizer(opt, params, make_grads((5000,), 1))
    other = AdamW8bit(make_params((6000,), torch.float32))
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(opt.state_dict())


def train_mlp(make_optimizer, steps=60):
    """(loss before training, loss after) of a 2-layer MLP regression (its first layer is 8-bit)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 512), torch.nn.GELU(), torch.nn.Linear(512, 1))
    x = torch.randn(256, 16)
    y = torch.sin(x[:, :4].sum(dim=1, keepdim=True)) + 0.1 * x[:, 4:5]
    opt = make_optimizer(model.parameters())
    initial = torch.nn.functional.mse_loss(model(x), y).item()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return initial, torch.nn.functional.mse_loss(model(x), y).item()


def test_convergence_within_5_percent_of_torch_adamw():
    hyperparameters = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    initial, final_8bit = train_mlp(lambda p: AdamW8bit(p, **hyperparameters))
    _, final_torch = train_mlp(lambda p: torch.optim.AdamW(p, **hyperparameters))
    assert final_torch < 0.5 * initial  # the run really trains
    assert abs(final_8bit - final_torch) <= 0.05 * final_torch, (final_8bit, final_torch)
