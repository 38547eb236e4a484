"""Where the AVX-512 CPU step spends its time: the kernel with parts of it removed, timed side by side.

    python benchmarks/ablate_cpu_kernel.py [--numel 32768] [--rounds 6] [--against REV] [--json PATH]

Each variant is csrc/cpu/adamw8bit_avx512.cpp with one or more parts replaced by the cheapest code that
still reads and writes the same memory (the results are no longer an optimizer step: only the time
means anything):

    full            the kernel as shipped
    no-requant      the nearest-code search of m and v replaced by a float -> int conversion
    no-dequant      the 256-entry map lookups replaced by an int -> float conversion (also no-requant)
    no-divider      sqrt and division replaced by multiplications (also no-requant, no-dequant)
    full@REV        with --against REV: the kernel and its table builder as of git revision REV, timed in
                    the same rounds (a before/after comparison that the machine's load shifts alike)

Every variant is compiled with the flags setup.py uses (-O3, -ffp-contract=off, OpenMP) into a small
driver that steps one fp32 tensor of --numel elements (default 32,768: weights, gradient and codes fit
in a core's L2, so memory does not hide compute) on one thread. The variants run interleaved, round
after round, and each reports its best process CPU time per element: on a shared machine CPU time is
the steadier number. A substitution that no longer matches the kernel's source stops the script: it
names the pattern, so that it is updated with the kernel.

The last table turns the times into the issue 2 budget: how much CPU per parameter the step may take
on this machine's two cores to reach a given rate, and how much of that the requantization may use.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL = ROOT / "csrc" / "cpu" / "adamw8bit_avx512.cpp"
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]

REQUANT = ("""  quantize_block(t1, m_buf, am, codes1);
  quantize_block(t2, v_buf, av, codes2);""",
           """  for (int j = 0; j < kBlockSize; j += 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes1 + j),
                     _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_load_ps(m_buf + j))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes2 + j),
                     _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_load_ps(v_buf + j))));
  }""")
DEQUANT = ("""  dequantize_block(t1, codes1, _mm512_set1_ps(x.absmax1[block]), m_buf);
  dequantize_block(t2, codes2, _mm512_set1_ps(x.absmax2[block]), v_buf);""",
           """  for (int j = 0; j < kBlockSize; j += 16) {
    const __m512 c1 =
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes1 + j))));
    const __m512 c2 =
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes2 + j))));
    _mm512_store_ps(m_buf + j, c1);
    _mm512_store_ps(v_buf + j, c2);
  }""")
DIVIDER = ("""    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), k.inv_bc2_sqrt), k.eps);
    const __m512 upd = _mm512_mul_ps(k.step_size, _mm512_div_ps(m, denom));""",
           """    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(v, k.inv_bc2_sqrt), k.eps);
    const __m512 upd = _mm512_mul_ps(k.step_size, _mm512_mul_ps(m, denom));""")
VARIANTS = {"full": (), "no-requant": (REQUANT,), "no-dequant": (REQUANT, DEQUANT),
            "no-divider": (REQUANT, DEQUANT, DIVIDER)}

DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <vector>
#include "kernel_common.h"

namespace astrobio {
namespace cpu {
void step_block_scalar(const StepArgs&, const MapTables*, const MapTables*, int64_t) {}  // full blocks only
}  // namespace cpu
}  // namespace astrobio

static double cpu_ns() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

// argv: numel (a multiple of 256), steps, maps file (512 floats: signed then unsigned map)
int main(int argc, char** argv) {
  using namespace astrobio;
  const int64_t n = atoll(argv[1]);
  const int steps = atoi(argv[2]);
  std::vector<float> maps(512);
  FILE* f = fopen(argv[3], "rb");
  if (f == nullptr || fread(maps.data(), sizeof(float), 512, f) != 512) return 3;
  fclose(f);
  auto t1 = cpu::map_tables(maps.data());
  auto t2 = cpu::map_tables(maps.data() + 256);
  std::vector<float> p(n), g(n), a1(n / 256, 1e-3f), a2(n / 256, 1e-6f);
  std::vector<uint8_t> m(n), v(n);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = 0.01f * std::sin(0.1f * i);
    g[i] = 1e-3f * std::cos(0.37f * i);
    m[i] = static_cast<uint8_t>(7 * i);
    v[i] = static_cast<uint8_t>(128 + (13 * i) % 128);
  }
  StepArgs a{};
  a.param = p.data(); a.param_dtype = DType::kFloat32; a.grad = g.data(); a.grad_dtype = DType::kFloat32;
  a.exp_avg = m.data(); a.exp_avg_sq = v.data(); a.quantized = true; a.absmax1 = a1.data();
  a.absmax2 = a2.data(); a.qmap1 = maps.data(); a.qmap2 = maps.data() + 256; a.numel = n;
  double best = 1e30;
  for (int repeat = 0; repeat < 5; ++repeat) {
    const double start = cpu_ns();
    for (int s = 1; s <= steps; ++s) {
      a.c = make_step_constants(1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0, s);
      cpu::avx512::step(a, t1.get(), t2.get());
    }
    const double ns = (cpu_ns() - start) / steps / n;
    best = ns < best ? ns : best;
  }
  printf("%.4f\n", best);
  return 0;
}
"""


