// The delta rule's decoding step as a column program, written once for the CUDA kernel
// (step_cuda_kernels.cu: one thread per value column) and its CPU emulation (step_emulated.cpp):
// value column c of one (batch, head)'s state is read twice — the prediction S'ᵀk, then the
// update fused with the read-out — and written once:
//   S' = e^g S,   S'' = S' + β k (v − S'ᵀ k)ᵀ,   out = scale · S''ᵀ q      (step.cpp)
// (per key channel, row r of S fades by e^{g_r}).
// Every column is independent of the others, so neighbouring threads read neighbouring state
// elements (coalesced) and q, k are the same addresses for all (broadcast). Raw pointers only.
#pragma once

#include "../common/host_device.h"

#include <cmath>
#include <cstdint>

namespace linattn {
namespace delta_step {

template <typename scalar_t>
struct StepProblem {
  int64_t batch = 0, heads = 0, key_dim = 0, value_dim = 0;
  const scalar_t *q = nullptr, *k = nullptr, *v = nullptr;
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {};  // (B, H, d) strides in elements
  const float* beta = nullptr;      // (B, H) contiguous
  const float* log_gate = nullptr;  // (B, H) or (B, H, dk) contiguous, or null
  int64_t gate_width = 1;           // 1, or dk: one gate per key channel
  const float* state = nullptr;     // (B, H, dk, dv) contiguous
  float* new_state = nullptr;       // (B, H, dk, dv) contiguous
  scalar_t* out = nullptr;          // (B, H, dv) contiguous
  float scale = 1.0f;
};

// Column c of (batch, head) bh.
template <typename scalar_t>
LINATTN_HD void step_column(const StepProblem<scalar_t>& p, int64_t bh, int64_t c) {
  const int64_t b = bh / p.heads, h = bh % p.heads, dk = p.key_dim, dv = p.value_dim;
  const scalar_t* q = p.q + b * p.q_stride[0] + h * p.q_stride[1];
  const scalar_t* k = p.k + b * p.k_stride[0] + h * p.k_stride[1];
  const float* gate = p.log_gate != nullptr ? p.log_gate + bh * p.gate_width : nullptr;
  const float head_factor = gate != nullptr ? ::expf(gate[0]) : 1.0f;
  const bool per_channel = gate != nullptr && p.gate_width > 1;
  // Row r's factor: the head's, or its channel's (recomputed in the second pass: no dk-sized array).
  const auto factor = [&](int64_t r) { return per_channel ? ::expf(gate[r]) : head_factor; };
  const float* S = p.state + bh * dk * dv + c;
  float* updated = p.new_state + bh * dk * dv + c;
  float predicted = 0.0f;
  for (int64_t r = 0; r < dk; ++r) predicted += static_cast<float>(k[r * p.k_stride[2]]) * factor(r) * S[r * dv];
  const float v = static_cast<float>(p.v[b * p.v_stride[0] + h * p.v_stride[1] + c * p.v_stride[2]]);
  const float correction = p.beta[bh] * (v - predicted);
  float read = 0.0f;
  for (int64_t r = 0; r < dk; ++r) {
    const float x = factor(r) * S[r * dv] + static_cast<float>(k[r * p.k_stride[2]]) * correction;
    updated[r * dv] = x;
    read += static_cast<float>(q[r * p.q_stride[2]]) * x;
  }
  p.out[bh * dv + c] = scalar_t(p.scale * read);
}

}  // namespace delta_step
}  // namespace linattn
