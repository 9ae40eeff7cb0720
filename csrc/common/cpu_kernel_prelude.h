// Every library header the CPU kernel sources use, included before their instruction-set
// `#pragma GCC target` (cpu_isa.h): inline functions of these headers are then compiled for the
// baseline in every build, so the linker cannot pick an AVX copy of one for baseline code.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#if LINATTN_CPU_ISA_VARIANTS
#include <immintrin.h>  // intrinsics of common/row_reductions.h, callable under the target pragmas
#endif
