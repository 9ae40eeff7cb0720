// linattn::_tensor_core_shared_bytes(dk, dv, backward=False, per_channel=False): the shared memory
// one block of the tensor-core forward (or backward; per_channel: the instances for gates per
// channel) takes for head dims up to dk and dv (what benchmarks/bench_tensor_core.py reports
// beside the compiled kernels' registers).
#include "backward_problem.h"

#include <torch/library.h>

namespace linattn {
namespace tensor_core {
namespace {

int64_t shared_bytes_for(int64_t dk, int64_t dv, bool backward, bool per_channel) {
  return backward ? backward_shared_bytes_of(dk, dv, per_channel) : shared_bytes_of(dk, dv, per_channel);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def("_tensor_core_shared_bytes(int dk, int dv, bool backward=False, bool per_channel=False) -> int", &shared_bytes_for);
}

}  // namespace tensor_core
}  // namespace linattn
