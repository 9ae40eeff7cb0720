// Host-side settings shared by the tensor-core engines (linear attention's forward, the
// restricted-softmax flash engine): the switch that keeps 16-bit inputs off them, which tensors
// copy in 16-byte pieces, and the GPU the CPU emulation stands for. Host code only (ATen).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace linattn {
namespace warp {

// LINATTN_TENSOR_CORES=0 keeps bf16/fp16 off the tensor-core kernels (comparisons, benchmarks).
inline bool tensor_cores_enabled() {
  const char* text = std::getenv("LINATTN_TENSOR_CORES");
  return text == nullptr || std::strcmp(text, "0") != 0;
}

// Whether 8 columns of every row of a (B, H, T, D) tensor load as one aligned 16-byte copy.
template <typename scalar_t>
bool vector_rows(const at::Tensor& t) {
  if (t.stride(3) != 1 && t.size(3) > 1) return false;
  for (int d = 0; d < 3; ++d)
    if (t.stride(d) % 8 != 0 && t.size(d) > 1) return false;
  return reinterpret_cast<uintptr_t>(t.const_data_ptr<scalar_t>()) % 16 == 0;
}

// Shared memory per block of the GPU the emulation stands for: an H100's 227 KiB, so the same
// kernels and chunk lengths are chosen, unless LINATTN_EMULATED_SHARED_BYTES names another (tests
// emulate an A100's 163 KiB or less, to run the shorter chunks and the too-large case).
inline int64_t emulated_shared_bytes() {
  const char* text = std::getenv("LINATTN_EMULATED_SHARED_BYTES");
  return text != nullptr ? std::strtoll(text, nullptr, 10) : 227 * 1024;
}

// The SMs of that GPU: an H100's 132 unless LINATTN_EMULATED_SMS names another.
inline int64_t emulated_processors() {
  const char* text = std::getenv("LINATTN_EMULATED_SMS");
  return text != nullptr ? std::strtoll(text, nullptr, 10) : 132;
}

}  // namespace warp
}  // namespace linattn
