"""The C++ CPU kernel of ``astrobio::adamw8bit_step`` against the specification (astrobio/spec/adamw8bit.py).

Every SIMD path this CPU can run (forced with ASTROBIO_CPU_SIMD) is compared with the reference, through
``torch.ops.astrobio.adamw8bit_step`` and through ``astrobio._C.adamw8bit_step_nogil``. Budget: none. The
kernel is bit-exact (same fp32 operations in the same order, IEEE sqrt and division, no FMA, an exact
nearest-code search), so codes, absmax, weights, moments and the bf16 copy must be identical.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from astrobio import ops
from astrobio.spec import adamw8bit as R

pytestmark = pytest.mark.skipif(not ops.has_cpu_kernel(), reason=f"astrobio._C not built: {ops.extension_error()}")

if ops.has_cpu_kernel():
    from astrobio import _C

    PATHS = list(_C.cpu_simd_paths())
else:
    PATHS = []

SIGNED, UNSIGNED = R.dynamic_map(True), R.dynamic_map(False)
SIZES = [1, 255, 256, 257, 4095, 4097, 1_000_003]
# (grad dtype, master dtype, bf16 copy of the weights)
VARIANTS = [
    (torch.float32, torch.float32, True),
    (torch.bfloat16, torch.float32, False),
    (torch.bfloat16, torch.bfloat16, True),
    (torch.float32, torch.bfloat16, False),
]


def make_state(n: int, master: torch.dtype, quantized: bool, copy: bool, seed: int) -> dict:
    """Random weights and moments (so dequantization matters from the first step); block 1 starts at zero."""
    gen = torch.Generator().manual_seed(seed)
    blocks = R.num_blocks(n)
    state = {"param": torch.randn(n, generator=gen).to(master),
             "param_bf16": torch.empty(n, dtype=torch.bfloat16) if copy else None}
    if quantized:
        state["exp_avg"] = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
        state["exp_avg_sq"] = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
        state["absmax1"] = torch.rand(blocks, generator=gen) * 1e-2
        state["absmax2"] = torch.rand(blocks, generator=gen) * 1e-4
        if blocks > 2:  # an all-zero block: absmax stays 0 (the inv = 0 branch)
            zero_code = int((SIGNED == 0).nonzero()[0])
            state["exp_avg"][256:512] = zero_code
            state["exp_avg_sq"][256:512] = 0
            state["absmax1"][1] = 0.0
            state["absmax2"][1] = 0.0
    else:
        state["exp_avg"] = torch.randn(n, generator=gen) * 1e-3
        state["exp_avg_sq"] = torch.rand(n, generator=gen) * 1e-6
        state["absmax1"] = torch.zeros(0)
        state["absmax2"] = torch.zeros(0)
    return state


def make_grad(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Gradients over ~7 decades (the whole range of the dynamic maps), a few exact zeros, block 1 zero."""
    g = torch.randn(n, generator=gen) * torch.pow(10.0, torch.empty(n).uniform_(-7, 1, generator=gen))
    g[torch.rand(n, generator=gen) < 0.01] = 0.0
    if n > 512:
        g[256:512] = 0.0
    return g.to(dtype)


def clone_state(state: dict) -> dict:
    return {k: None if v is None else v.clone() for k, v in state.items()}


def step_args(s: dict, grad: torch.Tensor, step: int, qmap1=SIGNED, qmap2=UNSIGNED, found_inf=None, **hyper):
    h = dict(lr=1e-3 * (1 + step % 3), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, grad_scale=0.5)
    h.update(hyper)
    return (s["param"], grad, s["exp_avg"], s["exp_avg_sq"], s["absmax1"], s["absmax2"], qmap1, qmap2,
            s["param_bf16"], found_inf, h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"],
            h["grad_scale"], step, 1000 + 7 * step)


