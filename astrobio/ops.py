"""Loads the compiled op library (astrobio._C), registers fake kernels, and picks a backend.

One op, ``astrobio::adamw8bit_step`` (schema in csrc/ops.cpp, specification in
astrobio/spec/adamw8bit.py), served by these backends:

    reference  plain PyTorch (astrobio.spec.adamw8bit); always available, any device
    cpu        the C++ kernel (SIMD + OpenMP) for CPU tensors
    cuda       the CUDA kernel for CUDA tensors (when the extension was built with CUDA)
    triton     the Triton kernel (astrobio.kernels), CUDA tensors, or CPU under TRITON_INTERPRET=1

Every backend validates its arguments with the C++ op's checks (the Triton op through
``astrobio._C.check_adamw8bit_args``). The op's ``found_inf`` (optional, a one-element float32 tensor on
the parameters' device, nonzero = skip the step) is read by device kernels where it lies, so deciding a
skip never synchronizes. The package keeps working without the compiled library: ``reference`` is then
the only backend.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from astrobio.spec import adamw8bit as reference

try:
    from astrobio import _C
except ImportError as error:  # a source checkout that was never built, or a broken build
    _C = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

BACKENDS = ("reference", "cpu", "cuda", "triton")

if _C is not None:

    @torch.library.register_fake("astrobio::adamw8bit_step")
    def _adamw8bit_step_fake(param, grad, exp_avg, exp_avg_sq, absmax1, absmax2, qmap1, qmap2, param_bf16,
                             found_inf, lr, beta1, beta2, eps, weight_decay, grad_scale, step, seed):
        # NOTE: a meta tensor among real ones sends the whole call here; refuse it rather than do nothing.
        named = dict(grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, absmax1=absmax1, absmax2=absmax2,
                     qmap1=qmap1, qmap2=qmap2, param_bf16=param_bf16, found_inf=found_inf)
        for name, t in named.items():
            if t is not None and t.device != param.device:
                raise RuntimeError(f"adamw8bit_step: {name} is on {t.device} but param is on {param.device}; "
                                   "move them to one device")
        return None  # updates its arguments in place; nothing is returned


def extension_error() -> str | None:
    """Why astrobio._C could not be loaded (None when it loaded)."""
    return None if _IMPORT_ERROR is None else str(_IMPORT_ERROR)


def has_cpu_kernel() -> bool:
    return _C is not None


def cpu_layer_kernels_unavailable() -> str | None:
    """Why the C++ ops of the model's fused layers (astrobio.model.cpu_layers) cannot run, or None."""
    if not has_cpu_kernel():
        return f"the compiled extension astrobio._C did not load ({_IMPORT_ERROR}); reinstall with `pip install -e .`"
    if not all(hasattr(torch.ops.astrobio, op) for op in ("rmsnorm_forward_cpu", "causal_attention_cpu")):
        return "astrobio._C was built from sources older than the C++ layer kernels; rebuild it with `pip install -e .`"
    return None


def has_cuda_kernel() -> bool:
    return _C is not None and bool(_C.cuda_built()) and torch.cuda.is_available()


def has_triton() -> bool:
    if _C is None or importlib.util.find_spec("triton") is None:  # the Triton op validates through _C
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can step tensors on ``device``, the preferred one first."""
    device = torch.device(device)
    found = []
    if device.type == "cpu" and has_cpu_kernel():
        found.append("cpu")
    if device.type == "cuda" and has_cuda_kernel():
        found.append("cuda")
    if has_triton() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        found.append("triton")
    found.append("reference")
    return found


def resolve_backend(name: str, device: torch.device | str) -> str:
    """``auto`` -> the preferred backend for ``device``; an explicit name is checked, with a clear error."""
    if name == "auto":
        return available_backends(device)[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown optimizer backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name not in available_backends(device):
        raise RuntimeError(f"optimizer backend {name!r} cannot step tensors on {torch.device(device)}: "
                           f"{_unavailable_reason(name, torch.device(device))}. "
                           f"Available there: {', '.join(available_backends(device))}")
    return name


def _unavailable_reason(name: str, device: torch.device) -> str:
    if name in ("cpu", "cuda") and _C is None:
        return f"the compiled extension astrobio._C did not load ({_IMPORT_ERROR}); reinstall with `pip install -e .`"
    if name == "cpu":
        return "the C++ kernel steps CPU tensors only"
    if name == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        if not _C.cuda_built():
            return "astrobio._C was built without CUDA (ASTROBIO_CUDA=0, or nvcc/CUDA torch missing at build time)"
        return "the CUDA kernel steps CUDA tensors only"
    return "Triton is not installed, or there is no GPU and TRITON_INTERPRET=1 is not set"


def any_non_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether any element of these contiguous CPU float32/bfloat16 tensors is inf or NaN: one native
    multi-threaded pass with the GIL released (per-tensor torch reductions without the extension)."""
    if _C is not None:
        return bool(_C.any_non_finite(tensors))
    return any(not bool(torch.isfinite(t).all()) for t in tensors)


def adamw8bit_step(backend: str, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor,
                   qmap2: torch.Tensor, param_bf16: torch.Tensor | None, found_inf: torch.Tensor | None,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   grad_scale: float, step: int, seed: int) -> None:
    """Run one in-place 8-bit AdamW step with the named backend (already resolved)."""
    args = (param, grad, exp_avg, exp_avg_sq, absmax1, absmax2, qmap1, qmap2, param_bf16, found_inf,
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), float(grad_scale),
            int(step), int(seed))
    if backend == "reference":
        reference.adamw8bit_step(*args)
    elif backend in ("cpu", "cuda"):
        torch.ops.astrobio.adamw8bit_step(*args)
    elif backend == "triton":
        from astrobio.kernels import adamw8bit as triton_adamw8bit
        triton_adamw8bit.adamw8bit_step(*args)
    else:
        raise ValueError(f"unknown optimizer backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def host_adamw8bit_step():
    """The C++ step as a plain function that releases the GIL while it runs (the offload engine's worker
    threads call it); the same arguments as the op ``astrobio::adamw8bit_step``."""
    if _C is None:
        raise RuntimeError(f"the C++ kernel is not built ({extension_error()}); rebuild with "
                           "`pip install --no-build-isolation -e .`, or use backend='reference'")
    return _C.adamw8bit_step_nogil


def load_layer_kernels() -> dict:
    """The model's fused Triton layer ops (astrobio.kernels): rmsnorm, rotary, silu_mul and
    linear_cross_entropy, imported on demand so that importing astrobio never imports triton."""
    from astrobio.kernels.cross_entropy import linear_cross_entropy
    from astrobio.kernels.rmsnorm import rmsnorm
    from astrobio.kernels.rotary import rotary
    from astrobio.kernels.swiglu import silu_mul
    return dict(rmsnorm=rmsnorm, rotary=rotary, silu_mul=silu_mul, linear_cross_entropy=linear_cross_entropy)
