// CPU kernel of astrobio::adamw8bit_step: dispatch to a SIMD path, and the portable scalar path.
//
// One pass over memory; blocks of 256 elements are split over OpenMP threads and each block is finished
// (update, absmax, requantization) while it is in L1, so nothing proportional to the tensor is allocated.
// Bytes moved per parameter (8-bit moments; absmax adds 8 B per 256 elements):
//     fp32 master + fp32 grad: read p 4 + g 4 + m 1 + v 1, write p 4 + m 1 + v 1 = 16 B
//     fp32 master + bf16 grad: 14 B;  bf16 master (stochastic rounding) + bf16 grad: 10 B
//     the optional bf16 copy of the weights adds 2 B.
// At the ~35-40 GB/s in-place read-modify-write bandwidth of a 2-core machine of this kind that bounds
// the step at ~2.2-2.5 Gparam/s (fp32/fp32), leaving ~3 cycles per element per core for the arithmetic:
// hence the table-driven nearest-code search in kernel_common.h instead of a binary search.
//
// Paths: "avx512" (needs AVX-512 F/BW/VL/VBMI: byte-permute table lookups), "avx2" (gathers), and
// "portable"; chosen at run time from the CPU's features, or forced with ASTROBIO_CPU_SIMD=portable|avx2|avx512.
// All paths are bit-exact with astrobio/spec/adamw8bit.py (IEEE sqrt and division, no FMA).
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernel_common.h"

namespace astrobio::cpu {

void step_block_scalar(const StepArgs& a, const MapTables* t1, const MapTables* t2, int64_t block) {
  const int64_t begin = block * kBlockSize;
  const int64_t len = std::min<int64_t>(kBlockSize, a.numel - begin);
  float m[kBlockSize], v[kBlockSize];
  float max_m = 0.0f, max_v = 0.0f;
  bool nan_m = false, nan_v = false;  // std::max drops a NaN; the specification's absmax keeps it
  for (int64_t j = 0; j < len; ++j) {
    const int64_t i = begin + j;
    float m0, v0;
    if (a.quantized) {
      m0 = t1->qmap[static_cast<const uint8_t*>(a.exp_avg)[i]] * a.absmax1[block];
      v0 = t2->qmap[static_cast<const uint8_t*>(a.exp_avg_sq)[i]] * a.absmax2[block];
    } else {
      m0 = static_cast<const float*>(a.exp_avg)[i];
      v0 = static_cast<const float*>(a.exp_avg_sq)[i];
    }
    const ElementUpdate u =
        update_element(a.c, load_float(a.param, a.param_dtype, i), load_float(a.grad, a.grad_dtype, i), m0, v0);
    store_param(a, i, u.p);
    m[j] = u.m;
    v[j] = u.v;
    max_m = std::max(max_m, std::fabs(u.m));
    max_v = std::max(max_v, std::fabs(u.v));
    nan_m |= std::isnan(u.m);
    nan_v |= std::isnan(u.v);
  }
  if (!a.quantized) {
    std::memcpy(static_cast<float*>(a.exp_avg) + begin, m, len * sizeof(float));
    std::memcpy(static_cast<float*>(a.exp_avg_sq) + begin, v, len * sizeof(float));
    return;
  }
  if (nan_m) max_m = bits_float(kCanonicalNan);
  if (nan_v) max_v = bits_float(kCanonicalNan);
  const float inv_m = inverse_absmax(max_m);
  const float inv_v = inverse_absmax(max_v);
  auto* codes1 = static_cast<uint8_t*>(a.exp_avg) + begin;
  auto* codes2 = static_cast<uint8_t*>(a.exp_avg_sq) + begin;
  for (int64_t j = 0; j < len; ++j) {
    const float n1 = m[j] * inv_m, n2 = v[j] * inv_v;
    codes1[j] = t1->lut_ok ? nearest_code(*t1, n1) : nearest_code_search(*t1, n1);
    codes2[j] = t2->lut_ok ? nearest_code(*t2, n2) : nearest_code_search(*t2, n2);
  }
  a.absmax1[block] = max_m;
  a.absmax2[block] = max_v;
}

namespace {

enum class Path { kPortable, kAvx2, kAvx512 };

bool path_supported(Path p) {
#if defined(__x86_64__)
  if (p == Path::kAvx512) return avx512::supported();
  if (p == Path::kAvx2) return avx2::supported();
#else
  if (p != Path::kPortable) return false;
#endif
  return true;
}

const char* path_name(Path p) {
  return p == Path::kAvx512 ? "avx512" : p == Path::kAvx2 ? "avx2" : "portable";
}

// The path to take: ASTROBIO_CPU_SIMD when set (an unsupported request is an error), else the best one.
Path chosen_path() {
  const char* env = std::getenv("ASTROBIO_CPU_SIMD");
  if (env != nullptr && *env != '\0') {
    const std::string want(env);
    for (Path p : {Path::kPortable, Path::kAvx2, Path::kAvx512}) {
      if (want != path_name(p)) continue;
      if (!path_supported(p)) {
        throw std::invalid_argument("ASTROBIO_CPU_SIMD=" + want + " but this CPU lacks the instructions it needs; "
                                    "use one of the paths astrobio._C.cpu_simd_paths() lists");
      }
      return p;
    }
    throw std::invalid_argument("ASTROBIO_CPU_SIMD must be portable, avx2 or avx512, got '" + want + "'");
  }
  if (path_supported(Path::kAvx512)) return Path::kAvx512;
  if (path_supported(Path::kAvx2)) return Path::kAvx2;
  return Path::kPortable;
}

void step_portable(const StepArgs& a, const MapTables* t1, const MapTables* t2) {
  const int64_t blocks = (a.numel + kBlockSize - 1) / kBlockSize;
#pragma omp parallel for schedule(static) if (blocks > 4)
  for (int64_t b = 0; b < blocks; ++b) step_block_scalar(a, t1, t2, b);
}

}  // namespace

void adamw8bit_step(const StepArgs& a) {
  if (a.numel == 0) return;
  std::shared_ptr<const MapTables> t1, t2;
  if (a.quantized) {
    t1 = map_tables(a.qmap1);
    t2 = map_tables(a.qmap2);
  }
  const Path path = chosen_path();
  const bool tables_fit = !a.quantized || (t1->lut_ok && t2->lut_ok);
#if defined(__x86_64__)
  if (path == Path::kAvx512 && tables_fit) return avx512::step(a, t1.get(), t2.get());
  if (path == Path::kAvx2 && tables_fit) return avx2::step(a, t1.get(), t2.get());
#endif
  step_portable(a, t1.get(), t2.get());
}

const char* simd_path() { return path_name(chosen_path()); }

std::vector<std::string> simd_paths() {
  std::vector<std::string> out;
  for (Path p : {Path::kPortable, Path::kAvx2, Path::kAvx512}) {
    if (path_supported(p)) out.emplace_back(path_name(p));
  }
  return out;
}

}  // namespace astrobio::cpu
