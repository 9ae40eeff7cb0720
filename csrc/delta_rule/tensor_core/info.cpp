// linattn::_delta_tensor_core_shared_bytes(dk, dv, backward_walk=False, per_channel=False): the
// shared memory one block of the delta rule's tensor-core forward (or, with backward_walk, of its
// backward walk: 64 value columns whatever dv) takes for head dims up to dk (<= 128) and dv, with
// gates per key channel or not (what benchmarks/bench_tensor_core.py reports beside the compiled
// kernels' registers).
#include "problem.h"

#include <torch/library.h>

namespace linattn {
namespace delta_tensor_core {
namespace {

int64_t shared_bytes_for(int64_t dk, int64_t dv, bool backward_walk, bool per_channel) {
  TORCH_CHECK(dk >= 1 && dk <= 128 && dv >= 1, "_delta_tensor_core_shared_bytes: dk must be in [1, 128] and dv >= 1, "
              "got dk=", dk, " dv=", dv);
  return backward_walk ? walk_shared_bytes_of(dk, per_channel) : shared_bytes_of(dk, dv, per_channel);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def("_delta_tensor_core_shared_bytes(int dk, int dv, bool backward_walk=False, bool per_channel=False) -> int",
        &shared_bytes_for);
}

}  // namespace delta_tensor_core
}  // namespace linattn
