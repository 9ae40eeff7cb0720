// Run-time choice among builds of the CPU kernels for several x86 instruction sets, as ATen's
// DispatchStub does. Each kernel source is compiled once per set (cpu_kernel_<isa>.cpp: the
// code under `#pragma GCC target`, never -march=native, so the wheel runs on any x86-64) into
// a namespace of its own (LINATTN_ISA), so that no inline function of one build can stand in
// for another's at link time. The operators call the widest build the CPU supports; the
// environment variable LINATTN_CPU_ISA=base|avx2|avx512 asks for a narrower one (tests and
// benchmarks compare them). Only GCC on x86-64 builds the variants; elsewhere only `base`.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LINATTN_CPU_ISA_VARIANTS 1
#else
#define LINATTN_CPU_ISA_VARIANTS 0
#endif

// The namespace of the build being compiled: the per-set sources define it before any include.
#ifndef LINATTN_ISA
#define LINATTN_ISA cpu_base
#endif

// The instruction-set level of the build being compiled (0 baseline, 1 AVX2, 2 AVX-512), set
// by the per-set sources next to LINATTN_ISA, for the few helpers written with intrinsics:
// g++ does not define __AVX2__ and the like under `#pragma GCC target`.
#if !LINATTN_CPU_ISA_VARIANTS
#undef LINATTN_ISA_LEVEL
#endif
#ifndef LINATTN_ISA_LEVEL
#define LINATTN_ISA_LEVEL 0
#endif

namespace linattn {

enum class CpuIsa { base = 0, avx2 = 1, avx512 = 2 };

// The build the operators use in this process (decided on the first call).
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace linattn

// Runs `ns::call` for the namespace of the chosen build, e.g.
//   LINATTN_CPU_ISA_DISPATCH(linear_attention_forward_cpu<scalar_t, acc_t>(shape, ...));
#if LINATTN_CPU_ISA_VARIANTS
#define LINATTN_CPU_ISA_DISPATCH(...)                         \
  do {                                                        \
    switch (::linattn::cpu_isa()) {                           \
      case ::linattn::CpuIsa::avx512:                         \
        ::linattn::cpu_avx512::__VA_ARGS__;                   \
        break;                                                \
      case ::linattn::CpuIsa::avx2:                           \
        ::linattn::cpu_avx2::__VA_ARGS__;                     \
        break;                                                \
      default:                                                \
        ::linattn::cpu_base::__VA_ARGS__;                     \
    }                                                         \
  } while (0)
#else
#define LINATTN_CPU_ISA_DISPATCH(...) ::linattn::cpu_base::__VA_ARGS__
#endif
