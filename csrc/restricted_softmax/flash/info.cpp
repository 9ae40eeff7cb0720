// linattn::_flash_shared_bytes(head_dim, value_dim, backward): the shared memory one block of the
// flash engine's forward (or backward) takes for these head dims (what
// benchmarks/bench_tensor_core.py reports beside the compiled kernels' registers).
#include "backward_block.h"

#include <torch/library.h>

namespace linattn {
namespace flash {
namespace {

int64_t shared_bytes_for(int64_t head_dim, int64_t value_dim, bool backward) {
  return backward ? backward_shared_bytes_of(head_dim, value_dim) : shared_bytes_of(head_dim, value_dim);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def("_flash_shared_bytes(int head_dim, int value_dim, bool backward=False) -> int", &shared_bytes_for);
}

}  // namespace flash
}  // namespace linattn
