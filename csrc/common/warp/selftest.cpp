// linattn::_warp_mma_selftest: one warp of the host emulation loads A (16x16) and B (16x8) from
// shared memory with ldmatrix and multiplies them with mma.m16n8k16, returning D and every lane's
// registers, so that tests/ops/test_warp_layer.py checks the emulated fragment layouts against
// the PTX ISA's tables, written there independently, for each way the kernels load operands.
#include "host_block.h"
#include "warp_ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace linattn {
namespace warp {
namespace {

struct NoState {};

template <typename half_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mma_selftest(const at::Tensor& a, const at::Tensor& b,
                                                                        bool a_stored_transposed,
                                                                        bool b_stored_transposed) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({16, 8}),
              "_warp_mma_selftest: a must be 16x16 and b 16x8");
  const auto A = a.to(at::kFloat).contiguous(), B = b.to(at::kFloat).contiguous();
  constexpr int kPitch = 48;                   // bytes per stored row (16 halves + 16 bytes)
  constexpr int kA = 0, kB = 16 * kPitch;      // A: 16 rows; B: 16 rows of [k][n] or 8 of [n][k]
  EmulationCounters counters;
  const CountingScope counting(counters);
  HostBlock<NoState> block(1, 32 * kPitch);
  block.reset();
  auto d = at::zeros({16, 8}, at::kFloat);
  auto a_regs = at::empty({32, 4}, at::kLong), b_regs = at::empty({32, 2}, at::kLong);
  auto d_regs = at::empty({32, 4}, at::kFloat);
  block([&](const WarpContext& w, NoState&) {
    // Store A as rows [m][k] (or [k][m]) and B as rows [k][n] (or [n][k]).
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) {
        const float x = a_stored_transposed ? A[c][r].item<float>() : A[r][c].item<float>();
        store_shared<uint16_t>(w, kA + r * kPitch + 2 * c, half_t(x).x);
      }
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 8; ++c) {
        if (b_stored_transposed) {
          store_shared<uint16_t>(w, kB + c * kPitch + 2 * r, half_t(B[r][c].item<float>()).x);
        } else {
          store_shared<uint16_t>(w, kB + r * kPitch + 2 * c, half_t(B[r][c].item<float>()).x);
        }
      }
    Fragment fa[4], fb[2];
    Lanes<uint32_t> offset;
    // A: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15,
    // cols 8-15) of A; stored transposed, the same blocks read with .trans.
    for (int lane = 0; lane < 32; ++lane) {
      const int m = lane / 8, r = lane % 8;
      const int row_block = m % 2 * 8, col_block = m / 2 * 8;  // of A
      offset[lane] = a_stored_transposed ? kA + (col_block + r) * kPitch + row_block * 2
                                         : kA + (row_block + r) * kPitch + col_block * 2;
    }
    if (a_stored_transposed) ldmatrix_x4<true>(w, fa, offset);
    else ldmatrix_x4<false>(w, fa, offset);
    // B: matrices (k 0-7) and (k 8-15); stored [k][n] they are read with .trans.
    for (int lane = 0; lane < 32; ++lane) {
      const int m = lane / 8 % 2, r = lane % 8;
      offset[lane] = b_stored_transposed ? kB + r * kPitch + m * 16 : kB + (m * 8 + r) * kPitch;
    }
    if (b_stored_transposed) ldmatrix_x2<false>(w, fb, offset);
    else ldmatrix_x2<true>(w, fb, offset);
    Accumulator acc[4];
    for (int i = 0; i < 4; ++i)
      for (int lane = 0; lane < 32; ++lane) acc[i][lane] = 0.0f;
    mma_16816<half_t>(acc, fa, fb);
    for (int lane = 0; lane < 32; ++lane) {
      const int g = group_of(lane), t = thread_in_group(lane);
      for (int i = 0; i < 4; ++i) {
        a_regs[lane][i] = static_cast<int64_t>(fa[i][lane]);
        d_regs[lane][i] = acc[i][lane];
        d[g + 8 * (i / 2)][2 * t + i % 2] = acc[i][lane];
      }
      for (int i = 0; i < 2; ++i) b_regs[lane][i] = static_cast<int64_t>(fb[i][lane]);
    }
  });
  block.finish();
  emulation_totals().add(counters);
  return {d, a_regs, b_regs, d_regs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> warp_mma_selftest(const at::Tensor& a, const at::Tensor& b,
                                                                             bool a_stored_transposed,
                                                                             bool b_stored_transposed, bool fp16) {
  return fp16 ? mma_selftest<c10::Half>(a, b, a_stored_transposed, b_stored_transposed)
              : mma_selftest<c10::BFloat16>(a, b, a_stored_transposed, b_stored_transposed);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def("_warp_mma_selftest(Tensor a, Tensor b, bool a_stored_transposed, bool b_stored_transposed, bool fp16) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // (CPU: the emulation is what it tests; the inputs are small host tensors)
}

TORCH_LIBRARY_IMPL(linattn, CPU, m) { m.impl("_warp_mma_selftest", &warp_mma_selftest); }

}  // namespace warp
}  // namespace linattn
