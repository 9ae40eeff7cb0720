// A launch of a kernel written on the warp-operation layer, emulated on the CPU: blocks
// [0, blocks) spread over ATen's threads, each block's warps run lane by lane in a HostBlock
// (host_block.h) that starts as a fresh block, counting what they do into the process-wide totals
// (emulation.h). `program(exec, block)` is the kernel's block program. Host-only.
#pragma once

#include "host_block.h"

#include <ATen/Parallel.h>

#include <cstdint>

namespace linattn {
namespace warp {

template <typename State, typename Program>
void emulate_grid(int warps, int64_t blocks, int64_t shared_bytes, const Program& program) {
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    EmulationCounters counters;
    const CountingScope counting(counters);
    HostBlock<State> exec(warps, shared_bytes);
    for (int64_t block = begin; block < end; ++block) {
      exec.reset();
      program(exec, block);
      exec.finish();
    }
    emulation_totals().add(counters);
  });
}

}  // namespace warp
}  // namespace linattn
