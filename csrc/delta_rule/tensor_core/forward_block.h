// One block of the delta rule's tensor-core forward (forward.h) as the operations its phases call:
// loading and normalising a chunk's rows, its gates, the UT transform, u, the outputs and the
// state update. Written per warp on the warp-operation layer (common/warp/).
#pragma once

#include "problem.h"
#include "../../linear_attention/tensor_core/forward_block.h"  // lower_scores
#include "../../common/warp/gated_pairs.h"
#include "../../common/warp/scan.h"

#include <cmath>
#include <limits>

namespace linattn {
namespace delta_tensor_core {

constexpr float kL2Eps = 1e-6f;  // x · (Σ x² + eps)^{-1/2}, as the CPU kernel and l2_normalize

using warp::exp_of;
using warp::finite_float;  // (by exponent bits: no fast-math assumption can fold it)

LINATTN_HD inline float quiet_nan() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7fc00000);
#else
  return std::numeric_limits<float>::quiet_NaN();
#endif
}

LINATTN_HD inline float inverse_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(x);
#else
  return 1.0f / std::sqrt(x);
#endif
}

// kKeep: the instance that keeps its walk for the backward (chunk_states, chunk_values), compiled
// apart so that the plain forward's registers do not carry it. kChannels: the instance for gates
// per key channel (Kimi Delta Attention; "gates per key channel" below says what changes).
template <typename scalar_t, int DK, int DV, bool kKeep = false, bool kChannels = false>
struct DeltaForwardBlock {
  using L = DeltaLayout<DK, DV, kChannels>;
  static constexpr bool kPerChannel = kChannels;
  using State = DeltaState<DK, DV>;
  static constexpr int kColsPerHalf = DV / 16;  // value n8 tiles per warp (two warps per row block)

  const DeltaForwardProblem<scalar_t>& p;
  // Block index = (state_index · value_tiles) + tile; state_index = (batch or sequence) · H + head.
  int64_t tile, state_index, b, h, col0;
  int64_t row0 = 0, rows = 0;  // the block's sequence: rows [row0, row0 + rows) of (b, h)
  int64_t token0 = 0;          // index of its first row in (B, H, T) per-token tensors
  Strided4<const scalar_t> v_tile;  // v from the tile's first column

  LINATTN_HD DeltaForwardBlock(const DeltaForwardProblem<scalar_t>& problem, int64_t index)
      : p(problem),
        tile(index % problem.value_tiles),
        state_index(index / problem.value_tiles),
        b(problem.offsets != nullptr ? 0 : state_index / problem.heads),
        h(state_index % problem.heads),
        col0(tile * DV),
        v_tile(problem.v) {
    v_tile.data += col0 * problem.v.stride[3];
    rows = problem.length;
    if (problem.offsets != nullptr) {
      const int64_t n = state_index / problem.heads;
      row0 = problem.offsets[n];
      rows = problem.offsets[n + 1] - row0;
    }
    token0 = (b * problem.heads + h) * problem.length + row0;
  }

  LINATTN_HD int64_t chunks() const { return (rows + kChunk - 1) / kChunk; }

  LINATTN_HD static uint32_t buffer(int64_t chunk) { return static_cast<uint32_t>((chunk & 1) * L::kBuffer); }
  LINATTN_HD bool gated() const { return p.log_gate != nullptr; }

  // fp32 values of shared memory: per-row arrays and the square matrices.
  LINATTN_HD static float row_value(const WarpContext& w, int array, int row) {
    return warp::load_shared<float>(w, static_cast<uint32_t>(array + row * 4));
  }
  LINATTN_HD static float square(const WarpContext& w, int matrix, int r, int c) {
    return warp::load_shared<float>(w, static_cast<uint32_t>(matrix + (r * L::kSquarePitch + c) * 4));
  }
  LINATTN_HD static void set_square(const WarpContext& w, int matrix, int r, int c, float x) {
    warp::store_shared<float>(w, static_cast<uint32_t>(matrix + (r * L::kSquarePitch + c) * 4), x);
  }

  // --- loads ---------------------------------------------------------------------------------

  // The tiles' rows end with the block's sequence.
  LINATTN_HD warp::RowTile<scalar_t> rows_of(int operand) const {
    const int64_t end = row0 + rows;
    if (operand == 0) return {&p.q, p.q_vector, end, p.key_dim, DK, L::kQKPitch, L::kQ};
    if (operand == 1) return {&p.k, p.k_vector, end, p.key_dim, DK, L::kQKPitch, L::kK};
    return {&v_tile, p.v_vector, end, p.value_dim - col0, DV, L::kVPitch, L::kV};
  }

  // Issues the copies of chunk `chunk` (its rows from `start` of the sequence; zeros past its end
  // and past the head dims, so those rows and columns add nothing): Q rows and/or K and V rows.
  LINATTN_HD void issue_chunk(const WarpContext& w, int64_t chunk, int64_t start, bool want_q, bool want_kv) const {
    const uint32_t base = buffer(chunk);
    if (want_q) warp::copy_rows<kThreads, kChunk>(w, rows_of(0), b, h, base, row0 + start);
    if (want_kv) {
      warp::copy_rows<kThreads, kChunk>(w, rows_of(1), b, h, base, row0 + start);
      warp::copy_rows<kThreads, kChunk>(w, rows_of(2), b, h, base, row0 + start);
    }
    warp::cp_async_commit(w);
  }

