"""The Triton kernel (astrobio.kernels.adamw8bit) against the specification, on the CPU.

Triton's interpreter must be switched on (TRITON_INTERPRET=1) before triton is imported, so the
kernel runs in one child process: this file run as a script. The child steps every case with the
``triton`` backend of astrobio.ops and saves the states; the tests here replay the same steps with
the reference (astrobio/spec/adamw8bit.py) and require every bit to match. This process keeps the
compiled Triton, so other test files never see the interpreter. On a GPU,
tests/test_adamw8bit_gpu.py runs the compiled kernel against the same reference.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from _adamw8bit_cases import edge_gradients, initial_state  # noqa: E402

from astrobio import ops  # noqa: E402
from astrobio.kernels import adamw8bit as K  # noqa: E402
from astrobio.spec import adamw8bit as R  # noqa: E402

SIZES = (1, 255, 256, 257, 4097)
# name: (8-bit moments, param dtype, grad dtype, write a bf16 copy)
VARIANTS = {
    "q8-fp32master-bf16grad-copy": (True, torch.float32, torch.bfloat16, True),
    "q8-bf16sr-fp32grad": (True, torch.bfloat16, torch.float32, False),
    "q8-bf16sr-bf16grad-copy": (True, torch.bfloat16, torch.bfloat16, True),
    "fp32moments-fp32master-fp32grad": (False, torch.float32, torch.float32, False),
}
VARIANTS_EXTRA = {"q8-edge-fp32master-fp32grad-copy": (True, torch.float32, torch.float32, True)}
EDGE = next(iter(VARIANTS_EXTRA))  # NaN weights and gradients, an inf gradient, block 0 subnormal
CASES = [f"{n}-{name}" for n in SIZES for name in VARIANTS] + [f"257-{EDGE}", f"4097-{EDGE}"]
SKIP_CASE = "4097-fp32moments-fp32master-fp32grad"
# (step, found_inf) per call: the second call is skipped, the third repeats its step count
CALLS = ((1, None), (2, 1.0), (2, 0.0), (3, None))
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_scale=0.5)
CHILD_TIMEOUT_S = 240


def make_case(case: str, index: int) -> dict:
    """Initial state (random codes and absmax, so the first step already dequantizes) and gradients
    spanning five decades, so that blocks use the whole range of the maps."""
    n = int(case.split("-", 1)[0])
    variant = case.split("-", 1)[1]
    quantized, param_dtype, grad_dtype, copy = {**VARIANTS, **VARIANTS_EXTRA}[variant]
    gen = torch.Generator().manual_seed(1000 + index)
    state = initial_state(n, quantized, param_dtype, copy, variant == EDGE, gen)
    scale = 10 ** torch.empty(len(CALLS), n).uniform_(-4, 1, generator=gen)
    grads = [(torch.randn(n, generator=gen) * s).to(grad_dtype) for s in scale]
    if variant == EDGE:
        for grad in grads:
            edge_gradients(grad)
    return {"state": state, "grads": grads}


def run_steps(backend: str, case: dict) -> dict:
    """Every call of CALLS on a copy of the case's state; returns the final state."""
    s = {k: (v.clone() if v is not None else None) for k, v in case["state"].items()}
    qmap1, qmap2 = R.dynamic_map(True), R.dynamic_map(False)
    for (step, flag), grad in zip(CALLS, case["grads"]):
        found_inf = None if flag is None else torch.tensor([flag])
        ops.adamw8bit_step(backend, s["param"], grad, s["exp_avg"], s["exp_avg_sq"], s["absmax1"], s["absmax2"],
                           qmap1, qmap2, s["param_bf16"], found_inf, *HYPER.values(), step, 77 + step)
    return s


def lookup_maps() -> dict:
    """The maps whose nearest code the lookup test checks: both dynamic maps (the direct lookup) and
    one with six codes below 2^-20 (more than two thresholds in a bucket: the binary search)."""
    dense = torch.cat([torch.linspace(-1, 1, 250, dtype=torch.float64), torch.arange(1, 7) * 1e-8])
    return {"signed": R.dynamic_map(True), "unsigned": R.dynamic_map(False),
            "dense-near-zero": dense.sort().values.float()}


