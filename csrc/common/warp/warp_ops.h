// The warp operations tensor-core kernels are written against, in two implementations: inline PTX
// on the device, and on the host an emulation that reproduces the PTX ISA's semantics lane by
// lane (fragment layouts of ldmatrix and mma.m16n8k16, shfl.sync, cp.async commit groups), while
// counting what the static checks report (emulation.h). See lanes.h for the programming model.
//
// Per-lane operations (cp_async_16, load_global, store_global) are called inside for_lanes with
// one lane's scalars; warp-collective ones (ldmatrix, mma, shuffles, cp.async commit/wait) with
// whole Lanes values, by every lane of the warp at once.
#pragma once

#include "lanes.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#if !defined(__CUDA_ARCH__)
#include "emulation.h"

#include <algorithm>
#include <cstring>
#endif

namespace linattn {
namespace warp {

// --- 16-bit pairs ------------------------------------------------------------------------------

// Two values of a 16-bit type packed as one register, `lo` in the low half (round to nearest even).
template <typename half_t>
LINATTN_HD inline uint32_t pack(float lo, float hi) {
  return static_cast<uint32_t>(half_t(lo).x) | (static_cast<uint32_t>(half_t(hi).x) << 16);
}
template <typename half_t>
LINATTN_HD inline float unpack_lo(uint32_t pair) {
  return static_cast<float>(half_t(static_cast<uint16_t>(pair & 0xffffu), typename half_t::from_bits_t()));
}
template <typename half_t>
LINATTN_HD inline float unpack_hi(uint32_t pair) {
  return static_cast<float>(half_t(static_cast<uint16_t>(pair >> 16), typename half_t::from_bits_t()));
}

// e^x in fp32: the device's fast exponential (ex2.approx), std::exp on the host.
LINATTN_HD inline float exp_of(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

// x rounded to the 16-bit type as pack rounds it, back in fp32.
template <typename half_t>
LINATTN_HD inline float round_to(float x) {
  return static_cast<float>(half_t(x));
}

// --- fp32 bits ---------------------------------------------------------------------------------
// Tests and scales by a float's bits: no fast-math assumption can fold them, and they cost no
// registers where frexp / ldexp did.

LINATTN_HD inline uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}
LINATTN_HD inline float float_of(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// Whether x is neither Inf nor NaN (by its exponent bits).
LINATTN_HD inline bool finite_float(float x) { return (bits_of(x) & 0x7f800000u) != 0x7f800000u; }

// The smallest power of two σ >= 1 with bound / σ <= limit (a power of two); 1 where the bound is
// within it, Inf or NaN. For bound / limit = 1.m · 2^e (e >= 0), σ = 2^(e + 1): the exponent field
// plus one over a zero mantissa.
LINATTN_HD inline float power_of_two_above(float bound, float limit) {
  if (!(bound > limit) || !finite_float(bound)) return 1.0f;
  const float ratio = bound * (1.0f / limit);  // (exact: a power of two)
  return float_of(((bits_of(ratio) >> 23) + 1u) << 23);
}

// A power of two near √x for a finite x > 0: 2^(e / 2) for x = 1.m · 2^e (e / 2 rounded toward 0).
LINATTN_HD inline float power_of_two_near_square_root(float x) {
  const int exponent = static_cast<int>((bits_of(x) >> 23) & 0xffu) - 127;
  return float_of(static_cast<uint32_t>(exponent / 2 + 127) << 23);
}

// 16 bytes of shared memory as four 32-bit words: one 16-byte access (load_shared, store_shared)
// where four 4-byte ones would each pay an instruction and, stores between loads, their order.
struct alignas(16) Words4 {
  uint32_t word[4];
};

#if defined(__CUDA_ARCH__)
// --- device: inline PTX -----------------------------------------------------------------------

__device__ inline uint32_t shared_address(const WarpContext& w, uint32_t offset) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(w.shared)) + offset;
}

// ldmatrix .x4 / .x2 (.trans): lane l gives the address of row l % 8 of matrix l / 8.
template <bool kTranspose>
__device__ inline void ldmatrix_x4(const WarpContext& w, Fragment (&r)[4], const Lanes<uint32_t>& offset) {
  const uint32_t address = shared_address(w, offset.value);
  if (kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0].value), "=r"(r[1].value), "=r"(r[2].value), "=r"(r[3].value) : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0].value), "=r"(r[1].value), "=r"(r[2].value), "=r"(r[3].value) : "r"(address));
  }
}
template <bool kTranspose>
__device__ inline void ldmatrix_x2(const WarpContext& w, Fragment (&r)[2], const Lanes<uint32_t>& offset) {
  const uint32_t address = shared_address(w, offset.value);
  if (kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0].value), "=r"(r[1].value) : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0].value), "=r"(r[1].value) : "r"(address));
  }
}