  // The chunk's β, G = cumulative log-gates, e^G and e^{G_last − G} (warp 0; rows past the end
  // have β = 0 and g = 0, so they change nothing and G_last is the last row's). With `screen` (the
  // forward), a row whose β or g is Inf or NaN is flagged and takes β = g = 0 (screen_rows says why).
  // Gates per key channel leave these rows' g at 0 (e^G = 1: T's forms fold in β alone) and load
  // their own (load_channel_gates).
  LINATTN_HD void load_gates(const WarpContext& w, int64_t start, bool screen) const {
    if (w.warp != 0) return;
    const int64_t first = token0 + start;
    Lanes<float> beta[2], g[2];
    warp::for_lanes(w, [&](int lane) {
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const bool valid = start + lane + 32 * half < rows;
        const int64_t at = first + lane + 32 * half;
        beta[half][lane] = valid ? warp::load_global(w, p.beta + at) : 0.0f;
        g[half][lane] = valid && gated() && !kChannels ? warp::load_global(w, p.log_gate + at) : 0.0f;
        if (!screen) continue;
        const bool bad = !finite_float(beta[half][lane]) || !finite_float(g[half][lane]);
        warp::store_shared<uint8_t>(w, static_cast<uint32_t>(L::kRowFlags + lane + 32 * half), bad ? 1 : 0);
        if (bad) beta[half][lane] = g[half][lane] = 0.0f;
      }
    });
    const Lanes<float> total = warp::inclusive_scan_64(w, g);
    warp::for_lanes(w, [&](int lane) {
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const uint32_t at = static_cast<uint32_t>((lane + 32 * half) * 4);
        warp::store_shared<float>(w, L::kBeta + at, beta[half][lane]);
        warp::store_shared<float>(w, L::kG + at, g[half][lane]);
        warp::store_shared<float>(w, L::kExpG + at, gated() ? exp_of(g[half][lane]) : 1.0f);
        warp::store_shared<float>(w, L::kDecay + at, gated() ? exp_of(total[lane] - g[half][lane]) : 1.0f);
      }
    });
  }

  // --- gates per key channel (kChannels) --------------------------------------------------------
  // Row c of the state forgets at its own rate, so the chunk's G is a matrix, G_rc = g_0c + … + g_rc
  // (fp32 in shared memory), and each factor the per-token kernel applies to a product's rows moves
  // inside the product as an operand's elementwise factor (warp/operand_factors.h): e^G ⊙ Q for Q S0,
  // K ⊙ e^G for W = Tu (K ⊙ e^G), K ⊙ e^{G_last − G} for the state's update, S0's row c faded by
  // e^{G_last,c}; and the pair weights Σ_c x_ic y_jc e^{G_ic − G_jc} of A and of the scores on tensor
  // cores between 16-row blocks (pair_block), in fp32 within them (diagonal_pairs; both through
  // warp/gated_pairs.h). Where the log-gates are <= 0 (logs of forget gates) no factor exceeds 1: no
  // 16-bit operand overflows.

  LINATTN_HD static float gate_sum(const WarpContext& w, int r, int c) { return Gates::at(w, r, c); }

  // G for the chunk's rows from `start` of the sequence: threads 0 .. DK − 1 take a channel each
  // down the rows (zeros past the sequence and the key dim). With `screen` (the forward), a row with
  // an Inf or NaN gate is flagged and its gate taken as 0, as load_gates does for β.
  LINATTN_HD void load_channel_gates(const WarpContext& w, int64_t start, bool screen) const {
    if constexpr (kChannels) {
      const int64_t left = rows - start;
      auto take = [&](int r, float g) {
        if (!screen || finite_float(g)) return g;
        warp::store_shared<uint8_t>(w, static_cast<uint32_t>(L::kRowFlags + r), 1);
        return 0.0f;
      };
      warp::load_cumulative_gates<kChunk, DK>(w, gates(), p.log_gate + (token0 + start) * p.key_dim, p.key_dim,
                                              static_cast<int>(left < kChunk ? left : kChunk), p.key_dim, take);
    }
  }

  // The chunk's G as the shared pair-weight helpers read it (common/warp/gated_pairs.h).
  using Gates = warp::ChannelGates<L::kGates, L::kGatePitch>;
  LINATTN_HD static constexpr Gates gates() { return {}; }

  // Σ_c x_c y_c e^{G_xc − G_yc} over the key channels, x row xr of the 16-bit rows at `x`, y row yr
  // at `y`, in fp32 (gated_pair_weight).
  LINATTN_HD float pair_weight(const WarpContext& w, uint32_t x, int xr, uint32_t y, int yr) const {
    return warp::gated_pair_weight<scalar_t, L::kQKPitch>(w, gates(), static_cast<int>(p.key_dim), x, xr, y, yr);
  }

  // acc's tiles first, first + 1 (rows 16·mb.. of the rows at `m` × rows 16·nb.. of the rows at `n`)
  // += the pair weights of two different 16-row blocks, on tensor cores (gated_pair_block).
  template <int kTiles>
  LINATTN_HD void pair_block(const WarpContext& w, Accumulator (&acc)[kTiles][4], int first, uint32_t m, int mb,
                             uint32_t n, int nb) const {
    warp::gated_pair_block<scalar_t, DK, L::kQKPitch>(w, gates(), acc, first, m, mb, n, nb);
  }

  // The diagonal blocks of the causal scores' pair weights, D_ij = Σ_c q_ic k_jc e^{G_ic − G_jc} for
  // j <= i in the same 16-row block (0 elsewhere in the block), to A's square (free once the
  // doubling has read A): the forward's output reads D, the backward walk Dᵀ.
  LINATTN_HD void diagonal_pairs(const WarpContext& w, uint32_t base) const {
    warp::each_block_element<kThreads>(w, kChunk * 16, [&](int e) {
      const int row = e / 16, col = row / 16 * 16 + e % 16;
      set_square(w, L::kA, row, col, col <= row ? pair_weight(w, base + L::kQ, row, base + L::kK, col) : 0.0f);
    });
  }

  // --- Inf and NaN ----------------------------------------------------------------------------
  // In the recurrence row j never reaches an earlier row. The tensor-core products do skip the
  // blocks above the diagonal, but a diagonal 16 × 16 block's zeros above its diagonal meet a
  // later row's Inf or NaN inside the mma (0 · NaN = NaN): in Tu·V, Tw·K and P·u. So the forward
  // screens each chunk: a K or V piece holding Inf or NaN is zeroed and its row flagged (β and g
  // in load_gates), every product then runs on finite values — earlier rows exactly as without
  // the flagged one — and the rows from the first flagged one on are poisoned: their outputs and
  // the state after the chunk are NaN (what the recurrence makes of them is Inf or NaN in the
  // columns they reach; here every column). q needs no screen: its rows are A operands, a row's
  // Inf or NaN stays in its own output.

  LINATTN_HD void screen_rows(const WarpContext& w, uint32_t base) const {
    LINATTN_UNROLL
    for (int operand = 1; operand < 3; ++operand) {
      const warp::RowTile<scalar_t> x = rows_of(operand);
      warp::each_piece<kThreads, kChunk>(w, x, [&](int r, int col) {
        const uint32_t at = base + x.offset + static_cast<uint32_t>(r * x.pitch + col * 2);
        bool finite = true;
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) {
          finite = finite && warp::finite_pair<scalar_t>(warp::load_shared<uint32_t>(w, at + 4 * i));
        }
        if (finite) return;
        LINATTN_UNROLL
        for (int i = 0; i < 4; ++i) warp::store_shared<uint32_t>(w, at + 4 * i, 0u);
        warp::store_shared<uint8_t>(w, static_cast<uint32_t>(L::kRowFlags + r), 1);
      });
    }
  }

  // The first flagged row of the chunk (kChunk for none) to kFirstBad (warp 2, idle while warps 0
  // and 1 invert T's diagonal blocks): a minimum over the 64 flags by shuffles.
  LINATTN_HD void find_first_bad_row(const WarpContext& w) const {
    if (w.warp != 2) return;
    Lanes<float> first;
    warp::for_lanes(w, [&](int lane) {
      const bool low = warp::load_shared<uint8_t>(w, static_cast<uint32_t>(L::kRowFlags + lane)) != 0;
      const bool high = warp::load_shared<uint8_t>(w, static_cast<uint32_t>(L::kRowFlags + lane + 32)) != 0;
      first[lane] = static_cast<float>(low ? lane : high ? lane + 32 : kChunk);
    });
    first = warp::butterfly<warp::kWarpSize>(w, first, [](float a, float b) { return b < a ? b : a; });
    warp::for_lanes(w, [&](int lane) {
      if (lane == 0) warp::store_shared<int>(w, L::kFirstBad, static_cast<int>(first[lane]));
    });
  }

  LINATTN_HD static int first_bad_row(const WarpContext& w) { return warp::load_shared<int>(w, L::kFirstBad); }

  // After a chunk with a flagged row: the state is NaN (and so is every later output).
  LINATTN_HD void poison_state(const WarpContext& w, State& s) const {
    if (first_bad_row(w) >= kChunk) return;
    const float nan = quiet_nan();
    s.each_element(w, [&](bool, int, int, float& x) { x = nan; });
  }

  // q and k rows scaled to unit length in shared memory, x · (Σ x² + eps)^{-1/2} (normalize_qk):
  // a row's 16-byte pieces are spread over DK / 8 lanes, whose sums of squares meet by shuffles.
  LINATTN_HD void normalize_rows(const WarpContext& w, uint32_t base, bool want_q, bool want_k) const {
    constexpr int kLanesPerRow = DK / 8, kRowsPerPass = warp::kWarpSize / kLanesPerRow;
    constexpr int kRowsPerWarp = kChunk / kWarps;
    LINATTN_UNROLL
    for (int operand = 0; operand < 2; ++operand) {
      if (!(operand == 0 ? want_q : want_k)) continue;
      const uint32_t origin = base + (operand == 0 ? L::kQ : L::kK);
      LINATTN_NO_UNROLL
      for (int pass = 0; pass < kRowsPerWarp / kRowsPerPass; ++pass) {
        Lanes<uint32_t> at;
        Lanes<float> sum;
        warp::for_lanes(w, [&](int lane) {
          const int row = w.warp * kRowsPerWarp + pass * kRowsPerPass + lane / kLanesPerRow;
          at[lane] = origin + static_cast<uint32_t>(row * L::kQKPitch + (lane % kLanesPerRow) * 16);
          float s = 0.0f;
          LINATTN_UNROLL
          for (int i = 0; i < 4; ++i) {
            const uint32_t pair = warp::load_shared<uint32_t>(w, at[lane] + 4 * i);
            const float lo = warp::unpack_lo<scalar_t>(pair), hi = warp::unpack_hi<scalar_t>(pair);
            s += lo * lo + hi * hi;
          }
          sum[lane] = s;
        });
        sum = warp::butterfly<kLanesPerRow>(w, sum, [](float a, float b) { return a + b; });
        warp::for_lanes(w, [&](int lane) {
          const float r = inverse_sqrt(sum[lane] + kL2Eps);
          LINATTN_UNROLL
          for (int i = 0; i < 4; ++i) {
            const uint32_t pair = warp::load_shared<uint32_t>(w, at[lane] + 4 * i);
            warp::store_shared<uint32_t>(w, at[lane] + 4 * i,
                                         warp::pack<scalar_t>(warp::unpack_lo<scalar_t>(pair) * r,
                                                              warp::unpack_hi<scalar_t>(pair) * r));
          }
        });
      }
    }
  }

  // --- the UT transform ------------------------------------------------------------------------
  // A = strict_tril(diag(β) (K Kᵀ ⊙ Γ)), Γ_ij = e^{G_i − G_j}, and T = (I + A)⁻¹ in fp32, by
  // blocks of 16: the diagonal blocks by forward substitution, then the blocks below them by
  // T_ij = −T_ii (Σ A T)_ij, doubling (16 → 32 → 64). T's 16-bit forms fold in the row scalings
  // of the right-hand sides: Tw = T diag(β e^G) (W = Tw K), Tu = T diag(β) (U = Tu V).

  // A's blocks (rb, cb), cb <= rb: warp w takes row block w % 4 and column blocks w / 4, w / 4 + 2.
  // Gates per key channel: the blocks below the diagonal as pair_block's, the diagonal ones' pair
  // weights in fp32 by every thread.
  LINATTN_HD void key_products(const WarpContext& w, uint32_t base) const {
    const int rb = w.warp % 4;
    if constexpr (kChannels) {
      warp::each_block_element<kThreads>(w, kChunk * 16, [&](int e) {
        const int row = e / 16, col = row / 16 * 16 + e % 16;
        const float x = col < row ? row_value(w, L::kBeta, row) * pair_weight(w, base + L::kK, row, base + L::kK, col)
                                  : 0.0f;
        set_square(w, L::kA, row, col, x);
      });
    }
    LINATTN_UNROLL
    for (int pick = 0; pick < 2; ++pick) {
      const int cb = w.warp / 4 + 2 * pick;
      if (cb > rb || (kChannels && cb == rb)) continue;
      Accumulator acc[2][4];
      warp::clear(w, acc);
      if constexpr (kChannels) {
        pair_block(w, acc, 0, base + L::kK, rb, base + L::kK, cb);
      } else {
        LINATTN_UNROLL
        for (int ks = 0; ks < DK / 16; ++ks) {
          Fragment a[4];
          warp::rows_as_a_operand(w, base + L::kK + rb * 16 * L::kQKPitch + ks * 32, L::kQKPitch, a);
          LINATTN_UNROLL
          for (int n = 0; n < 2; ++n) {
            Fragment bf[2];
            warp::rows_as_b_operand_transposed(w, base + L::kK + (cb * 16 + n * 8) * L::kQKPitch + ks * 32,
                                               L::kQKPitch, bf);
            warp::mma_16816<scalar_t>(acc[n], a, bf);
          }
        }
      }
      warp::each_accumulator(w, acc, [&](int r, int c, float& kk_product) {
        const int row = rb * 16 + r, col = cb * 16 + c;
        float x = 0.0f;
        if (col < row) {
          x = row_value(w, L::kBeta, row) * kk_product;
          if (gated() && !kChannels) x *= exp_of(row_value(w, L::kG, row) - row_value(w, L::kG, col));
        }
        set_square(w, L::kA, row, col, x);
      });
    }
  }

  // T_ij (fp32) and its 16-bit forms.
  LINATTN_HD void set_inverse(const WarpContext& w, int r, int c, float x) const {
    set_square(w, L::kT, r, c, x);
    const float beta = row_value(w, L::kBeta, c);
    const uint32_t at = static_cast<uint32_t>(r * L::kTPitch + c * 2);
    warp::store_shared<uint16_t>(w, L::kTw + at, scalar_t(x * beta * row_value(w, L::kExpG, c)).x);
    warp::store_shared<uint16_t>(w, L::kTu + at, scalar_t(x * beta).x);
  }

  // The four diagonal blocks of T, column by column (threads 0 .. 63: block c / 16, column c % 16).
  // (The blocks above the diagonal are never read: the doubling products skip T's upper triangle.)
  LINATTN_HD void invert_diagonal_blocks(const WarpContext& w) const {
    if (w.warp >= 2) return;
    warp::for_lanes(w, [&](int lane) {
      const int c = w.warp * warp::kWarpSize + lane, bb = c / 16, j = c % 16, o = bb * 16;
      float x[16];
      LINATTN_UNROLL
      for (int i = 0; i < 16; ++i) {
        float s = i == j ? 1.0f : 0.0f;
        LINATTN_UNROLL
        for (int m = 0; m < i; ++m) s -= square(w, L::kA, o + i, o + m) * x[m];
        x[i] = s;
        set_inverse(w, o + i, o + j, s);
      }
    });
  }

  // dst (rows × cols at (r0, c0) of T, or of the product scratch when `into_inverse` is false) =
  // sign · lhs · rhs, lhs rows × inner at (lr, lc) of `lhs_matrix`, rhs inner × cols at (rr, rc)
  // of `rhs_matrix` (square matrices or the scratch, by its own pitch). One factor is a lower-
  // triangular block of T (`lower_lhs`: the left one, else the right one), whose zeros above the
  // diagonal are skipped rather than multiplied: half the work, and no 0 · NaN from a later row.
  LINATTN_HD void product(const WarpContext& w, int rows, int cols, int inner, int lhs_matrix, int lr, int lc,
                          int rhs_matrix, int rr, int rc, bool lower_lhs, bool into_inverse, int r0, int c0,
                          float sign) const {
    const auto pitch_of = [](int matrix) { return matrix == L::kProduct ? L::kProductPitch : L::kSquarePitch; };
    const int lp = pitch_of(lhs_matrix), rp = pitch_of(rhs_matrix);
    warp::each_block_element<kThreads>(w, rows * cols, [&](int e) {
      const int r = e / cols, c = e % cols;
      float s = 0.0f;
      const int k_begin = lower_lhs ? 0 : c, k_end = lower_lhs ? r + 1 : inner;
      for (int k = k_begin; k < k_end; ++k) {
        s += warp::load_shared<float>(w, static_cast<uint32_t>(lhs_matrix + ((lr + r) * lp + lc + k) * 4)) *
             warp::load_shared<float>(w, static_cast<uint32_t>(rhs_matrix + ((rr + k) * rp + rc + c) * 4));
      }
      if (into_inverse) {
        set_inverse(w, r0 + r, c0 + c, sign * s);
      } else {
        warp::store_shared<float>(w, static_cast<uint32_t>(L::kProduct + ((r0 + r) * L::kProductPitch + c0 + c) * 4),
                                  sign * s);
      }
    });
  }

  // The doubling's four products, one per phase (each reads what the one before wrote):
  //   step 0: P0 = A10 T00, P1 = A32 T22;   step 1: T10 = −T11 P0, T32 = −T33 P1;
  //   step 2: P = A[32:, :32] T[:32, :32];  step 3: T[32:, :32] = −T[32:, 32:] P.
  LINATTN_HD void inverse_step(const WarpContext& w, int step) const {
    if (step == 0) {
      product(w, 16, 16, 16, L::kA, 16, 0, L::kT, 0, 0, false, false, 0, 0, 1.0f);
      product(w, 16, 16, 16, L::kA, 48, 32, L::kT, 32, 32, false, false, 16, 0, 1.0f);
    } else if (step == 1) {
      product(w, 16, 16, 16, L::kT, 16, 16, L::kProduct, 0, 0, true, true, 16, 0, -1.0f);
      product(w, 16, 16, 16, L::kT, 48, 48, L::kProduct, 16, 0, true, true, 48, 32, -1.0f);
    } else if (step == 2) {
      product(w, 32, 32, 32, L::kA, 32, 0, L::kT, 0, 0, false, false, 0, 0, 1.0f);
    } else {
      product(w, 32, 32, 32, L::kT, 32, 32, L::kProduct, 0, 0, true, true, 32, 0, -1.0f);
    }
  }

  // --- u = U − W S0 ----------------------------------------------------------------------------

  // The value tile (of the block's DV columns) that tile j of warp half ch is.
  LINATTN_HD static int half_tile(int ch, int j) { return ch * kColsPerHalf + j; }

  // The 16-bit state for keys ks·16.. (rows) × 8 columns of tile ni, a B operand.
  LINATTN_HD static void state_fragment(const WarpContext& w, int ks, int ni, Fragment (&bf)[2]) {
    warp::rows_as_b_operand(w, L::kState + ks * 16 * L::kVPitch + ni * 16, L::kVPitch, bf);
  }

  // Rows 16·rb.. of u for the warp's half of the value columns (warp w: rb = w % 4, half w / 4),
  // the chunk's rows from `start` of the sequence (store_row_tiles). W is formed 16 key columns
  // at a time and consumed at once.
  LINATTN_HD void pseudo_values(const WarpContext& w, uint32_t base, int64_t start) const {
    const int rb = w.warp % 4, ch = w.warp / 4;
    Accumulator u[kColsPerHalf][4];
    warp::clear(w, u);
    LINATTN_UNROLL
    for (int kk = 0; kk < 4; ++kk) {
      if (kk > rb) continue;
      Fragment a[4];
      warp::rows_as_a_operand(w, L::kTu + rb * 16 * L::kTPitch + kk * 32, L::kTPitch, a);
      LINATTN_UNROLL
      for (int j = 0; j < kColsPerHalf; ++j) {
        Fragment bf[2];
        warp::rows_as_b_operand(w, base + L::kV + kk * 16 * L::kVPitch + half_tile(ch, j) * 16, L::kVPitch, bf);
        warp::mma_16816<scalar_t>(u[j], a, bf);
      }
    }
    LINATTN_UNROLL
    for (int ks = 0; ks < DK / 16; ++ks) {
      Accumulator wk[2][4];
      warp::clear(w, wk);
      LINATTN_UNROLL
      for (int kk = 0; kk < 4; ++kk) {
        if (kk > rb) continue;
        Fragment a[4];
        warp::rows_as_a_operand(w, L::kTw + rb * 16 * L::kTPitch + kk * 32, L::kTPitch, a);
        LINATTN_UNROLL
        for (int n = 0; n < 2; ++n) {
          Fragment bf[2];
          warp::rows_as_b_operand(w, base + L::kK + kk * 16 * L::kQKPitch + (ks * 16 + n * 8) * 2, L::kQKPitch, bf);
          if constexpr (kChannels) {  // W = Tu (K ⊙ e^G)
            warp::scale_b_operand<scalar_t>(w, bf, [&](int r, int c) {
              return exp_of(gate_sum(w, kk * 16 + r, ks * 16 + n * 8 + c));
            });
          }
          warp::mma_16816<scalar_t>(wk[n], a, bf);
        }
      }
      // −W's 16 × 16 slice as an A operand, times S0's rows.
      Fragment minus_w[1][4];
      warp::as_a_fragments<scalar_t>(w, wk, minus_w, -1.0f);
      LINATTN_UNROLL
      for (int j = 0; j < kColsPerHalf; ++j) {
        Fragment bf[2];
        state_fragment(w, ks, half_tile(ch, j), bf);
        warp::mma_16816<scalar_t>(u[j], minus_w[0], bf);
      }
    }
    store_row_tiles(w, u, L::kU, 1.0f, start);
  }

  // Rows 16·rb.. × the warp's half of the value columns (warp w: rb = w % 4, half w / 4), times
  // `sign`, to shared memory at `origin` (value-row pitch) in 16 bits; with kKeep and `start` >= 0
  // (the chunk's first row in the sequence) also to chunk_values in fp32.
  LINATTN_HD void store_row_tiles(const WarpContext& w, const Accumulator (&x)[kColsPerHalf][4], int origin,
                                  float sign, int64_t start) const {
    const int rb = w.warp % 4, ch = w.warp / 4;
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int j = 0; j < kColsPerHalf; ++j) {
        LINATTN_UNROLL
        for (int half = 0; half < 2; ++half) {
          const int row = rb * 16 + g + 8 * half, col = half_tile(ch, j) * 8 + 2 * t;
          const float x0 = sign * x[j][2 * half][lane], x1 = sign * x[j][2 * half + 1][lane];
          warp::store_shared<uint32_t>(w, static_cast<uint32_t>(origin + row * L::kVPitch + col * 2),
                                       warp::pack<scalar_t>(x0, x1));
          if (!kKeep || start < 0 || start + row >= rows) continue;
          float* kept = p.chunk_values + (token0 + start + row) * p.value_dim + col0 + col;
          LINATTN_UNROLL
          for (int e = 0; e < 2; ++e) {
            if (col0 + col + e < p.value_dim) warp::store_global(w, kept + e, sign * x[j][2 * half + e][lane]);
          }
        }
      }
    });
  }

  // --- the state -------------------------------------------------------------------------------

  LINATTN_HD int64_t state_offset(int row, int c) const {
    return (state_index * p.key_dim + row) * p.value_dim + col0 + c;
  }
  LINATTN_HD bool state_element(int row, int c) const { return row < p.key_dim && col0 + c < p.value_dim; }

  LINATTN_HD void load_state(const WarpContext& w, State& s) const {
    s.each_element(w, [&](bool mine, int row, int c, float& x) {
      const bool stored = mine && p.state_in != nullptr && state_element(row, c);
      x = stored ? warp::load_global(w, p.state_in + state_offset(row, c)) : 0.0f;
    });
  }

  LINATTN_HD void store_state(const WarpContext& w, State& s) const {
    store_state_to(w, s, p.state_out + state_offset(0, 0));
  }

  // The block's state tile (key_dim rows of value_dim-wide rows, from its column col0) at `to`.
  LINATTN_HD void store_state_to(const WarpContext& w, State& s, float* to) const {
    s.each_element(w, [&](bool mine, int row, int c, float& x) {
      if (mine && state_element(row, c)) warp::store_global(w, to + row * p.value_dim + c, x);
    });
  }

  LINATTN_HD void publish_state(const WarpContext& w, const State& s) const {
    s.template publish<scalar_t>(w, L::kState, L::kVPitch);
  }

  // The state at a boundary of chunk `chunk`, to chunk_states where the walk is kept.
  LINATTN_HD void store_chunk_state(const WarpContext& w, State& s, int64_t chunk) const {
    if (!kKeep) return;
    const int64_t index = p.offsets != nullptr
                              ? h * p.chunk_offsets[p.sequences] + p.chunk_offsets[state_index / p.heads] + chunk
                              : state_index * chunks() + chunk;
    store_state_to(w, s, p.chunk_states + index * p.key_dim * p.value_dim + col0);
  }

  // S1 = e^{G_last} S0 + Kᵀ diag(e^{G_last − G}) u over the chunk's keys (`keys` of them hold data);
  // gates per key channel: Diag(e^{G_last}) S0 + (K ⊙ e^{G_last − G})ᵀ u.
  LINATTN_HD void update_state(const WarpContext& w, State& s, uint32_t base, int keys) const {
    fade_state(w, s);
    if constexpr (kChannels) {
      add_to_state_with(w, s, base + L::kK, true, [&](int row, int c) {
        return exp_of(gate_sum(w, kChunk - 1, c) - gate_sum(w, row, c));
      }, L::kU, keys);
    } else {
      add_to_state(w, s, base + L::kK, gated() ? L::kDecay : kNoFactors, 1.0f, L::kU, keys);
    }
  }

  // A gated state, before the chunk's rows join it: state ×= e^{G_last} (per key channel: row c of
  // the state ×= e^{G_last,c}).
  LINATTN_HD void fade_state(const WarpContext& w, State& s) const {
    if (!gated()) return;
    if constexpr (kChannels) {
      s.each_element(w, [&](bool, int row, int, float& x) { x *= exp_of(gate_sum(w, kChunk - 1, row)); });
      return;
    }
    const float fade = row_value(w, L::kExpG, kChunk - 1);
    s.each_element(w, [&](bool, int, int, float& x) { x *= fade; });
  }

  // state += Xᵀ diag(f) Y over the chunk's first `keys` rows: X rows at x (pitch kQKPitch) give the
  // state's rows, Y rows at y (pitch kVPitch, from the block's first value column) its columns;
  // f_r = multiplier · factors[r] (a per-row fp32 array of the layout, or kNoFactors: multiplier),
  // applied to Xᵀ's 16-bit columns.
  static constexpr int kNoFactors = -1;
  LINATTN_HD void add_to_state(const WarpContext& w, State& s, uint32_t x, int factors, float multiplier,
                               uint32_t y, int keys) const {
    const bool scaled = factors != kNoFactors || multiplier != 1.0f;
    add_to_state_with(w, s, x, scaled, [&](int row, int) {
      return factors == kNoFactors ? multiplier : multiplier * row_value(w, factors, row);
    }, y, keys);
  }

  // The same with Xᵀ's element (channel c, chunk row r) times factor(r, c) where `scaled`.
  template <typename Factor>
  LINATTN_HD void add_to_state_with(const WarpContext& w, State& s, uint32_t x, bool scaled, const Factor& factor,
                                    uint32_t y, int keys) const {
    for (int kk = 0; kk * 16 < keys; ++kk) {
      LINATTN_UNROLL
      for (int r = 0; r < State::kRowTilesPerWarp; ++r) {
        int mi = 0, ni = 0;
        State::tile(w.warp, r * State::kColsPerWarp, mi, ni);
        Fragment a[4];  // Xᵀ: its columns mi·16.. (rows) × chunk rows kk·16.. (columns)
        warp::rows_as_a_operand_transposed(w, x + kk * 16 * L::kQKPitch + mi * 32, L::kQKPitch, a);
        if (scaled) {
          warp::scale_a_operand<scalar_t>(w, a, [&](int r, int c) { return factor(kk * 16 + c, mi * 16 + r); });
        }
        LINATTN_UNROLL
        for (int c = 0; c < State::kColsPerWarp; ++c) {
          const int slot = r * State::kColsPerWarp + c;
          if (!State::tile(w.warp, slot, mi, ni)) continue;
          Fragment bf[2];
          warp::rows_as_b_operand(w, y + kk * 16 * L::kVPitch + ni * 16, L::kVPitch, bf);
          warp::mma_16816<scalar_t>(s.state[slot], a, bf);
        }
      }
    }
  }

  // --- the output ------------------------------------------------------------------------------

  // The chunk's output rows 16·rb.. (from `start` of the sequence) for the warp's half of the value
  // columns (warp w: rb = w % 4, half w / 4): causal, scale · (diag(e^G) Q S0 + (Q Kᵀ ⊙ Γ ⊙ lower) u)
  // (per key channel: scale · ((Q ⊙ e^G) S0 + P u), P the pair weights, below the diagonal blocks
  // by pair_block, in them diagonal_pairs'); non-causal (the state copy holds the final state),
  // scale · Q S.
  LINATTN_HD void output(const WarpContext& w, uint32_t base, int64_t start, bool causal) const {
    const int rb = w.warp % 4, ch = w.warp / 4;
    const int64_t first = start + rb * 16;  // of the sequence
    if (first >= rows) return;
    Fragment scores[kChunk / 16][4];  // A fragments of the masked, decayed scores, 16 keys each
    if (causal) {
      Accumulator sc[kChunk / 8][4];
      if constexpr (kChannels) {
        warp::clear(w, sc);
        LINATTN_UNROLL
        for (int kk = 0; kk < kChunk / 16; ++kk) {
          if (kk < rb) pair_block(w, sc, 2 * kk, base + L::kQ, rb, base + L::kK, kk);
        }
      } else {
        tensor_core::lower_scores<scalar_t, DK>(w, base + L::kQ, base + L::kK, L::kQKPitch, rb, sc);
      }
      warp::each_accumulator(w, sc, [&](int r, int key, float& x) {
        const int row = rb * 16 + r;
        if (key > row) {
          x = 0.0f;
        } else if (kChannels && key >= rb * 16) {
          x = square(w, L::kA, row, key);
        } else if (gated() && !kChannels) {
          x *= exp_of(row_value(w, L::kG, row) - row_value(w, L::kG, key));
        }
      });
      warp::as_a_fragments<scalar_t>(w, sc, scores);
    }
    Accumulator o[kColsPerHalf][4];
    warp::clear(w, o);
    const auto times_state = [&](int ks) {
      Fragment qf[4];
      warp::rows_as_a_operand(w, base + L::kQ + rb * 16 * L::kQKPitch + ks * 32, L::kQKPitch, qf);
      if (kChannels && causal) {  // e^G ⊙ Q
        warp::scale_a_operand<scalar_t>(w, qf, [&](int r, int c) {
          return exp_of(gate_sum(w, rb * 16 + r, ks * 16 + c));
        });
      }
      LINATTN_UNROLL
      for (int j = 0; j < kColsPerHalf; ++j) {
        Fragment bf[2];
        state_fragment(w, ks, half_tile(ch, j), bf);
        warp::mma_16816<scalar_t>(o[j], qf, bf);
      }
    };
    if constexpr (kChannels) {
      LINATTN_NO_UNROLL  // (rolled: the factors' registers)
      for (int ks = 0; ks < DK / 16; ++ks) times_state(ks);
    } else {
      LINATTN_UNROLL
      for (int ks = 0; ks < DK / 16; ++ks) times_state(ks);
    }
    if (causal) {
      if (gated() && !kChannels) {
        warp::each_accumulator(w, o, [&](int r, int, float& x) { x *= row_value(w, L::kExpG, rb * 16 + r); });
      }
      LINATTN_UNROLL
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        if (kk > rb) continue;
        LINATTN_UNROLL
        for (int j = 0; j < kColsPerHalf; ++j) {
          Fragment bf[2];
          warp::rows_as_b_operand(w, L::kU + kk * 16 * L::kVPitch + half_tile(ch, j) * 16, L::kVPitch, bf);
          warp::mma_16816<scalar_t>(o[j], scores[kk], bf);
        }
      }
    }
    warp::for_lanes(w, [&](int lane) {
      const int g = warp::group_of(lane), t = warp::thread_in_group(lane);
      LINATTN_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int64_t row = first + g + 8 * half;
        if (row >= rows) continue;
        const int64_t out_row = (token0 + row) * p.value_dim;
        // (causal: rows from the chunk's first flagged row on are poisoned, see screen_rows)
        const bool poisoned = causal && rb * 16 + g + 8 * half >= first_bad_row(w);
        LINATTN_UNROLL
        for (int j = 0; j < kColsPerHalf; ++j) {
          LINATTN_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int64_t col = col0 + half_tile(ch, j) * 8 + 2 * t + e;
            if (col >= p.value_dim) continue;
            const float x = poisoned ? quiet_nan() : p.scale * o[j][2 * half + e][lane];
            warp::store_global(w, p.out + out_row + col, scalar_t(x));
          }
        }
      }
    });
  }
};