def lookup_samples(qmap: torch.Tensor) -> torch.Tensor:
    """Every threshold and its two fp32 neighbours (where the code changes), both signs, every lookup
    bucket's first and last value, zeros, +-1, and 2^18 fp32 values spread evenly over [-1, 1] by bits."""
    t = R.thresholds(qmap)
    inf = torch.tensor(float("inf"))
    near = torch.cat([t, torch.nextafter(t, inf), torch.nextafter(t, -inf)])
    lo, hi = K._bucket_bounds(torch.device("cpu"))
    even = torch.linspace(0, 0x3F800000, 1 << 17, dtype=torch.float64).round().to(torch.int32).view(torch.float32)
    values = torch.cat([near, -near, lo, hi, even, -even, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    return values[values.abs() <= 1.0]


@triton.jit
def _nearest_code_kernel(x_ptr, out_ptr, base_ptr, pairs_ptr, exact_ptr, n, BLOCK: tl.constexpr,
                         KEY_BITS: tl.constexpr, MIN_KEY: tl.constexpr, MAX_KEY: tl.constexpr,
                         BUCKETS: tl.constexpr):
    """The Triton kernel's _nearest_code on n values."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    exact = tl.load(exact_ptr) != 0
    code = K._nearest_code(x, base_ptr, pairs_ptr, exact, KEY_BITS, MIN_KEY, MAX_KEY, BUCKETS)
    tl.store(out_ptr + offs, code, mask=offs < n)


def _interpreted_nearest_codes() -> dict:
    """name: (samples, codes, exact flag) from the kernel's _nearest_code, in the interpreter."""
    out = {}
    for name, qmap in lookup_maps().items():
        base, pairs, exact = K.lookup_tables(qmap, qmap)
        x = lookup_samples(qmap)
        codes = torch.empty(x.numel(), dtype=torch.int32)
        block = 1 << 14
        _nearest_code_kernel[(triton.cdiv(x.numel(), block),)](x, codes, base[0], pairs[0], exact, x.numel(),
                                                               BLOCK=block, KEY_BITS=K.KEY_BITS, MIN_KEY=K.MIN_KEY,
                                                               MAX_KEY=K.MAX_KEY, BUCKETS=K.BUCKETS)
        out[name] = (x, codes, int(exact))
    return out


def _run_child(inputs_path: str, outputs_path: str) -> None:
    """The child: TRITON_INTERPRET=1 was set before triton was imported, so the kernels run in the
    interpreter."""
    cases = torch.load(inputs_path)
    out = {"backends": ops.available_backends("cpu"),
           "states": {name: run_steps("triton", case) for name, case in cases.items()},
           "nearest_codes": _interpreted_nearest_codes()}
    case = cases[CASES[3]]  # n=255, 8-bit moments
    s = {k: (v.clone() if v is not None else None) for k, v in case["state"].items()}
    args = (s["param"], case["grads"][0], s["exp_avg"], s["exp_avg_sq"], s["absmax1"], s["absmax2"],
            R.dynamic_map(True), R.dynamic_map(False), s["param_bf16"], None, *HYPER.values(), 1, 5)
    # NOTE: only the schema check here: fake-tensor tracing of an interpreted kernel fails inside torch
    # (a meta tensor given CPU storage); tests/test_adamw8bit_gpu.py runs the full opcheck on a GPU.
    out["opcheck"] = torch.library.opcheck(torch.ops.astrobio.adamw8bit_step_triton.default, args,
                                           test_utils=("test_schema",))
    torch.save(out, outputs_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Runs every case through the interpreted Triton kernel once; returns (inputs, child outputs)."""
    folder = tmp_path_factory.mktemp("triton_interpret")
    cases = {name: make_case(name, i) for i, name in enumerate(CASES)}
    torch.save(cases, folder / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__, str(folder / "in.pt"), str(folder / "out.pt")], env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert done.returncode == 0, f"the interpreter child failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return cases, torch.load(folder / "out.pt")


@pytest.mark.parametrize("case", CASES)
def test_interpreted_kernel_matches_reference_bit_for_bit(interpreted, case):
    cases, out = interpreted
    expected = run_steps("reference", cases[case])
    got = out["states"][case]
    for key, want in expected.items():
        if want is None:
            assert got[key] is None
            continue
        assert got[key].dtype == want.dtype, key
        if not torch.equal(got[key].view(torch.uint8), want.view(torch.uint8)):
            diff = (got[key].view(torch.uint8) != want.view(torch.uint8)).nonzero().flatten()
            raise AssertionError(f"{key} differs from the reference in {diff.numel()} bytes, "
                                 f"first at {diff[:8].tolist()}")
    finite = expected["param"].float().isfinite()  # the comparison above saw real numbers
    assert bool(finite.any() if EDGE in case else finite.all())
    if EDGE in case:
        assert bool((expected["param_bf16"].view(torch.int16)[::37] == R.BF16_CANONICAL_NAN).all())
        # block 0's subnormal absmax gave inverse 0 and the zero code: it decays to exactly zero
        assert float(expected["absmax1"][0]) == float(expected["absmax2"][0]) == 0.0


@pytest.mark.parametrize("name, fast", [("signed", 1), ("unsigned", 1), ("dense-near-zero", 0)])
def test_interpreted_nearest_code_matches_specification(interpreted, name, fast):
    """The lookup (or, for a map it cannot serve, the binary search) on every value where the code
    changes and a dense sample: the specification's code is searchsorted over its thresholds."""
    _, out = interpreted
    x, codes, exact = out["nearest_codes"][name]
    assert exact == fast
    want = torch.searchsorted(R.thresholds(lookup_maps()[name]), x).to(torch.int32)
    differ = (codes != want).nonzero().flatten()
    assert differ.numel() == 0, f"{name}: {differ.numel()} codes differ, e.g. at x = {x[differ[:4]].tolist()}"


def test_skipped_call_changes_nothing(interpreted):
    """found_inf = 1 skips the call: replaying CALLS without it gives the same final state."""
    cases, out = interpreted
    case = cases[SKIP_CASE]
    kept = dict(case, grads=[g for (_, flag), g in zip(CALLS, case["grads"]) if flag != 1.0])
    s = {k: (v.clone() if v is not None else None) for k, v in kept["state"].items()}
    for (step, _), grad in zip([c for c in CALLS if c[1] != 1.0], kept["grads"]):
        R.adamw8bit_step(s["param"], grad, s["exp_avg"], s["exp_avg_sq"], s["absmax1"], s["absmax2"],
                         R.dynamic_map(True), R.dynamic_map(False), s["param_bf16"], None, *HYPER.values(),
                         step, 77 + step)
    for key in ("param", "exp_avg", "exp_avg_sq", "absmax1", "absmax2"):
        assert torch.equal(out["states"][SKIP_CASE][key], s[key]), key


def test_interpreter_makes_triton_a_cpu_backend(interpreted, monkeypatch):
    _, out = interpreted
    assert "triton" in out["backends"]
    assert out["backends"][-1] == "reference"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in ops.available_backends("cpu")


def test_opcheck_accepts_the_triton_op(interpreted):
    _, out = interpreted
    assert all(result == "SUCCESS" for result in out["opcheck"].values()), out["opcheck"]


def _valid_args(n: int = 300) -> list:
    blocks = R.num_blocks(n)
    return [torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
            torch.zeros(blocks), torch.zeros(blocks), R.dynamic_map(True), R.dynamic_map(False), None, None,
            1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0, 1, 0]


@pytest.mark.parametrize("index, value, match", [
    (1, torch.zeros(299), "grad has 299 elements, expected 300"),
    (1, torch.zeros(300, dtype=torch.float16), "grad must be float32 or bfloat16"),
    (2, torch.zeros(300), "exp_avg is torch.float32 but exp_avg_sq is torch.uint8"),
    (4, torch.zeros(3), "absmax1 has 3 elements, expected 2"),
    (7, torch.zeros(255), "qmap2 has 255 elements, expected 256"),
    (8, torch.zeros(300), "param_bf16 must be bfloat16"),
    (9, torch.zeros(2), "found_inf must be a one-element float32 tensor"),
    (3, torch.zeros(600, dtype=torch.uint8)[::2], "exp_avg_sq must be contiguous"),
    (13, 0.0, "eps must be > 0"),
    (16, 0, "step must be >= 1"),
], ids=["grad-size", "grad-dtype", "moment-dtypes", "absmax-size", "qmap-size", "copy-dtype", "found-inf",
        "contiguous", "eps", "step"])
def test_bad_arguments_raise_clear_errors(index, value, match):
    from astrobio.kernels import adamw8bit as triton_adamw8bit

    args = _valid_args()
    args[index] = value
    with pytest.raises(RuntimeError, match=match):
        triton_adamw8bit.adamw8bit_step(*args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from astrobio.kernels import adamw8bit as triton_adamw8bit

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CPU tensors only under TRITON_INTERPRET=1"):
        triton_adamw8bit.adamw8bit_step(*_valid_args())


if __name__ == "__main__":
    _run_child(sys.argv[1], sys.argv[2])
