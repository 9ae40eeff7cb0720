// linattn::_tensor_core_shared_bytes(dk, dv, backward=False): the shared memory one block of the
// tensor-core forward (or backward) takes for head dims up to dk and dv (what
// benchmarks/bench_tensor_core.py reports beside the compiled kernels' registers).
#include "backward_problem.h"

#include <torch/library.h>

namespace linattn {
namespace tensor_core {
namespace {

int64_t shared_bytes_for(int64_t dk, int64_t dv, bool backward) {
  return backward ? backward_shared_bytes_of(dk, dv) : shared_bytes_of(dk, dv);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def("_tensor_core_shared_bytes(int dk, int dv, bool backward=False) -> int", &shared_bytes_for);
}

}  // namespace tensor_core
}  // namespace linattn
