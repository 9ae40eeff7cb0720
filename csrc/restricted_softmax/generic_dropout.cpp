// The device-generic dropout mask (generic_dropout.h): Philox4x32-10 in int64 ATen ops.
//
// Each 32-bit word lives in an int64 tensor in [0, 2^32). Philox's products of a word and a 32-bit
// multiplier reach 2^64, past int64, so the word is split into 16-bit halves whose products stay
// below 2^49 (exact, no overflow on any backend). One evaluation costs about 200 elementwise
// passes, so runs of consecutive keys evaluate once per quad of four keys (its four words, as the
// CPU kernel does); the flash engine draws the same bits in registers.
#include "generic_dropout.h"

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

namespace linattn::restricted_generic {
namespace {

constexpr int64_t kWord = 0xFFFFFFFF, kHalf = 0xFFFF;

// Pairs drawn at once: Philox keeps about eight int64 tensors of this size alive (256 MiB).
constexpr int64_t kDropoutChunk = int64_t{1} << 22;

// (high, low) 32-bit halves of x · m, for x in [0, 2^32) and a multiplier m < 2^32:
// x · m = mid · 2^16 + (low mod 2^16), mid = x_hi · m + low / 2^16, low = x_lo · m.
std::pair<at::Tensor, at::Tensor> mul_hi_lo(const at::Tensor& x, int64_t m) {
  at::Tensor low = x.bitwise_and(kHalf).mul_(m);                                    // < 2^48
  at::Tensor mid = at::bitwise_right_shift(x, 16).mul_(m).add_(at::bitwise_right_shift(low, 16));  // < 2^49
  at::Tensor high = at::bitwise_right_shift(mid, 16);
  at::Tensor lo = mid.bitwise_and_(kHalf).mul_(int64_t{1} << 16).bitwise_or_(low.bitwise_and_(kHalf));
  return {high, lo};
}

// The four words of Philox4x32-10 (common/philox.h's philox4x32_10) of counters (c0, c1, c2, 0)
// given as broadcasting int64 tensors of 32-bit values.
std::array<at::Tensor, 4> philox(at::Tensor c0, at::Tensor c1, at::Tensor c2, uint64_t key) {
  at::Tensor c3 = at::zeros({1}, c0.options());
  int64_t k0 = static_cast<int64_t>(key & kWord), k1 = static_cast<int64_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    auto [high0, low0] = mul_hi_lo(c0, 0xD2511F53);
    auto [high1, low1] = mul_hi_lo(c2, 0xCD9E8D57);
    c0 = high1.bitwise_xor(c1).bitwise_xor_(k0);
    c2 = high0.bitwise_xor(c3).bitwise_xor_(k1);
    c1 = std::move(low1);
    c3 = std::move(low0);
    k0 = (k0 + 0x9E3779B9) & kWord;
    k1 = (k1 + 0xBB67AE85) & kWord;
  }
  return {c0, c1, c2, c3};
}

// The kept pairs' factors from their Philox bits, in dtype (the scale rounded to dtype, as the kernels do).
at::Tensor factors_of(const WindowAttentionShape& s, const at::Tensor& bits, at::ScalarType dtype) {
  return bits.ge(static_cast<int64_t>(s.dropout_threshold)).to(dtype).mul_(s.dropout_scale);
}

// One Philox evaluation per pair: word j mod 4 of the counter (j / 4, i, bh, 0) (dropout_bits).
at::Tensor pair_factors(const WindowAttentionShape& s, const at::Tensor& bh, const at::Tensor& rows,
                        const at::Tensor& keys, at::ScalarType dtype) {
  const at::Tensor key = keys.bitwise_and(kWord).unsqueeze(-2);  // (n, 1, c)
  const at::Tensor word = key.bitwise_and(3);
  const auto w = philox(at::bitwise_right_shift(key, 2), rows.bitwise_and(kWord).unsqueeze(-1),
                        bh.bitwise_and(kWord), s.dropout_seed);
  return factors_of(s, at::where(word.eq(0), w[0], at::where(word.eq(1), w[1], at::where(word.eq(2), w[2], w[3]))),
                    dtype);
}

// One evaluation per quad of keys: runs of `length` keys from `starts` (n, R), every start ≡
// `alignment` (mod 4); the words of each run's quads, laid end to end, are its keys' bits from
// word `alignment` on.
at::Tensor run_factors(const WindowAttentionShape& s, const at::Tensor& bh, const at::Tensor& rows,
                       const at::Tensor& starts, int64_t length, int64_t alignment, at::ScalarType dtype) {
  const int64_t quads = (alignment + length + 3) / 4;
  const at::Tensor first_quad = starts.div(4, "floor");  // keys are 4·quad + word, word in [0, 4)
  const at::Tensor quad = (first_quad.unsqueeze(-1) + at::arange(quads, starts.options())).bitwise_and_(kWord);
  const int64_t n = starts.size(0), R = starts.size(1);
  const auto w = philox(quad.view({n, 1, R * quads}), rows.bitwise_and(kWord).unsqueeze(-1), bh.bitwise_and(kWord),
                        s.dropout_seed);  // (..., n, L, R·quads) each
  const at::Tensor words = at::stack({w[0], w[1], w[2], w[3]}, -1);  // (..., n, L, R·quads, 4)
  std::vector<int64_t> runs = words.sizes().vec();
  runs.resize(runs.size() - 2);
  runs.insert(runs.end(), {R, quads * 4});
  return factors_of(s, words.reshape(runs).narrow(-1, alignment, length).flatten(-2), dtype);
}

// The factors of the pairs (bh, rows, keys) of one chunk, keys given as KeyRuns.
at::Tensor chunk_factors(const WindowAttentionShape& s, const at::Tensor& bh, const at::Tensor& rows,
                         const KeyRuns& keys, int64_t first_block, int64_t blocks, at::ScalarType dtype) {
  std::vector<at::Tensor> parts;
  if (keys.starts.defined())
    parts.push_back(run_factors(s, bh, rows, keys.starts.narrow(0, first_block, blocks), keys.length,
                                keys.alignment, dtype));
  if (keys.single.defined() && keys.single.size(1) > 0)
    parts.push_back(pair_factors(s, bh, rows, keys.single.narrow(0, first_block, blocks), dtype));
  return parts.size() == 1 ? parts.front() : at::cat(parts, -1);
}

}  // namespace

