// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// counter-based generator, so any engine can draw the same number for the same counter in any
// order — the attention dropout mask of the restricted softmax (docs/methods.md §5) is a pure
// function of (seed, batch·head, query, key), drawn again by the backward instead of stored.
// Checked against Random123's known-answer vectors and ATen's Philox4_32 (tests/ops/test_dropout.py).
#pragma once

#include "host_device.h"

#include <cstdint>

namespace linattn {

struct Philox4 {
  uint32_t x[4];
};

LINATTN_HD inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t key) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  LINATTN_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Attention dropout (flash-attn's and SDPA's semantics: probabilities dropped after the softmax's
// normalization, the kept ones scaled by 1 / (1 − p)). The 32 random bits of the pair (query i,
// key j) of flattened batch·head bh: word j mod 4 of the counter (j / 4, i, bh, 0) — four
// neighbouring keys share one evaluation where an engine draws them together.
// The four words of keys [4·quad, 4·quad + 4) of that row.
LINATTN_HD inline Philox4 dropout_quad(uint64_t seed, int64_t bh, int64_t i, int64_t quad) {
  return philox4x32_10(static_cast<uint32_t>(quad), static_cast<uint32_t>(i), static_cast<uint32_t>(bh), 0u, seed);
}

// Key j's word of its quad's evaluation.
LINATTN_HD inline uint32_t dropout_word(const Philox4& r, int64_t j) {
  const int word = static_cast<int>(j & 3);  // selected, not indexed: r stays in registers on a GPU
  return word == 0 ? r.x[0] : word == 1 ? r.x[1] : word == 2 ? r.x[2] : r.x[3];
}

LINATTN_HD inline uint32_t dropout_bits(uint64_t seed, int64_t bh, int64_t i, int64_t j) {
  return dropout_word(dropout_quad(seed, bh, i, j >> 2), j);
}

// A pair is kept when its bits reach the threshold: probability 1 − threshold / 2^32 ≈ 1 − p.
LINATTN_HD inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

}  // namespace linattn
