// Attention dropout in the device-generic restricted softmax: the mask of a tile's pairs drawn as
// tensors, bit for bit the one the CPU kernel and the flash engine draw pair by pair
// (common/philox.h's dropout_bits; docs/methods.md §5), so a call drops the same pairs on every device.
#pragma once

#include "kernel.h"

#include <ATen/ATen.h>

#include <cstdint>

namespace linattn::restricted_generic {

// A tile's keys per block of rows (n blocks): runs of `length` consecutive keys from `starts`
// (n, R), each start ≡ `alignment` (mod 4), then the keys in `single` (n, S), in that order; either
// part may be undefined. Runs draw one Philox evaluation per four keys, single keys one each.
struct KeyRuns {
  at::Tensor starts;
  int64_t length = 0, alignment = 0;
  at::Tensor single;

  int64_t columns() const {
    return (starts.defined() ? starts.size(1) * length : 0) + (single.defined() ? single.size(1) : 0);
  }
};

// The factors dropout_scale (kept) or 0 (dropped) of the call `s`'s pairs (bh, row, key) in
// `dtype`, shaped as the broadcast of `bh` (flattened batch·head, broadcasting against
// (..., n, 1, 1)), `rows` (n, L) and the keys (n, c) to (..., n, L, c). Indices outside the tensors
// (padding) draw some factor, as every pair does; the tiles never see them. Philox's int64
// temporaries are bounded by drawing at most kDropoutChunk pairs at a time.
at::Tensor dropout_factors(const WindowAttentionShape& s, const at::Tensor& bh, const at::Tensor& rows,
                           const KeyRuns& keys, at::ScalarType dtype);

}  // namespace linattn::restricted_generic
