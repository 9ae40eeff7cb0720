// linattn::_flash_shared_bytes(head_dim, value_dim, backward, buffers): the shared memory one block
// of the flash engine's forward (or backward) takes for these head dims with `buffers` streamed-tile
// buffers (1 is compiled for D = 256 only): what benchmarks/bench_tensor_core.py reports beside the
// compiled kernels' registers.
#include "backward_block.h"

#include <torch/library.h>

namespace linattn {
namespace flash {
namespace {

int64_t shared_bytes_for(int64_t head_dim, int64_t value_dim, bool backward, int64_t buffers) {
  const int n = buffers == 1 ? 1 : 2;
  return backward ? backward_shared_bytes_of(head_dim, value_dim, n) : shared_bytes_of(head_dim, value_dim, n);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def("_flash_shared_bytes(int head_dim, int value_dim, bool backward=False, int buffers=2) -> int", &shared_bytes_for);
}

}  // namespace flash
}  // namespace linattn
