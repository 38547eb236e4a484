"""``python -m astrobio``: what this installation is built with and what it can run.

Versions (astrobio, Python, torch, Triton), the SIMD path the C++ 8-bit AdamW takes on this CPU, whether
the CUDA and Triton kernels are present (or why not), and the GPUs torch sees. Run it after an install
whose build messages went by unseen (``pip -q``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys

import torch

import astrobio
from astrobio import ops


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> list[str]:
    cuda = f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU-only build)"
    return [f"astrobio   {astrobio.__version__} at {os.path.dirname(astrobio.__file__)}",
            f"python     {platform.python_version()} ({sys.executable})",
            f"torch      {torch.__version__}{cuda}",
            f"triton     {version_of('triton')}"]


def cpu_kernel() -> str:
    if not ops.has_cpu_kernel():
        return (f"absent: astrobio._C did not load ({ops.extension_error()}); the reference backend runs "
                f"instead; rebuild with `pip install --no-build-isolation -e .`")
    # NOTE: ops exposes the loaded extension only as ops._C; simd_path is its binding (csrc/ops.cpp)
    extension = ops._C
    forced = os.environ.get("ASTROBIO_CPU_SIMD")
    how = f"forced by ASTROBIO_CPU_SIMD={forced}" if forced else "the best this CPU runs"
    return (f"present, SIMD path {extension.simd_path()} ({how}; this CPU runs "
            f"{', '.join(extension.cpu_simd_paths())}; OpenMP threads {torch.get_num_threads()})")


def cuda_kernel() -> str:
    if not ops.has_cpu_kernel():
        return "absent: astrobio._C did not load (see the C++ kernel)"
    if ops._C.cuda_built():
        return "present" if torch.cuda.is_available() else "built, but no CUDA GPU is visible to run it"
    missing = []
    if not torch.version.cuda:
        missing.append("this torch has no CUDA")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        missing.append("nvcc is not on PATH (set CUDA_HOME to the CUDA toolkit)")
    reason = " and ".join(missing) if missing else (
        "torch has CUDA and nvcc is here now, so the build had ASTROBIO_CUDA=0 (or ran before they were "
        "installed)")
    return f"absent: astrobio._C was built without CUDA: {reason}; rebuild with ASTROBIO_CUDA=1 to require it"


def triton_kernel() -> str:
    if importlib.util.find_spec("triton") is None:
        return "absent: triton is not installed (pip install triton)"
    if importlib.util.find_spec("astrobio.kernels") is None:
        return "absent: astrobio.kernels is not installed (reinstall astrobio)"
    if torch.cuda.is_available():
        return "present"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "present, interpreted on the CPU (TRITON_INTERPRET=1)"
    return "installed, but no CUDA GPU is visible (TRITON_INTERPRET=1 runs it on the CPU, slowly)"


def gpus() -> list[str]:
    if not torch.cuda.is_available():
        return ["none visible to torch" + ("" if torch.version.cuda else " (a CPU-only torch)")]
    found = []
    for index in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(index)
        found.append(f"cuda:{index} {p.name}, compute capability {p.major}.{p.minor}, "
                     f"{p.total_memory / 2**30:.1f} GiB")
    return found


def report() -> list[str]:
    lines = versions()
    lines += ["8-bit AdamW kernels:",
              f"  C++ (CPU)  {cpu_kernel()}",
              f"  CUDA       {cuda_kernel()}",
              f"  Triton     {triton_kernel()}",
              f"  backends   cpu tensors: {', '.join(ops.available_backends('cpu'))}"
              + (f"; cuda tensors: {', '.join(ops.available_backends('cuda'))}" if torch.cuda.is_available() else ""),
              "GPUs:"]
    lines += [f"  {gpu}" for gpu in gpus()]
    return lines


def main() -> int:
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
