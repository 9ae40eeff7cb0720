// What one launch of the flash engine (forward.h) is given, and the sizes its kernels are
// compiled for: the problem, the head-dim instances, the shared-memory layout of a block and the
// registers each warp keeps across barriers.
#pragma once

#include "../../common/philox.h"
#include "../../common/warp/row_copy.h"
#include "../../common/strided.h"

#include <cstdint>
#include <type_traits>

namespace linattn {
namespace flash {

using warp::Accumulator;
using warp::Fragment;
using warp::Lanes;
using warp::WarpContext;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * warp::kWarpSize;
constexpr int kRows = 64;  // query rows per block: 16 per warp
constexpr int kKeys = 64;  // keys per key tile

// How much of a key tile the block's query rows see.
enum TileKind : uint8_t { kHidden = 0, kPartial = 1, kWhole = 2 };

// Everything one launch reads and writes; one block per (batch, head, query tile). Query i sees
// key j as RestrictedPattern (op_checks.h) says; visibility.h computes it per pair.
template <typename scalar_t>
struct FlashProblem {
  int64_t batch = 0, heads = 0, q_len = 0, k_len = 0, head_dim = 0, value_dim = 0;
  // Grouped-query attention: head h reads k and v at head h / kv_group (the backward's key blocks
  // still write per query head; plan.h sums them onto the shared heads).
  int64_t kv_group = 1;
  float scale = 1.0f;
  float softcap = 0.0f;  // > 0: scaled scores capped to softcap·tanh(s / softcap) before the bias
  // ALiBi: −alibi[b · alibi_batch_stride + h] · |i + T_k − T_q − j| added after the cap (null: none).
  const float* alibi = nullptr;
  int64_t alibi_batch_stride = 0;
  // The Forgetting Transformer's cumulative log forget gates c (B, H, T_k), float32: c_a − c_j added
  // for key j <= a = i + T_k − T_q, c_j − c_a past a, after ALiBi (null: none).
  const float* forget = nullptr;
  // Attention dropout (common/philox.h): pair (b, h, i, j) kept when dropout_bits(dropout_seed,
  // b·H + h, i, j) reaches dropout_threshold, its probability then times dropout_scale; scale 0: none.
  uint64_t dropout_seed = 0;
  uint32_t dropout_threshold = 0;
  float dropout_scale = 0.0f;
  // The region: a sliding window (left, right with causality folded in, -1 = unbounded),
  // dilation and Longformer global tokens (B, T); or a block layout (layout_heads, q_blocks,
  // k_blocks) of `block` × `block` blocks, contiguous.
  int64_t left = -1, right = -1, dilation = 1;
  bool causal = false;
  const bool* global_mask = nullptr;
  const bool* layout = nullptr;
  int64_t layout_heads = 1, block = 1, q_blocks = 0, k_blocks = 0;
  // Per-token and per-pair terms (kernel.h's PairTerms): all contiguous, nullable.
  const bool* key_padding = nullptr;  // (B, T_k), true = padded
  const int64_t* q_segments = nullptr;
  const int64_t* k_segments = nullptr;
  int64_t segment_heads = 1;
  const int64_t* positions = nullptr;
  int64_t position_heads = 1;
  const scalar_t* bias = nullptr;  // (bias_heads, T_q, T_k)
  int64_t bias_heads = 1;
  // The key tiles each query tile visits (plan.h). Without a plan (a window without global
  // tokens) the kernel walks the window's band. With one, per (plan batch, plan head, query
  // tile): `visit_counts` tiles, listed first and ascending in the row of `visit_tiles`
  // (plan_batch, plan_heads, q_tiles, k_tiles), each of the TileKind in `tile_kinds` (same shape).
  const int32_t* visit_tiles = nullptr;
  const int32_t* visit_counts = nullptr;
  const uint8_t* tile_kinds = nullptr;
  int64_t plan_batch = 1, plan_heads = 1;
  int64_t q_tiles = 0, k_tiles = 0;
  // Longformer's global tokens, gathered (a window with a global_mask, T_q = T_k; plan.h): per
  // batch entry global_count[b] token indices, ascending, first in global_index (B, T) int32, and
  // per 64-token tile whether it holds one (global_tiles (B, tiles) uint8). A global row sees
  // every key and every row sees a global key; those pairs are computed in tiles of gathered
  // global tokens (TokenTile) instead of the band's tiles, which hide them: see FlashBlock.
  const int32_t* global_index = nullptr;
  const int32_t* global_count = nullptr;
  const uint8_t* global_tiles = nullptr;
  // With segments: per (batch, segment head, 64-token tile) the least and greatest segment id of
  // the tile's queries / keys ((B, segment_heads, tiles, 2) int64, plan.h). A tile pair whose
  // ranges do not meet holds no visible pair and is skipped (packed documents: causal attention
  // over a packed batch costs its documents' squares, not the batch's).
  const int64_t* q_segment_range = nullptr;
  const int64_t* k_segment_range = nullptr;
  Strided4<const scalar_t> q, k, v;
  bool q_vector = false, k_vector = false, v_vector = false;  // rows copy as 16-byte cp.async
  scalar_t* out = nullptr;  // (B, H, T_q, dv) contiguous
  float* lse = nullptr;     // (B, H, T_q)

