"""The warp-operation layer's host emulation (csrc/common/warp/) against the PTX ISA.

The tensor-core kernels are written once against ldmatrix and mma.m16n8k16; on a CPU they run
through an emulation of those instructions. These tests check the emulation's fragment layouts
against the tables of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type";
"ldmatrix"), written out again here from the ISA and not from the C++ code, for every way the
kernels load an operand: A row-major (φ(Q)) and transposed in memory (φ(K)ᵀ of the state update),
B stored [k][n] (V, the state) and [n][k] (the keys of the scores)."""
import itertools

import pytest
import torch

SELFTEST = torch.ops.linattn._warp_mma_selftest.default
HALVES = {False: torch.bfloat16, True: torch.float16}


def halves_of(registers, dtype):
    """(lo, hi) 16-bit values of 32-bit registers (int64 tensor holding uint32 values)."""
    bits = registers.to(torch.int64)
    lo = (bits & 0xFFFF).to(torch.int32).to(torch.int16)
    hi = ((bits >> 16) & 0xFFFF).to(torch.int32).to(torch.int16)
    return lo.view(dtype).float(), hi.view(dtype).float()


def exact_matrix(rows, cols, seed):
    """Small integers: exact in bf16 and fp16, and their products' sums exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (rows, cols), generator=g).float()


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("a_transposed, b_transposed", list(itertools.product([False, True], repeat=2)))
def test_fragments_follow_the_ptx_isa(fp16, a_transposed, b_transposed):
    A, B = exact_matrix(16, 16, 1), exact_matrix(16, 8, 2)
    D, a_regs, b_regs, d_regs = SELFTEST(A, B, a_transposed, b_transposed, fp16)
    a_lo, a_hi = halves_of(a_regs, HALVES[fp16])
    b_lo, b_hi = halves_of(b_regs, HALVES[fp16])
    for lane in range(32):
        group, thread = lane // 4, lane % 4
        # A: a0,a1 (row group, cols 2t, 2t+1); a2,a3 (row group+8); a4,a5 (cols +8); a6,a7 (both).
        for reg, (row, col) in enumerate([(group, 2 * thread), (group + 8, 2 * thread),
                                          (group, 2 * thread + 8), (group + 8, 2 * thread + 8)]):
            assert a_lo[lane, reg] == A[row, col] and a_hi[lane, reg] == A[row, col + 1], (lane, reg)
        # B: b0,b1 (rows 2t, 2t+1, col group); b2,b3 (rows +8).
        for reg, row in enumerate([2 * thread, 2 * thread + 8]):
            assert b_lo[lane, reg] == B[row, group] and b_hi[lane, reg] == B[row + 1, group], (lane, reg)
        # C/D: c0,c1 (row group, cols 2t, 2t+1); c2,c3 (row group+8).
        for reg, (row, col) in enumerate([(group, 2 * thread), (group, 2 * thread + 1),
                                          (group + 8, 2 * thread), (group + 8, 2 * thread + 1)]):
            assert d_regs[lane, reg] == (A @ B)[row, col], (lane, reg)
    assert torch.equal(D, A @ B)


def test_rounds_inputs_to_the_16_bit_type():
    """Operands are the 16-bit values (round to nearest even), products accumulate in fp32."""
    A = torch.full((16, 16), 1.0 + 2.0 ** -9)  # halfway between two bf16 values: rounds to 1 (even)
    B = torch.ones(16, 8)
    D, *_ = SELFTEST(A, B, False, False, False)
    assert torch.equal(D, torch.full((16, 8), 16.0))
    D, *_ = SELFTEST(A, B, False, False, True)  # fp16 has the bits: 1 + 2^-9 exactly
    assert torch.equal(D, torch.full((16, 8), 16.0 * (1.0 + 2.0 ** -9)))


def test_counters_count_what_ran():
    torch.ops.linattn._reset_warp_emulation_counters()
    SELFTEST(exact_matrix(16, 16, 3), exact_matrix(16, 8, 4), False, False, False)
    mma, matrices, wavefronts, shuffles, read, written = torch.ops.linattn._warp_emulation_counters().tolist()
    assert (mma, matrices, shuffles, read, written) == (1, 6, 0, 0, 0)
    # The selftest's rows are 48 bytes apart: the 8 rows of a matrix hit the bank groups
    # 0, 12, 24, 4, 16, 28, 8, 20 (in 4-byte banks): no conflicts.
    assert wavefronts == matrices
