// Sequence parallelism of the linear-attention CPU kernel, for batch·heads below the thread
// count: each sequence is cut into P segments, one task each. A segment needs the state of the
// keys before it (and, backward, the state gradient of the queries after it when causal; of
// all queries when not), so first the partial states of pieces of the sequence are computed in
// parallel, then each segment's task sums the pieces it needs in a fixed order (deterministic
// for a thread count) and runs. Causal prefixes need the pieces before the last segment only,
// cut P to a segment so that every thread has one: the extra work is the state pass over
// (P − 1)/P of the sequence, about 1/4 of a causal forward's GEMM work spread over P threads.
// Part of each instruction-set build.
#pragma once

#include "chunk_kernel.h"

#include <ATen/Parallel.h>

#include <vector>

namespace linattn {
namespace LINATTN_ISA {
namespace {

constexpr int64_t kStateChunk = 256;

// Segments per sequence: as many as make batch·heads·P tasks fill the threads, each of at
// least 4 chunks (shorter ones would spend more on states than they gain).
int64_t segments_per_sequence(const LinearAttentionShape& s, int64_t C) {
  const int64_t tasks = s.batch * s.heads;
  const int64_t threads = at::get_num_threads();
  if (tasks == 0 || tasks >= threads) return 1;
  const int64_t parts = (threads + tasks - 1) / tasks;
  return std::max<int64_t>(1, std::min(parts, std::max(s.q_len, s.k_len) / (4 * C)));
}

// Row p·T/P of P, rounded to the chunk grid.
int64_t segment_bound(int64_t T, int64_t P, int64_t p, int64_t C) {
  if (p >= P) return T;
  return std::min(T, (p * T / P) / C * C);
}

// A piece of phase 1: the partial state of keys (or the state gradient of queries) in [begin,
// end); slot is the segment the rows belong to.
struct Piece {
  bool queries;
  int64_t begin, end, slot;
};

template <typename scalar_t, typename acc_t>
class SequenceParallel {
 public:
  SequenceParallel(const LinearAttentionShape& s, int64_t C, int64_t P, const Operands<scalar_t, acc_t>& x)
      : s_(s), C_(C), P_(P), x_(x), width_(s.feature_dim * (s.value_dim + 1)) {}

  void forward() {
    // Non-causal: pieces = segments of the keys, all summed. Causal: segment starts' prefixes.
    const std::vector<Piece> pieces = key_pieces();
    compute(pieces);
    run_segments([&](Kernel<scalar_t, acc_t>& kernel, int64_t bh, int64_t p) {
      load_prefix(kernel, false, x_.initial, bh, pieces, s_.causal ? p : P_);
      const int64_t N = s_.q_len;
      kernel.forward_rows(x_, bh, segment_bound(N, P_, p, C_), segment_bound(N, P_, p + 1, C_));
      if (p == P_ - 1) kernel.pack_state(x_.final_state, kernel.S.data(), kernel.z.data(), bh);
    });
  }

  void backward() {
    // Non-causal with the forward's final state at hand, no key states are needed.
    std::vector<Piece> pieces = x_.seen_state ? std::vector<Piece>() : key_pieces();
    const std::vector<Piece> queries = query_pieces();
    pieces.insert(pieces.end(), queries.begin(), queries.end());
    compute(pieces);
    run_segments([&](Kernel<scalar_t, acc_t>& kernel, int64_t bh, int64_t p) {
      const int64_t N = s_.q_len, M = s_.k_len;
      if (x_.seen_state)
        kernel.unpack_state(kernel.S.data(), kernel.z.data(), x_.seen_state, bh);
      else
        load_prefix(kernel, false, x_.initial, bh, pieces, s_.causal ? p : P_);
      // The state gradient of the queries after this segment (causal), or of all (not).
      load_prefix(kernel, true, x_.grad_final, bh, pieces, s_.causal ? p + 1 : 0);
      kernel.query_grads(x_, bh, segment_bound(N, P_, p, C_), segment_bound(N, P_, p + 1, C_));
      if (p == P_ - 1) kernel.add_final_state_term(x_, bh);  // [S | z] is the final state now
      kernel.key_grads_rows(x_, bh, segment_bound(M, P_, p, C_), segment_bound(M, P_, p + 1, C_));
      if (p == 0) kernel.pack_state(x_.grad_initial, kernel.Rs.data(), kernel.rz.data(), bh);
    });
  }

 private:
  // Keys: non-causal, the P segments; causal, each of the first P − 1 segments cut in P.
  std::vector<Piece> key_pieces() const {
    std::vector<Piece> pieces;
    const int64_t M = s_.k_len;
    for (int64_t p = 0; p < (s_.causal ? P_ - 1 : P_); ++p) {
      const int64_t b = segment_bound(M, P_, p, C_), e = segment_bound(M, P_, p + 1, C_);
      const int64_t cuts = s_.causal ? P_ : 1;
      for (int64_t c = 0; c < cuts; ++c)
        pieces.push_back({false, b + (e - b) * c / cuts, b + (e - b) * (c + 1) / cuts, p});
    }
    return pieces;
  }