def assert_same_state(got: dict, want: dict, context: str) -> None:
    for key, w in want.items():
        if w is None:
            continue
        g = got[key]
        if w.is_floating_point():  # bit patterns: NaN payloads and signed zeros count too
            bits = {2: torch.int16, 4: torch.int32}[w.element_size()]
            g, w = g.view(bits), w.view(bits)
        differ = int((g != w).sum())
        assert differ == 0, f"{context}: {key} differs from the reference in {differ} of {w.numel()} elements"


def run_trajectory(n, master, copy, quantized, grads, step_fn) -> dict:
    """Steps with grad_scale 0.5 and 1 in turn (the AVX-512 path skips the multiplication by 1)."""
    state = make_state(n, master, quantized, copy, seed=n)
    for t, grad in enumerate(grads, start=1):
        step_fn(*step_args(state, grad, t, grad_scale=0.5 if t % 2 else 1.0))
    return state


def nogil_step(*args):
    _C.adamw8bit_step_nogil(*args)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype,master,copy", VARIANTS)
def test_every_path_matches_reference(n, grad_dtype, master, copy, monkeypatch):
    steps = 50 if n < 100_000 else 3
    gen = torch.Generator().manual_seed(n + 1)
    grads = [make_grad(n, grad_dtype, gen) for _ in range(steps)]
    moment_kinds = [True, False] if n < R.MIN_8BIT_NUMEL else [True]
    for quantized in moment_kinds:
        want = run_trajectory(n, master, copy, quantized, grads, R.adamw8bit_step)
        for path in PATHS:
            monkeypatch.setenv("ASTROBIO_CPU_SIMD", path)
            assert _C.simd_path() == path
            got = run_trajectory(n, master, copy, quantized, grads, torch.ops.astrobio.adamw8bit_step)
            assert_same_state(got, want, f"path {path}, n={n}, 8-bit={quantized}, torch.ops")
        got = run_trajectory(n, master, copy, quantized, grads, nogil_step)
        assert_same_state(got, want, f"default path, n={n}, 8-bit={quantized}, adamw8bit_step_nogil")


