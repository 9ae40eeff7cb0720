// A thread block on the CPU for kernels written on the warp-operation layer: `exec(phase)` runs
// phase(warp context, warp state) for warp 0, 1, ... in turn, each with all 32 lanes at once
// (lanes.h); returning is the barrier. Each warp keeps its registers that outlive a barrier in
// its State and its cp.async copies in flight in its own queue. Host-only.
#pragma once

#include "emulation.h"
#include "lanes.h"

#include <cstring>
#include <vector>

namespace linattn {
namespace warp {

template <typename State>
class HostBlock {
 public:
  HostBlock(int warps, int64_t shared_bytes)
      : shared_(static_cast<size_t>(shared_bytes)), pending_(warps), states_(warps), contexts_(warps) {
    for (int w = 0; w < warps; ++w) {
      pending_[w].shared = shared_.data();
      pending_[w].shared_bytes = shared_bytes;
      contexts_[w].shared = shared_.data();
      contexts_[w].warp = w;
      contexts_[w].pending = &pending_[w];
    }
  }

  // A fresh block: shared memory all NaN (0xff bytes), as garbage would be on a GPU, so a read
  // before a write shows in the results.
  void reset() {
    std::memset(shared_.data(), 0xff, shared_.size());
    for (auto& p : pending_) {
      p.open.clear();
      p.committed.clear();
    }
  }

  template <typename Phase>
  void operator()(const Phase& phase) const {
    for (size_t w = 0; w < contexts_.size(); ++w) phase(contexts_[w], states_[w]);
  }

  // The end of the block: a copy still in flight is a kernel that never waited for it.
  void finish() const {
    for (const auto& p : pending_)
      if (!p.idle()) emulation_fault("warp emulation: a block ended with cp.async copies it never waited for");
  }

 private:
  std::vector<unsigned char> shared_;
  std::vector<PendingCopies> pending_;
  mutable std::vector<State> states_;
  std::vector<WarpContext> contexts_;
};

}  // namespace warp
}  // namespace linattn