  // Queries: non-causal, the P segments (slot 0: summed whole); causal, each of the last P − 1
  // segments cut in P (slot p: the segment).
  std::vector<Piece> query_pieces() const {
    std::vector<Piece> pieces;
    const int64_t N = s_.q_len;
    for (int64_t p = s_.causal ? 1 : 0; p < P_; ++p) {
      const int64_t b = segment_bound(N, P_, p, C_), e = segment_bound(N, P_, p + 1, C_);
      const int64_t cuts = s_.causal ? P_ : 1;
      for (int64_t c = 0; c < cuts; ++c)
        pieces.push_back({true, b + (e - b) * c / cuts, b + (e - b) * (c + 1) / cuts, p});
    }
    return pieces;
  }

  // Phase 1: every piece of every (batch, head) in parallel, each into its own buffer.
  void compute(const std::vector<Piece>& pieces) {
    const int64_t n = static_cast<int64_t>(pieces.size()), BH = s_.batch * s_.heads;
    partial_.assign(BH * n * width_, acc_t(0));
    pieces_ = n;
    at::parallel_for(0, BH * n, 1, [&](int64_t begin, int64_t end) {
      // State passes have no intra-chunk products: long chunks make their GEMMs efficient.
      Kernel<scalar_t, acc_t> kernel(s_, kStateChunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / n;
        const Piece& piece = pieces[task % n];
        auto& A = piece.queries ? kernel.Rs : kernel.S;
        auto& a = piece.queries ? kernel.rz : kernel.z;
        kernel.unpack_state(A.data(), a.data(), nullptr, 0);
        if (piece.queries)
          kernel.add_query_grad_states(x_, bh, piece.begin, piece.end);
        else
          kernel.add_key_states(x_, bh, piece.begin, piece.end);
        kernel.pack_state(partial_.data() + task * width_, A.data(), a.data(), 0);
      }
    });
  }

  // The kernel's [S | z] (or, for queries, [Rs | rz]) = base (or 0) combined with the partial
  // states of the pieces of that kind with slot below `bound` (keys: in order, towards the
  // segment) or at least `bound` (queries: in reverse order, from the end). A fading state
  // fades what is carried across each piece: sum = e^{Σ log f over the piece}·sum + piece.
  void load_prefix(Kernel<scalar_t, acc_t>& kernel, bool queries, const acc_t* base, int64_t bh,
                   const std::vector<Piece>& pieces, int64_t bound) {
    std::vector<acc_t> sum(width_, acc_t(0));
    if (base) std::copy(base + bh * width_, base + (bh + 1) * width_, sum.begin());
    for (int64_t n = 0; n < pieces_; ++n) {
      const int64_t i = queries ? pieces_ - 1 - n : n;
      const Piece& piece = pieces[i];
      if (piece.queries != queries || (queries ? piece.slot < bound : piece.slot >= bound)) continue;
      const acc_t* part = partial_.data() + (bh * pieces_ + i) * width_;
      // One factor for the whole state, or per channel one per row of it (decay_width = m).
      const int64_t w = s_.decay_width, row = s_.value_dim + 1;
      std::vector<acc_t> fade(w, acc_t(1));
      if (x_.log_decay) {
        for (int64_t c = 0; c < w; ++c) {
          acc_t total = 0;
          for (int64_t t = piece.begin; t < piece.end; ++t) total += x_.log_decay[(bh * s_.q_pitch + t) * w + c];
          fade[c] = exp_nonpositive(total);
        }
      }
      for (int64_t j = 0; j < width_; ++j) sum[j] = fade[w == 1 ? 0 : j / row] * sum[j] + part[j];
    }
    if (queries)
      kernel.unpack_state(kernel.Rs.data(), kernel.rz.data(), sum.data(), 0);
    else
      kernel.unpack_state(kernel.S.data(), kernel.z.data(), sum.data(), 0);
  }

  // Phase 2: (batch, head, segment) tasks in parallel.
  template <typename Body>
  void run_segments(Body body) {
    at::parallel_for(0, s_.batch * s_.heads * P_, 1, [&](int64_t begin, int64_t end) {
      Kernel<scalar_t, acc_t> kernel(s_, C_);
      for (int64_t task = begin; task < end; ++task) body(kernel, task / P_, task % P_);
    });
  }

  const LinearAttentionShape& s_;
  int64_t C_, P_;
  const Operands<scalar_t, acc_t>& x_;
  int64_t width_;  // m·(dv + 1): one augmented state
  int64_t pieces_ = 0;
  std::vector<acc_t> partial_;
};

}  // namespace
}  // namespace LINATTN_ISA
}  // namespace linattn