  LINATTN_HD int64_t kv_head(int64_t h) const { return h / kv_group; }
  LINATTN_HD bool drops() const { return dropout_scale != 0.0f; }
  // Tiles of gathered global tokens per (batch, head): at most as many as of tokens (the count
  // itself lives on the device; blocks past it return at once).
  LINATTN_HD int64_t gathered_tiles() const { return global_index != nullptr ? q_tiles : 0; }
  // Blocks of a launch over query tiles (the forward, the backward's query blocks) and over key
  // tiles (its key blocks), each followed by the gathered tiles' blocks.
  LINATTN_HD int64_t blocks() const { return batch * heads * (q_tiles + gathered_tiles()); }
  LINATTN_HD int64_t key_blocks() const { return batch * heads * (k_tiles + gathered_tiles()); }
};

// One warp's tile of products, 16 rows × N columns (N = kKeys unless a block halves it to spare
// registers), as mma accumulators.
template <int N = kKeys>
using ProductTile = Accumulator[N / 8][4];
using ScoreTile = ProductTile<kKeys>;

// acc = A·Bᵀ over `depth` columns (up to D, in steps of 16; the rest are zeros on both sides): A
// is 16 rows from shared offset a_origin, B N rows from b_origin, both `pitch` bytes apart.
template <typename scalar_t, int D, int N = kKeys>
LINATTN_HD void rows_times_rows(const WarpContext& w, uint32_t a_origin, uint32_t b_origin, int pitch, int64_t depth,
                                ProductTile<N>& acc) {
  warp::clear(w, acc);
  LINATTN_UNROLL
  for (int ks = 0; ks < D / 16; ++ks) {
    if (ks * 16 >= depth) continue;
    Fragment a[4];
    warp::rows_as_a_operand(w, a_origin + ks * 32, pitch, a);
    LINATTN_UNROLL
    for (int nt = 0; nt < N / 8; ++nt) {
      Fragment bf[2];
      warp::rows_as_b_operand_transposed(w, b_origin + nt * 8 * pitch + ks * 32, pitch, bf);
      warp::mma_16816<scalar_t>(acc[nt], a, bf);
    }
  }
}

// A product tile's C fragments, packed to 16 bits, as the A fragments of its N / 16 groups of 16
// columns (row_copy.h).
template <typename scalar_t, int N = kKeys>
LINATTN_HD void as_a_fragments(const WarpContext& w, const ProductTile<N>& c, Fragment (&a)[N / 16][4]) {
  warp::as_a_fragments<scalar_t>(w, c, a);
}

// acc (16 rows × D) += A (16 × N, as_a_fragments) · the N rows from shared offset `origin`, over
// their first `width` columns (in steps of 8).
template <typename scalar_t, int D, int N = kKeys>
LINATTN_HD void add_product(const WarpContext& w, const Fragment (&a)[N / 16][4], uint32_t origin, int pitch,
                            int64_t width, Accumulator (&acc)[D / 8][4]) {
  LINATTN_UNROLL
  for (int kk = 0; kk < N / 16; ++kk) {
    LINATTN_UNROLL
    for (int j = 0; j < D / 8; ++j) {
      if (j * 8 >= width) continue;
      Fragment bf[2];
      warp::rows_as_b_operand(w, origin + kk * 16 * pitch + j * 16, pitch, bf);
      warp::mma_16816<scalar_t>(acc[j], a[kk], bf);
    }
  }
}

// Shared memory of one block: the query tile, two key/value tile buffers (each with a flag: the
// tile's V holds Inf or NaN, and the tile's key tokens), a per-warp scratch of probabilities (see
// exact_values) and the query tile's tokens. (Tokens as int32, −1 past the end: the per-pair
// pattern reads them from here rather than keeping their arithmetic in registers.) `Buffers`: two
// key/value buffers, the next tile landing while this one computes, or one where two do not fit a
// block (D = 256 on an A100: 182 KiB against its 163; see buffers_for).
template <int D, int Buffers = 2>
struct Layout {
  static constexpr int kPitch = warp::padded_pitch(D * 2);
  static constexpr int kQ = 0;
  static constexpr int kK = kRows * kPitch, kV = kK + kKeys * kPitch, kNonFinite = kV + kKeys * kPitch;
  static constexpr int kKeyTokens = kNonFinite + 16;
  static constexpr int kBuffer = kKeys * kPitch * 2 + 16 + kKeys * 4;  // K, V, the flag, the tokens
  static constexpr int kScratch = kK + Buffers * kBuffer;
  static constexpr int kScratchPerWarp = 16 * kKeys * 4;
  static constexpr int kRowTokens = kScratch + kWarps * kScratchPerWarp;
  static constexpr int kBytes = kRowTokens + kRows * 4;
};

// The kernel a call runs: D, its larger head dim (q/k or v) padded to 64, 128 or 256.
LINATTN_HD inline int padded_head_dim(int64_t head_dim, int64_t value_dim) {
  const int64_t d = head_dim > value_dim ? head_dim : value_dim;
  return d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

// Calls f(std::integral_constant<int, D>{}) for the kernel compiled for these head dims.
template <typename F>
void with_head_dim(int64_t head_dim, int64_t value_dim, F&& f) {
  const int D = padded_head_dim(head_dim, value_dim);
  if (D == 64) f(std::integral_constant<int, 64>{});
  else if (D == 128) f(std::integral_constant<int, 128>{});
  else f(std::integral_constant<int, 256>{});
}

// The one head dim whose kernels also come single-buffered: its double-buffered blocks can
// outgrow a GPU's (smaller head dims fit an A100's twice over).
constexpr int kSingleBufferedHeadDim = 256;

// Calls f(D, Buffers) (integral constants) for the kernel compiled for these head dims with
// `buffers` streamed-tile buffers (1 only at kSingleBufferedHeadDim; 2 elsewhere).
template <typename F>
void with_instance(int64_t head_dim, int64_t value_dim, int buffers, F&& f) {
  with_head_dim(head_dim, value_dim, [&](auto d) {
    if constexpr (decltype(d)::value == kSingleBufferedHeadDim) {
      if (buffers == 1) {
        f(d, std::integral_constant<int, 1>{});
        return;
      }
    }
    f(d, std::integral_constant<int, 2>{});
  });
}

inline int64_t shared_bytes_of(int64_t head_dim, int64_t value_dim, int buffers = 2) {
  int64_t bytes = 0;
  with_instance(head_dim, value_dim, buffers, [&](auto d, auto n) {
    bytes = Layout<decltype(d)::value, decltype(n)::value>::kBytes;
  });
  return bytes;
}

// A warp's registers that live across the block's barriers: the fp32 output accumulators of its
// 16 query rows, and per row half (rows g and g + 8 of lane group g) the running maximum of the
// scaled scores and this lane's part of the sum of their exponentials.
template <int D>
struct WarpState {
  Accumulator o[D / 8][4];
  Lanes<float> row_max[2], row_sum[2];
};

}  // namespace flash
}  // namespace linattn