// d += a · b, m16n8k16, 16-bit inputs (half_t: c10::BFloat16 or c10::Half), fp32 accumulation.
template <typename half_t>
__device__ inline void mma_16816(Accumulator (&d)[4], const Fragment (&a)[4], const Fragment (&b)[2]) {
  if constexpr (std::is_same_v<half_t, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0].value), "+f"(d[1].value), "+f"(d[2].value), "+f"(d[3].value)
        : "r"(a[0].value), "r"(a[1].value), "r"(a[2].value), "r"(a[3].value), "r"(b[0].value), "r"(b[1].value));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0].value), "+f"(d[1].value), "+f"(d[2].value), "+f"(d[3].value)
        : "r"(a[0].value), "r"(a[1].value), "r"(a[2].value), "r"(a[3].value), "r"(b[0].value), "r"(b[1].value));
  }
}

// The warp's lanes meet: shared-memory writes of each are visible to all.
__device__ inline void sync(const WarpContext&) { __syncwarp(); }

// Lane `source`'s value of x, for every lane.
__device__ inline Lanes<float> shuffle(const WarpContext&, const Lanes<float>& x, const Lanes<int>& source) {
  return Lanes<float>{__shfl_sync(0xffffffffu, x.value, source.value)};
}

// One lane's 16-byte copy to shared memory, of which `source_bytes` (0 or 16) come from global
// memory and the rest are zero-filled. Lands before the matching cp_async_wait.
__device__ inline void cp_async_16(const WarpContext& w, uint32_t shared_offset, const void* source,
                                   int source_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(w, shared_offset)),
               "l"(source), "r"(source_bytes));
}
__device__ inline void cp_async_commit(const WarpContext&) { asm volatile("cp.async.commit_group;\n" ::); }
template <int kKeep>
__device__ inline void cp_async_wait(const WarpContext&) {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kKeep));
}

// One lane's plain global load and store.
template <typename T>
__device__ inline T load_global(const WarpContext&, const T* p) { return *p; }
template <typename T>
__device__ inline void store_global(const WarpContext&, T* p, T value) { *p = value; }

// One lane's shared-memory store (16-bit pairs and fp32 scalars written outside ldmatrix).
template <typename T>
__device__ inline void store_shared(const WarpContext& w, uint32_t offset, T value) {
  *reinterpret_cast<T*>(w.shared + offset) = value;
}
template <typename T>
__device__ inline T load_shared(const WarpContext& w, uint32_t offset) {
  return *reinterpret_cast<const T*>(w.shared + offset);
}

// fp32 atomic add to global memory (red.global.add.f32): the order of the additions is not fixed.
__device__ inline void atomic_add_global(const WarpContext&, float* p, float value) { atomicAdd(p, value); }

#else
// --- host: the emulation ----------------------------------------------------------------------