def test_round_to_bf16_is_torch_rounding_with_one_nan():
    """The specification's bf16 copy: torch's round-to-nearest-even on every non-NaN float (normals,
    subnormals, ties, overflow to inf), and one canonical NaN where torch itself gives 0x7FC0 for a 0-d
    tensor but 0xFFFF for a vector."""
    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(-2 ** 31, 2 ** 31, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    ties = (torch.arange(1000, dtype=torch.int32) << 16) | 0x8000  # exactly halfway, even and odd
    specials = torch.tensor([math.inf, -math.inf, 3.4e38, -3.4e38, 0.0, -0.0, 1e-45, float("nan")])
    x = torch.cat([bits.view(torch.float32), ties.view(torch.float32), specials])
    got = R.round_to_bf16(x).view(torch.int16)
    finite = ~torch.isnan(x)
    assert torch.equal(got[finite], x[finite].to(torch.bfloat16).view(torch.int16))
    assert int(torch.isnan(x).sum()) > 500
    assert bool((got[~finite] == R.BF16_CANONICAL_NAN).all())


def test_subnormal_absmax_gives_the_zero_code_in_every_path(monkeypatch):
    """A block whose new absmax is below the smallest normal float (1 / absmax would be inf, and 0 * inf
    NaN) gets inverse 0: every code is the zero code, in the specification and in every CPU path."""
    n = 1024
    state = make_state(n, torch.float32, True, False, seed=5)
    state["absmax1"][2] = state["absmax2"][2] = 1e-40
    grad = make_grad(n, torch.float32, torch.Generator().manual_seed(6))
    grad[512:768] = 0.0
    want = clone_state(state)
    R.adamw8bit_step(*step_args(want, grad, 3))
    assert 0.0 < float(want["absmax2"][2]) < R.MIN_NORMAL and 0.0 < float(want["absmax1"][2]) < R.MIN_NORMAL
    zero1, zero2 = int((SIGNED == 0).nonzero()[0]), int((UNSIGNED == 0).nonzero()[0])
    assert bool((want["exp_avg"][512:768] == zero1).all()) and bool((want["exp_avg_sq"][512:768] == zero2).all())
    for path in PATHS:
        monkeypatch.setenv("ASTROBIO_CPU_SIMD", path)
        got = clone_state(state)
        torch.ops.astrobio.adamw8bit_step(*step_args(got, grad, 3))
        assert_same_state(got, want, f"path {path}, subnormal absmax")


NAN_PATTERNS = [0x7FC00000, 0xFFC00000, 0x7FC12345, 0xFFC12345, 0xFFFFFFFF, 0x7F800001]  # signs, payloads, sNaN


@pytest.mark.parametrize("n", [1000, 5000])
@pytest.mark.parametrize("grad_dtype,master,copy", VARIANTS)
@pytest.mark.parametrize("grad_scale", [0.5, 1.0])
def test_nan_gives_the_canonical_nan_in_every_path(n, grad_dtype, master, copy, grad_scale, monkeypatch):
    """NaN weights of every sign and payload, and a NaN and an infinite gradient (the op does not skip;
    the optimizer would): every path writes what the specification writes, bit for bit, and every NaN
    output is the canonical one (0x7FC00000 in fp32, 0x7FC0 in bf16)."""
    gen = torch.Generator().manual_seed(9)
    grads = [make_grad(n, grad_dtype, gen) for _ in range(3)]
    grads[1][5], grads[1][511], grads[1][600] = math.nan, math.nan, -math.inf  # first and last lanes of blocks
    for quantized in [True, False]:
        state = make_state(n, torch.float32, quantized, copy, seed=4)
        nan_bits = torch.tensor([p - 2 ** 32 if p >= 2 ** 31 else p for p in NAN_PATTERNS], dtype=torch.int32)
        state["param"][::37][: len(NAN_PATTERNS)] = nan_bits.view(torch.float32)
        state["param"] = state["param"].to(master)
        want = clone_state(state)
        for t, grad in enumerate(grads, start=1):
            R.adamw8bit_step(*step_args(want, grad, t, grad_scale=grad_scale))
        for key, value in want.items():
            if value is not None and value.is_floating_point() and value.numel():
                bits = value.view({2: torch.int16, 4: torch.int32}[value.element_size()])[torch.isnan(value)]
                canonical = R.CANONICAL_NAN if value.element_size() == 4 else R.BF16_CANONICAL_NAN
                assert bool((bits == canonical).all()), f"the specification's {key} holds another NaN"
        assert int(torch.isnan(want["param"].float()).sum()) > len(NAN_PATTERNS)
        for path in PATHS:
            monkeypatch.setenv("ASTROBIO_CPU_SIMD", path)
            got = clone_state(state)
            for t, grad in enumerate(grads, start=1):
                torch.ops.astrobio.adamw8bit_step(*step_args(got, grad, t, grad_scale=grad_scale))
            assert_same_state(got, want, f"path {path}, NaN weights and gradients, 8-bit={quantized}, "
                                         f"grad_scale={grad_scale}")


def neighbours(values: torch.Tensor) -> torch.Tensor:
    """Each value and the floats one ulp below and above it."""
    up = torch.nextafter(values, torch.full_like(values, math.inf))
    down = torch.nextafter(values, torch.full_like(values, -math.inf))
    return torch.cat([down, values, up])


@pytest.mark.parametrize("qmap_name", ["signed", "unsigned", "linear", "dense_near_zero"])
def test_nearest_code_at_every_threshold(qmap_name, monkeypatch):
    """Normalised values exactly at each threshold and one ulp either side, through the whole op: with
    beta1 = 0, grad_scale = 1 the new m equals the gradient, and a 1.0 in every block makes absmax 1."""
    qmaps = {
        "signed": SIGNED,
        "unsigned": UNSIGNED,
        "linear": torch.linspace(-0.99, 1, 256),
        # thresholds too close together for the bucket table: the kernel falls back to a binary search
        "dense_near_zero": torch.cat([torch.linspace(-1, -1e-3, 127), torch.tensor([0.0]),
                                      torch.linspace(1e-30, 2e-30, 64), torch.linspace(1e-3, 1, 64)]),
    }
    qmap = qmaps[qmap_name]
    values = neighbours(R.thresholds(qmap))
    values = torch.cat([values, -values, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-38, -1e-38])])
    values = values[values.abs() <= 1.0]
    blocks = math.ceil(values.numel() / (R.BLOCK_SIZE - 1))
    grad = torch.zeros(blocks * R.BLOCK_SIZE)
    body = grad.view(blocks, R.BLOCK_SIZE)
    body[:, 0] = 1.0
    body[:, 1:].reshape(-1)[: values.numel()] = values
    n = grad.numel()
    for path in PATHS:
        monkeypatch.setenv("ASTROBIO_CPU_SIMD", path)
        results = []
        for step_fn in (R.adamw8bit_step, torch.ops.astrobio.adamw8bit_step):
            s = make_state(n, torch.float32, True, False, seed=3)
            step_fn(*step_args(s, grad, 1, qmap1=qmap, qmap2=UNSIGNED, beta1=0.0, grad_scale=1.0))
            results.append(s)
        assert_same_state(results[1], results[0], f"path {path}, map {qmap_name}")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 3000),
    quantized=st.booleans(),
    master_bf16=st.booleans(),
    grad_bf16=st.booleans(),
    copy=st.booleans(),
    lr=st.floats(0.0, 0.1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.0, 0.9999),
    eps=st.floats(1e-12, 1e-3),
    weight_decay=st.floats(0.0, 0.5),
    grad_scale=st.floats(-4.0, 4.0),
    step=st.integers(1, 100_000),
    seed=st.integers(0, 2**63 - 1),
)
# found by hypothesis: beta2 = FLT_MIN makes v subnormal, and 1 / absmax overflowed to inf (now: inverse 0)
@example(n=6, quantized=True, master_bf16=False, grad_bf16=False, copy=False, lr=0.0, beta1=0.0,
         beta2=1.175494351e-38, eps=1e-3, weight_decay=0.0, grad_scale=0.0, step=1, seed=0)
