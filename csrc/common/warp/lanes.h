// A warp's registers, written once for the GPU and the CPU (docs/architecture.md, "One kernel
// source"). Kernel code built on the warp-operation layer (warp_ops.h) is written per warp: a
// value that differs between lanes is a Lanes<T>, and per-lane code runs inside
// for_lanes(warp, [&](int lane) { ... x[lane] ... }).
//   - On the device (__CUDA_ARCH__) a Lanes<T> is the calling thread's own register and
//     for_lanes runs the body once, for the thread's lane.
//   - On the host a Lanes<T> holds all 32 lanes' values and for_lanes runs the body for lane
//     0, 1, ..., 31 in turn. Warp-collective operations (ldmatrix, mma, shuffles) then see every
//     lane's registers at once and reproduce the PTX ISA's fragment layouts exactly.
// The CPU emulation thereby executes the very index arithmetic, masks and fragment shuffles the
// GPU runs; only the arithmetic inside one mma differs in the order of its fp32 additions.
#pragma once

#include "../host_device.h"

#include <cstdint>

namespace linattn {
namespace warp {

constexpr int kWarpSize = 32;

#if defined(__CUDA_ARCH__)
template <typename T>
struct Lanes {
  T value;
  __device__ T& operator[](int) { return value; }
  __device__ const T& operator[](int) const { return value; }
};
#else
template <typename T>
struct Lanes {
  T value[kWarpSize];
  T& operator[](int lane) { return value[lane]; }
  const T& operator[](int lane) const { return value[lane]; }
};
#endif

// Two 16-bit values packed as one 32-bit register (the operand type of ldmatrix and mma).
using Fragment = Lanes<uint32_t>;
// One fp32 accumulator register.
using Accumulator = Lanes<float>;

// What a warp knows about itself and its block's shared memory. Shared memory is addressed by
// byte offsets from the block's base (on the device converted to the shared window for PTX).
struct PendingCopies;  // the host's not yet landed cp.async copies of one warp (emulation.h)
struct WarpContext {
  unsigned char* shared = nullptr;  // the block's shared memory
  int warp = 0;                     // warp index in the block
#if defined(__CUDA_ARCH__)
  int lane = 0;
#else
  PendingCopies* pending = nullptr;
#endif
};

// Runs body(lane) for the calling thread's lane (device) or for every lane in turn (host).
template <typename Body>
LINATTN_HD void for_lanes(const WarpContext& w, Body&& body) {
#if defined(__CUDA_ARCH__)
  body(w.lane);
#else
  (void)w;
  for (int lane = 0; lane < kWarpSize; ++lane) body(lane);
#endif
}

// x, which the device compiler may not take for any other computation of the same value: an
// index used at a kernel's start and again at its end is then recomputed at the end instead of
// being kept live (or spilled) across the whole kernel.
LINATTN_HD inline int opaque(int x) {
#if defined(__CUDA_ARCH__)
  int result;
  asm volatile("mov.b32 %0, %1;" : "=r"(result) : "r"(x));
  return result;
#else
  return x;
#endif
}

// A warp-uniform x (a warp index) as the device compiler then knows it is: lane 0's, broadcast. A
// branch on it is a uniform branch, without the reconvergence barrier (BSSY/BSYNC) a possibly
// divergent one costs around each mma inside it.
LINATTN_HD inline int uniform(int x) {
#if defined(__CUDA_ARCH__)
  return __shfl_sync(0xffffffffu, x, 0);
#else
  return x;
#endif
}

// Both: opaque (above) and known to be warp-uniform.
LINATTN_HD inline int opaque_uniform(int x) { return uniform(opaque(x)); }

// The mma fragment coordinates of a lane (PTX ISA, "Matrix Fragments for mma.m16n8k16"):
// group = lane / 4 selects the row (A, C) or column (B), thread = lane % 4 the pair of columns
// (A, C) or rows (B).
LINATTN_HD inline int group_of(int lane) { return lane >> 2; }
LINATTN_HD inline int thread_in_group(int lane) { return lane & 3; }

}  // namespace warp
}  // namespace linattn
