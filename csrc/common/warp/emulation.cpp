// The process-wide totals of the warp emulation's counters, and the operators that read and
// reset them (the kernels' static checks: tests/ops/test_warp_layer.py and
// benchmarks/bench_tensor_core.py).
#include "emulation.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace linattn {
namespace warp {

EmulationTotals& emulation_totals() {
  static EmulationTotals totals;
  return totals;
}

namespace {

// [mma, ldmatrix matrices, ldmatrix wavefronts, shuffles, global bytes read, global bytes written]
at::Tensor emulation_counters() {
  auto result = at::empty({6}, at::kLong);
  int64_t* data = result.data_ptr<int64_t>();
  for (int i = 0; i < 6; ++i) data[i] = emulation_totals().values[i].load();
  return result;
}

void reset_emulation_counters() {
  for (auto& v : emulation_totals().values) v.store(0);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def("_warp_emulation_counters() -> Tensor", &emulation_counters);
  m.def("_reset_warp_emulation_counters() -> ()", &reset_emulation_counters);
}

}  // namespace warp
}  // namespace linattn
