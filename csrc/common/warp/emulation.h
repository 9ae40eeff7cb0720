// The host side of the warp-operation layer: what the CPU keeps to emulate a warp that the GPU
// keeps in hardware (copies in flight), and what it counts while emulating (the figures the
// kernels' static checks report: tensor-core instructions, shared-memory bank conflicts, global
// memory traffic). Host-only; the device never includes this file.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <vector>

namespace linattn {
namespace warp {

// What the emulation of one block counted. Every emulated block adds its figures to the
// process-wide totals (emulation_totals), which linattn::_warp_emulation_counters reads.
struct EmulationCounters {
  int64_t mma = 0;                  // mma.sync instructions
  int64_t ldmatrix_matrices = 0;    // 8x8 matrices loaded by ldmatrix
  int64_t ldmatrix_wavefronts = 0;  // shared-memory wavefronts they took (= matrices without conflicts)
  int64_t shuffles = 0;             // shfl.sync instructions
  int64_t global_read_bytes = 0;    // bytes read from global memory (cp.async source bytes and loads)
  int64_t global_write_bytes = 0;   // bytes stored to global memory

  void add(const EmulationCounters& o) {
    mma += o.mma;
    ldmatrix_matrices += o.ldmatrix_matrices;
    ldmatrix_wavefronts += o.ldmatrix_wavefronts;
    shuffles += o.shuffles;
    global_read_bytes += o.global_read_bytes;
    global_write_bytes += o.global_write_bytes;
  }
};

// The counters of the block the calling CPU thread emulates (set by a CountingScope).
inline thread_local EmulationCounters* current_counters = nullptr;

// Counts into `c` while alive (on this CPU thread), whether the block ends or throws.
struct CountingScope {
  explicit CountingScope(EmulationCounters& c) { current_counters = &c; }
  ~CountingScope() { current_counters = nullptr; }
  CountingScope(const CountingScope&) = delete;
  CountingScope& operator=(const CountingScope&) = delete;
};

// Process-wide totals since the last reset.
struct EmulationTotals {
  std::atomic<int64_t> values[6] = {};
  void add(const EmulationCounters& c) {
    const int64_t v[6] = {c.mma, c.ldmatrix_matrices, c.ldmatrix_wavefronts, c.shuffles, c.global_read_bytes,
                          c.global_write_bytes};
    for (int i = 0; i < 6; ++i) values[i].fetch_add(v[i], std::memory_order_relaxed);
  }
};
EmulationTotals& emulation_totals();  // emulation.cpp

// One cp.async copy: `bytes` to shared memory, of which the first `source_bytes` come from
// global memory and the rest are zero (the PTX src-size operand).
struct AsyncCopy {
  uint32_t shared_offset;
  const unsigned char* source;
  int bytes, source_bytes;
};

// A warp's cp.async copies not yet landed, in commit groups, oldest first; `open` collects the
// copies issued since the last commit. The GPU lands a copy at some time before the matching
// cp.async.wait_group; the emulation lands it exactly then, so a kernel that reads shared memory
// before waiting reads the NaN the block started with (or the previous chunk) and fails its tests.
struct PendingCopies {
  unsigned char* shared = nullptr;
  int64_t shared_bytes = 0;
  std::vector<AsyncCopy> open;
  std::deque<std::vector<AsyncCopy>> committed;

  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  // Lands every committed group but the newest `keep`.
  void wait(int keep) {
    while (static_cast<int>(committed.size()) > keep) {
      for (const AsyncCopy& c : committed.front()) {
        std::memcpy(shared + c.shared_offset, c.source, c.source_bytes);
        std::memset(shared + c.shared_offset + c.source_bytes, 0, c.bytes - c.source_bytes);
      }
      committed.pop_front();
    }
  }
  bool idle() const { return open.empty() && committed.empty(); }
};

[[noreturn]] inline void emulation_fault(const char* what) { throw std::runtime_error(what); }

}  // namespace warp
}  // namespace linattn