// The phases that prepare a chunk (its rows from `start` of the sequence) once its rows have landed
// (Block: the forward's block or the backward walk's): with `screen` (the forward) its K and V rows
// screened for Inf and NaN, gates per key channel loaded, q (want_q) and k rows normalised with
// normalize_qk, then the UT transform — A, T's diagonal blocks (and the first flagged row), the
// doubling's four products (per key channel, with the last, the diagonal blocks of the scores'
// pair weights where q is wanted).
template <typename State, typename Block, typename Exec>
LINATTN_HD LINATTN_INLINE void prepare_chunk(const Exec& exec, const Block& blk, uint32_t base, int64_t start,
                                             bool want_q, bool screen) {
  if (screen || Block::kPerChannel) {
    exec([&](const WarpContext& w, State&) {
      if (screen) blk.screen_rows(w, base);
      blk.load_channel_gates(w, start, screen);
    });
  }
  if (blk.p.normalize_qk) exec([&](const WarpContext& w, State&) { blk.normalize_rows(w, base, want_q, true); });
  exec([&](const WarpContext& w, State&) { blk.key_products(w, base); });
  exec([&](const WarpContext& w, State&) {
    blk.invert_diagonal_blocks(w);
    if (screen) blk.find_first_bad_row(w);
  });
  for (int step = 0; step < 4; ++step) {
    exec([&](const WarpContext& w, State&) {
      blk.inverse_step(w, step);
      if (Block::kPerChannel && want_q && step == 3) blk.diagonal_pairs(w, base);
    });
  }
}

}  // namespace delta_tensor_core
}  // namespace linattn
