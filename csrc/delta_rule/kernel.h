// Kernel interface of the delta rule (docs/methods.md §11): raw pointers, strides and sizes only.
//
// The state S is (dk × dv) per (batch, head) — or per (sequence, head) of a packed batch — in the
// accumulation type (float32, float64 for float64 inputs). Token t updates it as
//   S_t = (I − β_t k_t k_tᵀ) Diag(e^{g_t}) S_{t−1} + β_t k_t v_tᵀ,     o_t = scale · S_tᵀ q_t
// (causal), or o_t = scale · S_Tᵀ q_t (non-causal: every query reads the final state); g_t one
// log-gate per token (Gated DeltaNet) or one per key channel, row c of S fading by e^{g_tc} (KDA).
#pragma once

#include "../common/cpu_isa.h"
#include "../common/strided.h"

#include <cstdint>

namespace linattn {

struct DeltaRuleShape {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t length = 0;     // T: rows per (batch, head); the packed length for a packed batch
  int64_t key_dim = 0;    // dk
  int64_t value_dim = 0;  // dv
  bool causal = true;
  double scale = 1.0;
  bool normalize_qk = false;  // q and k L2-normalised per row inside the kernels
  int64_t gate_width = 1;     // log-gates per row: 1, or key_dim (per key channel)
};

// The entry points of each instruction-set build of the kernels (cpu_kernel_impl.h).
namespace cpu_base {
#include "cpu_entry_points.inc"
}  // namespace cpu_base
namespace cpu_avx2 {
#include "cpu_entry_points.inc"
}  // namespace cpu_avx2
namespace cpu_avx512 {
#include "cpu_entry_points.inc"
}  // namespace cpu_avx512

}  // namespace linattn