at::Tensor dropout_factors(const WindowAttentionShape& s, const at::Tensor& bh, const at::Tensor& rows,
                           const KeyRuns& keys, at::ScalarType dtype) {
  const int64_t n = rows.size(0), L = rows.size(1), c = keys.columns();
  std::vector<int64_t> leading = bh.sizes().vec();  // (..., n or 1, 1, 1): the pairs' (..., n, L, c)
  leading.resize(leading.size() - 3);
  int64_t leading_count = 1;
  for (int64_t size : leading) leading_count *= size;
  std::vector<int64_t> shape = leading;
  shape.insert(shape.end(), {n, L, c});
  const at::Tensor factors = at::empty(shape, rows.options().dtype(dtype));
  // Whole blocks (n) at a time, or rows of one block where a block alone exceeds a chunk.
  const int64_t per_block = leading_count * L * c;
  const int64_t blocks_at_once = std::max<int64_t>(1, kDropoutChunk / std::max<int64_t>(1, per_block));
  const int64_t rows_at_once = std::max<int64_t>(1, kDropoutChunk / std::max<int64_t>(1, leading_count * c));
  const int64_t block_dim = static_cast<int64_t>(leading.size());
  const bool bh_per_block = bh.size(block_dim) > 1;
  for (int64_t b0 = 0; b0 < n; b0 += blocks_at_once) {
    const int64_t nb = std::min(blocks_at_once, n - b0);
    const at::Tensor bh_blocks = bh_per_block ? bh.narrow(block_dim, b0, nb) : bh;
    const at::Tensor block_rows = rows.narrow(0, b0, nb), target = factors.narrow(block_dim, b0, nb);
    if (nb > 1 || per_block <= kDropoutChunk) {
      target.copy_(chunk_factors(s, bh_blocks, block_rows, keys, b0, nb, dtype));
      continue;
    }
    for (int64_t r0 = 0; r0 < L; r0 += rows_at_once) {
      const int64_t nr = std::min(rows_at_once, L - r0);
      target.narrow(block_dim + 1, r0, nr)
          .copy_(chunk_factors(s, bh_blocks, block_rows.narrow(1, r0, nr), keys, b0, 1, dtype));
    }
  }
  return factors;
}

}  // namespace linattn::restricted_generic