def test_property_matches_reference(n, quantized, master_bf16, grad_bf16, copy, lr, beta1, beta2, eps,
                                    weight_decay, grad_scale, step, seed, monkeypatch):
    master = torch.bfloat16 if master_bf16 else torch.float32
    gen = torch.Generator().manual_seed(seed % 2**31)
    grad = make_grad(n, torch.bfloat16 if grad_bf16 else torch.float32, gen)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale)
    want = make_state(n, master, quantized, copy, seed=n)
    args = list(step_args(want, grad, step, **hyper))
    args[-1] = seed
    R.adamw8bit_step(*args)
    for path in PATHS:
        monkeypatch.setenv("ASTROBIO_CPU_SIMD", path)
        got = make_state(n, master, quantized, copy, seed=n)
        args = list(step_args(got, grad, step, **hyper))
        args[-1] = seed
        torch.ops.astrobio.adamw8bit_step(*args)
        assert_same_state(got, want, f"path {path}")


def test_opcheck():
    n = 4097
    s = make_state(n, torch.float32, True, True, seed=1)
    grad = make_grad(n, torch.float32, torch.Generator().manual_seed(2))
    torch.library.opcheck(torch.ops.astrobio.adamw8bit_step.default, step_args(s, grad, 1))


@pytest.mark.parametrize("path", PATHS)
def test_found_inf_skips_and_zero_steps(path, monkeypatch):
    monkeypatch.setenv("ASTROBIO_CPU_SIMD", path)
    n = 5000
    grad = make_grad(n, torch.float32, torch.Generator().manual_seed(4))
    before = make_state(n, torch.float32, True, True, seed=5)
    before["param_bf16"].fill_(7.0)
    s = clone_state(before)
    torch.ops.astrobio.adamw8bit_step(*step_args(s, grad, 1, found_inf=torch.tensor([1.0])))
    assert_same_state(s, before, "found_inf = 1 must leave every tensor untouched")
    want = clone_state(before)
    R.adamw8bit_step(*step_args(want, grad, 1))
    torch.ops.astrobio.adamw8bit_step(*step_args(s, grad, 1, found_inf=torch.tensor([0.0])))
    assert_same_state(s, want, "found_inf = 0 must step")