namespace detail {
inline EmulationCounters& counters() {
  static thread_local EmulationCounters unused;  // code run outside an emulated block counts nowhere
  return current_counters != nullptr ? *current_counters : unused;
}

inline void check_shared(const WarpContext& w, uint32_t offset, int bytes, int alignment) {
  if (offset % alignment != 0) emulation_fault("warp emulation: misaligned shared-memory address");
  if (static_cast<int64_t>(offset) + bytes > w.pending->shared_bytes)
    emulation_fault("warp emulation: shared-memory access out of bounds");
}
}  // namespace detail

// One lane's shared-memory store and load, checked for alignment and bounds.
template <typename T>
inline void store_shared(const WarpContext& w, uint32_t offset, T value) {
  detail::check_shared(w, offset, sizeof(T), sizeof(T));
  std::memcpy(w.shared + offset, &value, sizeof(T));
}
template <typename T>
inline T load_shared(const WarpContext& w, uint32_t offset) {
  detail::check_shared(w, offset, sizeof(T), sizeof(T));
  T value;
  std::memcpy(&value, w.shared + offset, sizeof(T));
  return value;
}

namespace detail {
// The wavefronts one 8x8 matrix (8 row addresses of 16 bytes) takes: the most distinct 4-byte
// words any of the 32 banks must serve.
inline int wavefronts(const uint32_t (&rows)[8]) {
  uint32_t words[32][8];
  int count[32] = {};
  int most = 1;
  for (int r = 0; r < 8; ++r) {
    for (int part = 0; part < 4; ++part) {
      const uint32_t word = rows[r] / 4 + part, bank = word % 32;
      bool seen = false;
      for (int i = 0; i < count[bank]; ++i) seen = seen || words[bank][i] == word;
      if (!seen) words[bank][count[bank]++] = word;
      most = std::max(most, count[bank]);
    }
  }
  return most;
}


// Matrix m of an ldmatrix: the registers lanes receive (PTX ISA, "ldmatrix": without .trans lane
// l holds row l / 4, columns 2(l % 4) and 2(l % 4) + 1; with .trans the transposed positions).
template <bool kTranspose>
inline void load_matrix(const WarpContext& w, Fragment& r, const Lanes<uint32_t>& offset, int m) {
  uint32_t rows[8];
  for (int i = 0; i < 8; ++i) {
    rows[i] = offset[m * 8 + i];
    check_shared(w, rows[i], 16, 16);
  }
  EmulationCounters& c = counters();
  c.ldmatrix_matrices += 1;
  c.ldmatrix_wavefronts += wavefronts(rows);
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int g = group_of(lane), t = thread_in_group(lane);
    uint16_t lo, hi;
    if (kTranspose) {
      lo = load_shared<uint16_t>(w, rows[2 * t] + 2 * g);
      hi = load_shared<uint16_t>(w, rows[2 * t + 1] + 2 * g);
    } else {
      lo = load_shared<uint16_t>(w, rows[g] + 4 * t);
      hi = load_shared<uint16_t>(w, rows[g] + 4 * t + 2);
    }
    r[lane] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}
}  // namespace detail

template <bool kTranspose>
inline void ldmatrix_x4(const WarpContext& w, Fragment (&r)[4], const Lanes<uint32_t>& offset) {
  for (int m = 0; m < 4; ++m) detail::load_matrix<kTranspose>(w, r[m], offset, m);
}
template <bool kTranspose>
inline void ldmatrix_x2(const WarpContext& w, Fragment (&r)[2], const Lanes<uint32_t>& offset) {
  for (int m = 0; m < 2; ++m) detail::load_matrix<kTranspose>(w, r[m], offset, m);
}