def variant_source(parts) -> str:
    source = KERNEL.read_text()
    for old, new in parts:
        if old not in source:
            sys.exit(f"ablate_cpu_kernel: this pattern is no longer in {KERNEL.relative_to(ROOT)}; update the "
                     f"script with the kernel:\n{old}")
        source = source.replace(old, new)
    return source


def source_at(rev: str, path: pathlib.Path) -> str:
    """The text of a repository file at git revision `rev`."""
    out = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path.relative_to(ROOT).as_posix()}"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"ablate_cpu_kernel: --against {rev}: {out.stderr.strip()}")
    return out.stdout


def build(folder: pathlib.Path, compiler: str, against: str | None) -> dict[str, pathlib.Path]:
    """One executable per variant: (kernel, table builder) sources; the driver compiled once."""
    include = ["-I", str(KERNEL.parent), "-I", str(ROOT / "csrc")]
    tables = KERNEL.parent / "qmap_tables.cpp"
    sources = {name: (variant_source(parts), tables.read_text()) for name, parts in VARIANTS.items()}
    if against is not None:
        sources[f"full@{against}"] = (source_at(against, KERNEL), source_at(against, tables))

    def compile_object(name: str, source: str) -> str:
        (folder / f"{name}.cpp").write_text(source)
        subprocess.run([compiler, *FLAGS, *include, "-c", str(folder / f"{name}.cpp"), "-o",
                        str(folder / f"{name}.o")], check=True)
        return str(folder / f"{name}.o")

    driver = compile_object("driver", DRIVER)
    binaries = {}
    for index, (name, (kernel, table_builder)) in enumerate(sources.items()):
        objects = [compile_object(f"kernel{index}", kernel), compile_object(f"tables{index}", table_builder)]
        binaries[name] = folder / f"variant{index}"
        subprocess.run([compiler, *FLAGS, *objects, driver, "-o", str(binaries[name])], check=True)
    return binaries


def write_maps(path: pathlib.Path) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from astrobio.spec.adamw8bit import dynamic_map
    torch.cat([dynamic_map(True), dynamic_map(False)]).numpy().tofile(path)


def budget_rows(times: dict[str, float]) -> list[tuple[str, float]]:
    """The cost of each removed part: the differences between consecutive variants."""
    return [("requantization of m and v (full - no-requant)", times["full"] - times["no-requant"]),
            ("dequantization (no-requant - no-dequant)", times["no-requant"] - times["no-dequant"]),
            ("sqrt and division (no-dequant - no-divider)", times["no-dequant"] - times["no-divider"]),
            ("update arithmetic and memory (no-divider)", times["no-divider"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=32768, help="elements per step (a multiple of 256)")
    parser.add_argument("--steps", type=int, default=400, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds over the variants")
    parser.add_argument("--against", default=None, metavar="REV",
                        help="also time the kernel as of this git revision (compiled against today's headers)")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.numel % 256:
        parser.error(f"--numel {args.numel} is not a multiple of 256 (the driver steps full blocks only)")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        sys.exit("ablate_cpu_kernel: no C++ compiler (c++ or g++) found")
    if "avx512vbmi" not in pathlib.Path("/proc/cpuinfo").read_text():
        sys.exit("ablate_cpu_kernel: this CPU has no AVX-512 VBMI, so the AVX-512 path does not run here")
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        write_maps(folder / "maps.bin")
        binaries = build(folder, compiler, args.against)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        best = {name: float("inf") for name in binaries}
        for _ in range(args.rounds):
            for name, binary in binaries.items():
                out = subprocess.run([str(binary), str(args.numel), str(args.steps), str(folder / "maps.bin")],
                                     env=env, capture_output=True, text=True, check=True)
                best[name] = min(best[name], float(out.stdout))
    print(f"AVX-512 step, 1 thread, {args.numel:,} fp32 elements (L2-resident), best of {args.rounds} rounds:")
    print(f"{'variant':<20} {'CPU ns/element':>15}")
    for name, ns in best.items():
        print(f"{name:<20} {ns:>15.3f}")
    if args.against is not None:
        print(f"full / full@{args.against}: {best['full'] / best[f'full@{args.against}']:.3f}")
    print("\nparts (differences):")
    for label, ns in budget_rows(best):
        print(f"  {label:<48} {ns:.3f} ns")
    print("\nrates on 2 cores if nothing else limits (2 / CPU ns per element):")
    for name, ns in best.items():
        print(f"  {name:<20} {2 / ns:.2f} Gparam/s")
    if args.json:
        args.json.write_text(json.dumps({"numel": args.numel, "cpu_ns_per_element": best,
                                         "parts": dict(budget_rows(best))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