def test_simd_path_selection(monkeypatch):
    assert PATHS[0] == "portable"
    monkeypatch.delenv("ASTROBIO_CPU_SIMD", raising=False)
    assert _C.simd_path() == PATHS[-1]
    monkeypatch.setenv("ASTROBIO_CPU_SIMD", "sse9")
    with pytest.raises(ValueError, match="ASTROBIO_CPU_SIMD must be portable, avx2 or avx512"):
        _C.simd_path()
    s = make_state(300, torch.float32, True, False, seed=6)
    with pytest.raises(ValueError, match="ASTROBIO_CPU_SIMD"):
        torch.ops.astrobio.adamw8bit_step(*step_args(s, torch.zeros(300), 1))


def bad_inputs():
    """(description, function of a fresh valid argument list returning the bad one, message regex)."""
    n = 4100

    def replace(index, value):
        def edit(args):
            args[index] = value(args) if callable(value) else value
            return args
        return edit

    cases = [
        ("grad shape", replace(1, torch.zeros(n + 1)), "grad has 4101 elements, expected 4100"),
        ("grad dtype", replace(1, torch.zeros(n, dtype=torch.float64)), "grad must be float32 or bfloat16"),
        ("param dtype", replace(0, torch.zeros(n, dtype=torch.float16)), "param must be float32 or bfloat16"),
        ("moment dtypes differ", replace(3, torch.zeros(n)), "exp_avg is torch.uint8 but exp_avg_sq is torch.float32"),
        ("moment dtype", lambda a: replace(3, torch.zeros(n, dtype=torch.int32))(
            replace(2, torch.zeros(n, dtype=torch.int32))(a)), "exp_avg must be uint8 codes or float32"),
        ("non-contiguous", replace(1, torch.zeros(2 * n)[::2]), "grad must be contiguous"),
        ("absmax size", replace(4, torch.zeros(3)), "absmax1 has 3 elements, expected 17"),
        ("absmax dtype", replace(5, torch.zeros(17, dtype=torch.float64)), "absmax2 must be float32"),
        ("qmap size", replace(6, torch.zeros(255)), "qmap1 has 255 elements, expected 256"),
        ("param_bf16 dtype", replace(8, torch.zeros(n)), "param_bf16 must be bfloat16"),
        ("param_bf16 size", replace(8, torch.zeros(n - 1, dtype=torch.bfloat16)), "param_bf16 has 4099 elements"),
        ("lr", replace(10, -1.0), "lr must be >= 0"),
        ("beta1", replace(11, 1.0), "betas must lie in"),
        ("beta2", replace(12, -0.1), "betas must lie in"),
        ("eps", replace(13, 0.0), "eps must be > 0"),
        ("grad_scale", replace(15, math.inf), "grad_scale must be finite"),
        ("step", replace(16, 0), "step must be >= 1"),
        ("found_inf", replace(9, torch.zeros(2)), "found_inf must be a one-element float32 tensor"),
    ]
    return n, cases


