// linattn::_delta_tensor_core_shared_bytes(dk, dv): the shared memory one block of the delta
// rule's tensor-core forward takes for head dims up to dk (<= 128) and dv (what
// benchmarks/bench_tensor_core.py reports beside the compiled kernels' registers).
#include "problem.h"

#include <torch/library.h>

namespace linattn {
namespace delta_tensor_core {
namespace {

int64_t shared_bytes_for(int64_t dk, int64_t dv) {
  TORCH_CHECK(dk >= 1 && dk <= 128 && dv >= 1, "_delta_tensor_core_shared_bytes: dk must be in [1, 128] and dv >= 1, "
              "got dk=", dk, " dv=", dv);
  return shared_bytes_of(dk, dv);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(linattn, m) { m.def("_delta_tensor_core_shared_bytes(int dk, int dv) -> int", &shared_bytes_for); }

}  // namespace delta_tensor_core
}  // namespace linattn
