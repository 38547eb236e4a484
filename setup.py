"""Builds astrobio._C: the C++ CPU kernels always; the CUDA kernels too when torch has CUDA and nvcc
is found. Environment switches:

    ASTROBIO_CUDA=auto|0|1   build the CUDA kernels: when possible (default), never, or required
    TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.6;9.0": RTX A5000 and Hopper)
    MAX_JOBS                 parallel compile jobs (ninja)

A missing nvcc or a CPU-only torch is a printed notice, never a failed install.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def default_cuda_home() -> None:
    """NOTE: with CUDA_HOME unset, torch derives it from `which nvcc`; a wrapper at /usr/local/bin/nvcc
    then gives /usr/local, which has no lib64/libcudart, and the link fails. Prefer the standard toolkit
    location when it is there (must run before torch.utils.cpp_extension is imported)."""
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


default_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cpp", root_dir=ROOT) + glob.glob("csrc/cuda/*.cu", root_dir=ROOT))


def notice(message: str) -> None:
    print(f"astrobio setup: {message}", file=sys.stderr)


def cuda_toolkit_home():
    """CUDA_HOME as torch finds it, if nvcc is really there."""
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def want_cuda() -> bool:
    mode = os.environ.get("ASTROBIO_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"ASTROBIO_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        notice("ASTROBIO_CUDA=0: building the CPU kernels only")
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append("this torch has no CUDA (a CPU-only build)")
    if cuda_toolkit_home() is None:
        problems.append("nvcc was not found (set CUDA_HOME to the CUDA toolkit)")
    if problems:
        if mode == "1":
            raise SystemExit("ASTROBIO_CUDA=1 but " + " and ".join(problems))
        notice("skipping the CUDA kernels: " + " and ".join(problems) + "; the CPU kernels still build")
        return False
    return True


def cuda_library_includes():
    """Headers of the CUDA libraries that ship in torch's nvidia wheels (site-packages/nvidia/*/include)."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(p for p in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(p))


def extension():
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden"]
    libraries = ["gomp"] if sys.platform.startswith("linux") else []
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.6;9.0")
        notice(f"building the CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        nvcc = ["-O3", "--fmad=false", "-lineinfo", "-DASTROBIO_WITH_CUDA"]
        return cpp_extension.CUDAExtension(
            "astrobio._C", CPU_SOURCES + CUDA_SOURCES,
            include_dirs=[os.path.join(ROOT, "csrc")] + cuda_library_includes(),
            extra_compile_args={"cxx": cxx + ["-DASTROBIO_WITH_CUDA"], "nvcc": nvcc},
            libraries=libraries)
    return cpp_extension.CppExtension(
        "astrobio._C", CPU_SOURCES, include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx}, libraries=libraries)


setup(
    name="astrobio",
    version="0.1.0",
    description="Full-parameter training of a 13B astrobiology language model on two 24 GB GPUs",
    python_requires=">=3.10",
    # astrobio.kernels is built from the repository-root kernels/ (see astrobio/kernels/__init__.py)
    packages=find_packages(include=["astrobio", "astrobio.*"]),
    package_dir={"astrobio.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.11", "numpy", "tqdm", "matplotlib", "pyyaml", "safetensors", "torch-geometric"],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "wandb": ["wandb"],
        "gpu": ["triton", "bitsandbytes"],
        "compare": ["deepspeed", "torchao", "bitsandbytes"],
    },
)
