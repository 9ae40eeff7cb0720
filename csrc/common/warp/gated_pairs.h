// Pair weights under gates per channel, for the tensor-core kernels of the delta rule (Kimi Delta
// Attention) and of linear attention (GLA): for rows x_i and y_j of a chunk and its cumulative
// log-gates G (one per row and channel), w_ij = Σ_c x_ic y_jc e^{G_ic − G_jc}. No single factor
// e^{G_ic} · e^{−G_jc} survives strong gates (e^{−G} grows without bound down a chunk), so:
//   - between two different 16-row blocks, on tensor cores, the exponent is split through the
//     later block's first row r: x_i e^{G_i − G_r} and y_j e^{G_r − G_j} (i >= r > j), each factor
//     <= 1 where the log-gates are <= 0 (logs of forget gates) — no 16-bit operand overflows;
//   - within a 16-row block, in fp32 with an exponential per channel.
#pragma once

#include "operand_factors.h"

namespace linattn {
namespace warp {

// A chunk's cumulative log-gates G in shared memory: fp32, row r's channel c at
// kOrigin + (r · kPitch + c) · 4 bytes (kPitch floats a row). Compile-time, as every address the
// helpers below form from it: the kernels' registers are what bounds them.
template <int kOrigin, int kPitch>
struct ChannelGates {
  LINATTN_HD static constexpr int at_offset(int r, int c) { return kOrigin + (r * kPitch + c) * 4; }
  LINATTN_HD static float at(const WarpContext& w, int r, int c) {
    return load_shared<float>(w, static_cast<uint32_t>(at_offset(r, c)));
  }
};

// G of a chunk's kRows rows into `G`: the threads of channels 0 .. kChannels − 1 take one each down
// the rows, summing `gates` (row r's channel c at gates[r · row_stride + c]) over the first
// valid_rows rows and `channels` channels (0 past them, so G_last is the last valid row's); each
// gate passes through take(r, g) first (the delta rule's forward flags a non-finite one there).
template <int kRows, int kChannels, typename Gates, typename Take>
LINATTN_HD void load_cumulative_gates(const WarpContext& w, Gates, const float* gates, int64_t row_stride,
                                      int valid_rows, int64_t channels, const Take& take) {
  if (w.warp * kWarpSize >= kChannels) return;
  for_lanes(w, [&](int lane) {
    const int c = w.warp * kWarpSize + lane;
    const int valid = c < channels ? valid_rows : 0;
    float total = 0.0f;
    LINATTN_UNROLL_BY_4
    for (int r = 0; r < kRows; ++r) {
      total += take(r, r < valid ? load_global(w, gates + r * row_stride + c) : 0.0f);
      store_shared<float>(w, static_cast<uint32_t>(Gates::at_offset(r, c)), total);
    }
  });
}

// w_ij for row xr of the 16-bit rows at `x` and row yr of those at `y` (kRowPitch bytes a row), over
// the first `channels` channels, in fp32 (an odd channel count's last pair holds a zero column).
template <typename half_t, int kRowPitch, typename Gates>
LINATTN_HD float gated_pair_weight(const WarpContext& w, Gates G, int channels, uint32_t x, int xr, uint32_t y,
                                   int yr) {
  constexpr int pitch = kRowPitch;
  float sum = 0.0f;
  for (int c = 0; c < channels; c += 2) {
    const uint32_t xs = load_shared<uint32_t>(w, x + static_cast<uint32_t>(xr * pitch + c * 2));
    const uint32_t ys = load_shared<uint32_t>(w, y + static_cast<uint32_t>(yr * pitch + c * 2));
    sum += unpack_lo<half_t>(xs) * unpack_lo<half_t>(ys) * exp_of(G.at(w, xr, c) - G.at(w, yr, c));
    sum += unpack_hi<half_t>(xs) * unpack_hi<half_t>(ys) * exp_of(G.at(w, xr, c + 1) - G.at(w, yr, c + 1));
  }
  return sum;
}

// acc's tiles first, first + 1 (rows 16·mb.. of the rows at `m` × rows 16·nb.. of the rows at `n`,
// kRowPitch bytes a row, DK channels) += the pair weights of two different 16-row blocks (mb != nb),
// on tensor cores, split through the later block's first row.
template <typename half_t, int DK, int kRowPitch, typename Gates, int kTiles>
LINATTN_HD void gated_pair_block(const WarpContext& w, Gates G, Accumulator (&acc)[kTiles][4], int first, uint32_t m,
                                 int mb, uint32_t n, int nb) {
  constexpr int pitch = kRowPitch;
  const int ref = (mb > nb ? mb : nb) * 16;
  const float m_sign = mb > nb ? 1.0f : -1.0f;  // the m rows' factor is e^{m_sign (G − G_r)}
  LINATTN_NO_UNROLL  // (the key steps rolled: registers, not instructions, bound these kernels)
  for (int ks = 0; ks < DK / 16; ++ks) {
    Fragment a[4];
    rows_as_a_operand(w, m + mb * 16 * pitch + ks * 32, pitch, a);
    scale_a_operand<half_t>(w, a, [&](int r, int c) {
      return exp_of(m_sign * (G.at(w, mb * 16 + r, ks * 16 + c) - G.at(w, ref, ks * 16 + c)));
    });
    LINATTN_UNROLL
    for (int half = 0; half < 2; ++half) {
      Fragment bf[2];
      rows_as_b_operand_transposed(w, n + (nb * 16 + half * 8) * pitch + ks * 32, pitch, bf);
      scale_b_operand<half_t>(w, bf, [&](int c, int j) {
        return exp_of(m_sign * (G.at(w, ref, ks * 16 + c) - G.at(w, nb * 16 + half * 8 + j, ks * 16 + c)));
      });
      mma_16816<half_t>(acc[first + half], a, bf);
    }
  }
}

}  // namespace warp
}  // namespace linattn
