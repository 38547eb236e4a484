"""Hardware profiles for the planner's step-time estimate and device budgets.

Each number says where it comes from. Datasheet peaks are what the vendor prints; where a sustained
figure differs (a PCIe link, a host memory stream), the profile carries the sustained one and says so.
Every field can be overridden from the planner's command line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 10 ** 9
GIB = 2 ** 30


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    matrix_tflops: float          # dense bf16 tensor-core (or CPU fp32 FMA) peak, TFLOP/s
    device_memory_bandwidth: float  # GB/s, device memory (HBM / GDDR; on the CPU: host DRAM)
    host_link: float              # GB/s per direction, device <-> pinned host memory, sustained
    host_memory_bandwidth: float  # GB/s, sustained in-place read-modify-write stream on the host
    device_memory: int            # bytes per device
    context_bytes: int            # CUDA context, cuBLAS workspace, NCCL buffers: outside the allocator
    allocator_slack: float        # fraction of allocated bytes lost to caching-allocator fragmentation
    process_host_bytes: int       # host RSS of one training process before any model tensor
    mfu: float                    # fraction of matrix_tflops the training step sustains (stated guess)
    unified: bool = False         # the "device" is host memory (CPU training)


PROFILES: dict[str, HardwareProfile] = {
    "a5000": HardwareProfile(
        name="a5000",
        # RTX A5000 datasheet: "Tensor performance 222.2 TFLOPS" is with 2:4 sparsity; dense bf16 is half.
        matrix_tflops=111.1,
        # datasheet: 24 GB GDDR6, 768 GB/s.
        device_memory_bandwidth=768.0,
        # PCIe 4.0 x16 is 31.5 GB/s per direction on paper; pinned cudaMemcpy measures ~25 GB/s.
        host_link=25.0,
        # Assumption for a 2 x A5000 workstation host: 8-channel DDR4-3200 (204.8 GB/s on paper);
        # an in-place multi-stream read-modify-write sustains about 40% of that (the "cpu" profile's
        # 35 GB/s is a 2-core cloud VM). Override with --host-memory-bandwidth.
        host_memory_bandwidth=80.0,
        device_memory=24 * GIB,
        # CUDA 12+ context with lazy module loading ~0.3-0.4 GiB on Ampere, cuBLAS workspace and NCCL
        # point-to-point buffers ~0.2 GiB: 0.6 GiB, outside torch.cuda.memory_allocated.
        context_bytes=int(0.6 * GIB),
        # PyTorch's caching allocator rounds and splits blocks; 5% of allocated is a typical
        # reserved-minus-allocated gap for steady training with fixed shapes.
        allocator_slack=0.05,
        # torch + CUDA libraries (cuBLAS, cuDNN, NCCL) resident in host memory per process.
        process_host_bytes=3 * GIB,
        mfu=0.40,
    ),
    "h200": HardwareProfile(
        name="h200",
        # H200 SXM datasheet: bf16 tensor 1,979 TFLOPS with sparsity; dense is half.
        matrix_tflops=989.0,
        # datasheet: 141 GB HBM3e at 4.8 TB/s (about 139 GiB visible to CUDA).
        device_memory_bandwidth=4800.0,
        # PCIe 5.0 x16: 63 GB/s per direction on paper, ~50 GB/s sustained pinned copies.
        host_link=50.0,
        # Assumption: a 2-socket DDR5-4800 server (12 channels per socket, 460 GB/s per socket on
        # paper); one process's stream sustains ~150 GB/s. Override with --host-memory-bandwidth.
        host_memory_bandwidth=150.0,
        device_memory=139 * GIB,
        context_bytes=int(0.8 * GIB),
        allocator_slack=0.05,
        process_host_bytes=3 * GIB,
        mfu=0.40,
    ),
    "cpu": HardwareProfile(
        name="cpu",
        # A 2-core CI machine (AMD EPYC, AVX-512 executed as 2 x 256-bit FMA pipes):
        # 2 cores x ~3 GHz x 32 fp32 FLOP/cycle ~ 0.19 TFLOP/s.
        matrix_tflops=0.19,
        # An in-place 4-read/2-write stream (the optimizer step's access pattern) sustains ~35 GB/s on
        # this kind of machine (docs/BENCHMARKS.md has the roofline probes).
        device_memory_bandwidth=35.0,
        # No link: a "device-to-host" copy is a memcpy, reading and writing host memory (35 / 2).
        host_link=17.5,
        host_memory_bandwidth=35.0,
        device_memory=24 * GIB,
        context_bytes=0,
        # Large tensors are mmap-ed by glibc and returned on free; nothing cached.
        allocator_slack=0.0,
        # Measured baselines are taken after the imports, so nothing is added for the runtime here.
        process_host_bytes=0,
        mfu=0.50,
        unified=True,
    ),
}


def get_hardware(name: str, **overrides) -> HardwareProfile:
    """The named profile with any non-None overrides applied (e.g. ``host_link=12.0``)."""
    if name not in PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; choose one of {', '.join(PROFILES)}")
    return replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})
