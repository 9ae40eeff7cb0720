// Which build of the CPU kernels this process runs (see cpu_isa.h).
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace linattn {
namespace {

CpuIsa widest_supported() {
#if LINATTN_CPU_ISA_VARIANTS
  __builtin_cpu_init();
  // The sets the avx512 build is compiled for (setup.py CPU_ISA_BUILDS), all of them.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return CpuIsa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::avx2;
#endif
  return CpuIsa::base;
}

CpuIsa choose() {
  const CpuIsa widest = widest_supported();
  const char* asked = std::getenv("LINATTN_CPU_ISA");
  if (asked == nullptr || *asked == '\0') return widest;
  for (CpuIsa isa : {CpuIsa::base, CpuIsa::avx2, CpuIsa::avx512}) {
    if (std::strcmp(asked, cpu_isa_name(isa)) != 0) continue;
    if (static_cast<int>(isa) > static_cast<int>(widest)) {
      TORCH_WARN("linattn: LINATTN_CPU_ISA=", asked, " is not supported by this CPU or build; using ",
                 cpu_isa_name(widest));
      return widest;
    }
    return isa;
  }
  TORCH_CHECK(false, "linattn: LINATTN_CPU_ISA must be one of base, avx2, avx512 (or unset), got '", asked, "'");
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "base";
  }
}

CpuIsa cpu_isa() {
  static const CpuIsa chosen = choose();
  return chosen;
}

}  // namespace linattn