@pytest.mark.parametrize("case", range(len(bad_inputs()[1])), ids=[c[0] for c in bad_inputs()[1]])
def test_bad_input_raises_clear_error(case):
    n, cases = bad_inputs()
    _, edit, message = cases[case]
    for fn in (torch.ops.astrobio.adamw8bit_step, _C.adamw8bit_step_nogil):
        s = make_state(n, torch.float32, True, True, seed=8)
        before = clone_state(s)
        args = edit(list(step_args(s, torch.zeros(n), 1)))
        with pytest.raises(RuntimeError, match=message):
            fn(*args)
        assert_same_state(s, before, "a rejected call must not touch its tensors")


def test_device_mismatch_raises():
    """NOTE: through torch.ops a meta tensor routes the call to the fake kernel (astrobio/ops.py); the
    device check runs in the CPU implementation, reached directly here."""
    n = 300
    s = make_state(n, torch.float32, True, False, seed=9)
    with pytest.raises(RuntimeError, match="grad is on meta but param is on cpu"):
        _C.adamw8bit_step_nogil(*step_args(s, torch.zeros(n, device="meta"), 1))


def test_dynamic_maps_structure():
    for qmap, signed in ((SIGNED, True), (UNSIGNED, False)):
        assert qmap.dtype == torch.float32 and qmap.numel() == 256
        assert bool((qmap[1:] > qmap[:-1]).all()), "strictly ascending"
        assert float(qmap[-1]) == 1.0 and 0.0 in qmap.tolist()
        if signed:
            assert -1.0 < float(qmap[0]) < -0.99
            positive = qmap[qmap > 0]
            assert torch.equal(torch.sort(-qmap[qmap < 0]).values, positive[:-1]), "symmetric except 1.0"
        else:
            assert float(qmap[0]) == 0.0
        smallest = float(qmap[qmap > 0][0])
        assert 1e-7 < smallest < 1e-6, "seven decimal exponents"
    thr = R.thresholds(SIGNED)
    assert thr.numel() == 255 and bool((thr > SIGNED[:-1]).all() and (thr < SIGNED[1:]).all())


def test_dynamic_maps_match_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    for signed, ours in ((True, SIGNED), (False, UNSIGNED)):
        theirs = torch.sort(functional.create_dynamic_map(signed=signed).float().cpu()).values
        scale = torch.clamp(ours.abs(), min=1e-30)
        rel = ((theirs - ours).abs() / scale).max()
        assert float(rel) <= 1e-6, f"signed={signed}: relative difference {float(rel)}"


def test_ablation_benchmark_still_matches_the_kernel_source():
    """benchmarks/ablate_cpu_kernel.py replaces parts of the AVX-512 kernel by text: each pattern must
    still occur in the source exactly once, or the benchmark would time something else."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ablate_cpu_kernel.py"
    spec = importlib.util.spec_from_file_location("ablate_cpu_kernel", path)
    ablate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablate)
    source = ablate.KERNEL.read_text()
    for name, parts in ablate.VARIANTS.items():
        for old, new in parts:
            assert source.count(old) == 1, f"variant {name}: pattern not found once in {ablate.KERNEL.name}"
        assert ablate.variant_source(parts) != source or not parts


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_lookup_equals_the_specification_on_every_float_below_two_in_magnitude(signed):
    """The exhaustive proof of the table-driven nearest code (kernel_common.h): over all 2^31 fp32 values
    with |n| < 2 (normalised values are at most 1, or a little above when 1 / absmax is subnormal), every
    SIMD path's lookup gives #{i : threshold[i] < n} with the specification's thresholds
    (computed here, in Python, not by the C++ table builder). The control: one threshold moved up by one
    ulp must make exactly one value (the old threshold itself) disagree, in every path."""
    qmap = R.dynamic_map(signed)
    thresholds = R.thresholds(qmap)
    assert dict(_C.nearest_code_mismatches(qmap, thresholds)) == {path: 0 for path in PATHS}
    if signed:
        moved = thresholds.clone()
        moved[100] = torch.nextafter(moved[100], torch.tensor(2.0))
        assert dict(_C.nearest_code_mismatches(qmap, moved)) == {path: 1 for path in PATHS}