// The element (row, col) of an mma operand, from the registers that hold it (PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type"):
//   A 16x16: a[i] holds row g + 8 (i % 2), columns 2t + 8 (i / 2) + {0, 1}
//   B 16x8:  b[i] holds rows 2t + 8 i + {0, 1}, column g
//   C 16x8:  c[i] holds row g + 8 (i / 2), column 2t + i % 2
// with g = lane / 4 and t = lane % 4.
template <typename half_t>
inline void mma_16816(Accumulator (&d)[4], const Fragment (&a)[4], const Fragment (&b)[2]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int g = group_of(lane), t = thread_in_group(lane);
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
      A[row][col] = unpack_lo<half_t>(a[i][lane]);
      A[row][col + 1] = unpack_hi<half_t>(a[i][lane]);
    }
    for (int i = 0; i < 2; ++i) {
      const int row = 2 * t + 8 * i;
      B[row][g] = unpack_lo<half_t>(b[i][lane]);
      B[row + 1][g] = unpack_hi<half_t>(b[i][lane]);
    }
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int g = group_of(lane), t = thread_in_group(lane);
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      float sum = 0;  // the products of 16-bit values are exact in fp32
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      d[i][lane] += sum;
    }
  }
  detail::counters().mma += 1;
}

// The emulation runs a warp's lanes one after another between warp operations: nothing to wait for.
inline void sync(const WarpContext&) {}

inline Lanes<float> shuffle(const WarpContext&, const Lanes<float>& x, const Lanes<int>& source) {
  Lanes<float> result;
  for (int lane = 0; lane < kWarpSize; ++lane) result[lane] = x[source[lane] & (kWarpSize - 1)];
  detail::counters().shuffles += 1;
  return result;
}

inline void cp_async_16(const WarpContext& w, uint32_t shared_offset, const void* source, int source_bytes) {
  detail::check_shared(w, shared_offset, 16, 16);
  if (source_bytes != 0 && source_bytes != 16) emulation_fault("warp emulation: cp.async source bytes not 0 or 16");
  if (reinterpret_cast<uintptr_t>(source) % 16 != 0)  // even with nothing to read (PTX: aligned to the copy size)
    emulation_fault("warp emulation: misaligned cp.async source");
  w.pending->open.push_back({shared_offset, static_cast<const unsigned char*>(source), 16, source_bytes});
  detail::counters().global_read_bytes += source_bytes;
}
// cp.async is per thread, its groups too; every lane of a warp commits and waits together, so
// the emulation keeps one queue per warp.
inline void cp_async_commit(const WarpContext& w) { w.pending->commit(); }
template <int kKeep>
inline void cp_async_wait(const WarpContext& w) {
  w.pending->wait(kKeep);
}

template <typename T>
inline T load_global(const WarpContext&, const T* p) {
  detail::counters().global_read_bytes += sizeof(T);
  return *p;
}
template <typename T>
inline void store_global(const WarpContext&, T* p, T value) {
  detail::counters().global_write_bytes += sizeof(T);
  *p = value;
}

// Blocks emulated on several CPU threads may add to the same float: a compare-and-swap loop.
inline void atomic_add_global(const WarpContext&, float* p, float value) {
  detail::counters().global_write_bytes += sizeof(float);
  uint32_t* bits = reinterpret_cast<uint32_t*>(p);
  uint32_t expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    float current;
    std::memcpy(&current, &expected, sizeof(float));
    const float sum = current + value;
    uint32_t desired;
    std::memcpy(&desired, &sum, sizeof(float));
    if (__atomic_compare_exchange_n(bits, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return;
  }
}

#endif

// One lane's pair of 16-bit columns c, c + 1 of a row (x0, x1 rounded to T): one 4-byte store
// when `paired` (the caller's promise that the row's dim is even, so the address is 4-byte
// aligned, and that c + 1 < dim), else each column below `dim` on its own.
template <typename T>
LINATTN_HD inline void store_column_pair(const WarpContext& w, T* row, int64_t c, int64_t dim, bool paired, float x0,
                                         float x1) {
  if (paired) {
    store_global(w, reinterpret_cast<uint32_t*>(row + c), pack<T>(x0, x1));
    return;
  }
  if (c < dim) store_global(w, row + c, T(x0));
  if (c + 1 < dim) store_global(w, row + c + 1, T(x1));
}

}  // namespace warp
}  // namespace linattn
