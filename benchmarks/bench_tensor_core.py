"""The tensor-core kernels (linear attention's forward, csrc/linear_attention/tensor_core/, and the
restricted-softmax flash engine, csrc/restricted_softmax/flash/): the figures a machine without a
GPU can give, from the warp emulation and the compiled cubins.

  - linear attention: emulated global traffic of one forward as a multiple of its floor (reading
    q, k, v and writing o once), and ldmatrix wavefronts per 8x8 matrix (1.00 = no bank
    conflicts), at the issue's shape: B=1 H=2 D=128 T=4096 bf16, causal and not; the same for
    one backward (floor: q, k, v, o, grad_out read, dq, dk, dv written once), and for one at
    D=256 (four 128 x 128 tiles); the same for a causal forward and backward of packed sequences
    (cu_seqlens, documents of mixed lengths);
  - the flash engine, sliding window (256, 256) and causal at B=1 H=2 D=64 T=4096 bf16: score
    pairs computed per visible pair (the tiles' waste at the band's edges), K/V bytes read per
    visited key tile's bytes (1.00 = each visited tile read once) and wavefronts per matrix;
  - per compiled kernel (sm_80 and sm_90, from `cuobjdump -res-usage`): registers, stack and
    local memory, tensor-core instructions (HMMA) in its SASS, shared memory per block, and the
    blocks per SM an H100 fits (registers and shared memory per block, as the CUDA occupancy
    calculator counts them).

    python -m benchmarks.bench_tensor_core [--quick]

cuobjdump and nvdisasm come from NVIDIA's PyPI packages (nvidia-cuda-cuobjdump,
nvidia-cuda-nvdisasm); without them, or in a build without the CUDA kernels, the cubin table is
left out. Writes results/tensor_core.json.
"""
import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys

import torch

import linattn
from benchmarks.common import machine_info, write_results

ELU = 1
H100 = {"registers": 65536, "shared": 228 * 1024, "reserved_per_block": 1024, "threads": 2048, "blocks": 32}


# The compiled kernels by family: how to read (DK, DV, dtype) from a mangled name, threads per
# block (kThreads; for the flash backward a function of D: BackwardShape) and shared memory per
# block for the head-dim instance.
def _linear_instance(m):  # gated: a fading state; channels: gates per channel (GLA)
    gated = " gated" if m.group(6) == "1" else ""
    return int(m.group(2)), int(m.group(3)), m.group(5) + gated + (CHANNELS if m.group(7) == "1" else "")


def _linear_backward_instance(m):
    gated = " gated" if m.group(7) == "1" else ""
    return int(m.group(3)), int(m.group(4)), f"{m.group(6)} {m.group(2)}{gated}{CHANNELS if m.group(8) == '1' else ''}"


SINGLE_BUFFERED = " single-buffered"  # the flash engine's D = 256 blocks for GPUs whose blocks hold less (A100)


def _flash_instance(m):
    return int(m.group(2)), int(m.group(2)), m.group(5) + (SINGLE_BUFFERED if m.group(3) == "1" else "")


CHANNELS = " channels"  # the instances for gates per channel (linear attention: GLA; the delta rule: KDA)


def _delta_forward_instance(m):  # the keeping instance re-walks the state for the backward
    keeping = " keeping" if m.group(6) == "1" else ""
    return int(m.group(2)), int(m.group(3)), m.group(5) + keeping + (CHANNELS if m.group(7) == "1" else "")


def _delta_walk_instance(m):  # 64 value columns a block
    return int(m.group(2)), 64, m.group(4) + (CHANNELS if m.group(5) == "1" else "")


def _flash_backward_instance(m):
    single = SINGLE_BUFFERED if m.group(6) == "1" else ""
    return int(m.group(5)), int(m.group(5)), f"{m.group(4)} {m.group(2)}{single}"


def _flash_shared(backward):
    def shared(d, _, label):
        return torch.ops.linattn._flash_shared_bytes(d, d, backward, 1 if SINGLE_BUFFERED in label else 2)
    return shared


KERNELS = {
    "linear": {"pattern": r"Function (\S*tensor_core\S*\dforward_kernelILi(\d+)ELi(\d+)EN3c10(\d+)(\w+?)ELb([01])"
                          r"ELb([01])EEEv\S*):",
               "instance": _linear_instance, "threads": 256,
               "shared": lambda dk, dv, label: torch.ops.linattn._tensor_core_shared_bytes(dk, dv, False,
                                                                                           CHANNELS in label)},
    "linear-bwd": {"pattern": r"Function (\S*tensor_core\S*(query|key_value)_gradient_kernelILi(\d+)ELi(\d+)EN3c10"
                              r"(\d+)(\w+?)ELb([01])ELb([01])EEEv\S*):",
                   "instance": _linear_backward_instance, "threads": 256,
                   "shared": lambda dk, dv, label: torch.ops.linattn._tensor_core_shared_bytes(dk, dv, True,
                                                                                               CHANNELS in label)},
    "delta": {"pattern": r"Function (\S*delta_tensor_core\S*delta_forward_kernelILi(\d+)ELi(\d+)EN3c10(\d+)(\w+?)"
                         r"ELb([01])ELb([01])EEEv\S*):",
              "instance": _delta_forward_instance, "threads": 256,
              "shared": lambda dk, dv, label: torch.ops.linattn._delta_tensor_core_shared_bytes(
                  dk, dv, False, CHANNELS in label)},
    "delta-bwd": {"pattern": r"Function (\S*delta_tensor_core\S*delta_backward_walk_kernelILi(\d+)EN3c10(\d+)(\w+?)"
                             r"ELb([01])EEEv\S*):",
                  "instance": _delta_walk_instance, "threads": 256,
                  "shared": lambda dk, _, label: torch.ops.linattn._delta_tensor_core_shared_bytes(
                      dk, 64, True, CHANNELS in label)},
    "flash": {"pattern": r"Function (\S*flash\S*forward_kernelILi(\d+)ELi(\d)EN3c10(\d+)(\w+?)EEEv\S*):",
              "instance": _flash_instance, "threads": 128, "shared": _flash_shared(False)},
    "flash-bwd": {"pattern": r"Function (\S*flash\S*backward_kernelINS0_\d+(KeyBlock|QueryBlock)"
                             r"IN3c10(\d+)(\w+?)ELi(\d+)ELi(\d)E\S*):",
                  "instance": _flash_backward_instance, "threads": lambda d: 256 if d > 128 else 128,
                  "shared": _flash_shared(True)},
}


def emulated_figures(T, D, causal, processors, gated=False, per_channel=False):
    """One forward at B=1 H=2 on an emulated GPU of `processors` SMs (2: one block per (batch,
    head), the whole kernel; 132, an H100's: the sequence split into segments); `gated`: with a
    fading state (fp32 log factors, whose read joins the floor; per_channel: GLA's (T, D) of them)."""
    os.environ["LINATTN_EMULATED_SMS"] = str(processors)
    q, k, v = (torch.randn(1, 2, T, D).mul(0.3).bfloat16() for _ in range(3))
    log_decay = -0.05 * torch.rand(1, 2, T, *((D,) if per_channel else ())) if gated else None
    torch.ops.linattn._reset_warp_emulation_counters()
    torch.ops.linattn.linear_attn_fwd_fused(q, k, v, None, None, ELU, causal, True, 1e-6, log_decay)
    del os.environ["LINATTN_EMULATED_SMS"]
    mma, matrices, wavefronts, shuffles, read, written = torch.ops.linattn._warp_emulation_counters().tolist()
    floor = 4 * 2 * T * D * 2 + (2 * T * 4 * (D if per_channel else 1) if gated else 0)
    return {"T": T, "D": D, "causal": causal, "gated": gated, "per_channel": per_channel, "processors": processors,
            "mma": mma, "mma_per_chunk": mma / (2 * -(-T // 64)),
            "read_bytes": read,
            "written_bytes": written,
            "traffic_over_floor": (read + written) / floor,
            "wavefronts_per_matrix": wavefronts / max(matrices, 1)}


def emulated_backward_figures(T, D, causal, processors, gated=False, per_channel=False):
    """One backward at B=1 H=2 (the forward's final state handed over, as autograd does) on an
    emulated GPU of `processors` SMs (2: a block per (batch, head); 132: the sequence split);
    `gated`: with a fading state (the log factors read and dL/dc written, fp32, join the floor;
    per_channel: GLA's, (T, D) of each)."""
    os.environ["LINATTN_EMULATED_SMS"] = str(processors)
    q, k, v = (torch.randn(1, 2, T, D).mul(0.3).bfloat16() for _ in range(3))
    log_decay = -0.05 * torch.rand(1, 2, T, *((D,) if per_channel else ())) if gated else None
    out, state, normalizer = torch.ops.linattn.linear_attn_fwd_fused(q, k, v, None, None, ELU, causal, True, 1e-6,
                                                                     log_decay)
    torch.ops.linattn._reset_warp_emulation_counters()
    torch.ops.linattn.linear_attn_bwd_fused(torch.randn_like(out), None, q, k, v, out, normalizer, None, None, ELU,
                                            causal, True, None if gated else state, log_decay)
    del os.environ["LINATTN_EMULATED_SMS"]
    mma, matrices, wavefronts, shuffles, read, written = torch.ops.linattn._warp_emulation_counters().tolist()
    floor = 8 * 2 * T * D * 2 + (2 * 2 * T * 4 * (D if per_channel else 1) if gated else 0)
    return {"T": T, "D": D, "causal": causal, "gated": gated, "per_channel": per_channel, "processors": processors,
            "mma": mma, "read_bytes": read,
            "written_bytes": written,
            "traffic_over_floor": (read + written) / floor, "wavefronts_per_matrix": wavefronts / max(matrices, 1)}


def packing_of(T):
    """cu_seqlens cutting T rows into documents of mixed lengths (none a multiple of the chunk)."""
    lengths, total = [], 0
    for length in itertools.cycle((700, 33, 1500, 250, 97)):
        length = min(length, T - total)
        if length <= 0:
            break
        lengths.append(length)
        total += length
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def emulated_packed_figures(T, D, processors, cu=None):
    """One causal forward and backward of T packed rows in documents of mixed lengths (packing_of,
    or the offsets `cu`), H=2, on an emulated GPU of `processors` SMs (1: a block per (sequence,
    head); 132, an H100's: long sequences split into segments): traffic over the same floors as
    above (forward: q, k, v read + o written; backward: q, k, v, o, grad_out read + dq, dk, dv
    written)."""
    os.environ["LINATTN_EMULATED_SMS"] = str(processors)
    q, k, v = (torch.randn(1, 2, T, D).mul(0.3).bfloat16() for _ in range(3))
    cu = packing_of(T) if cu is None else cu
    torch.ops.linattn._reset_warp_emulation_counters()
    out, _, normalizer = torch.ops.linattn.linear_attn_fwd_fused(q, k, v, None, None, ELU, True, True, 1e-6, None, cu)
    _, _, _, _, read, written = torch.ops.linattn._warp_emulation_counters().tolist()
    forward = (read + written) / (4 * 2 * T * D * 2)
    torch.ops.linattn._reset_warp_emulation_counters()
    torch.ops.linattn.linear_attn_bwd_fused(torch.randn_like(out), None, q, k, v, out, normalizer, None, None, ELU,
                                            True, True, None, None, cu)
    _, _, _, _, read, written = torch.ops.linattn._warp_emulation_counters().tolist()
    del os.environ["LINATTN_EMULATED_SMS"]
    lengths = (cu[1:] - cu[:-1]).tolist()
    return {"T": T, "D": D, "sequences": len(cu) - 1, "shortest": min(lengths), "longest": max(lengths),
            "processors": processors, "forward_traffic_over_floor": forward,
            "backward_traffic_over_floor": (read + written) / (8 * 2 * T * D * 2)}


def emulated_delta_figures(T, D, causal, processors, per_channel=False):
    """One delta-rule forward (Gated DeltaNet; per_channel: KDA, a gate per key channel) at B=1 H=2
    on an emulated GPU of `processors` SMs (2: a block per head; 132: causal calls split into
    segments, two passes): traffic over its floor (q, k, v, β, g read and o written once),
    wavefronts per ldmatrix matrix, and mma per 64-row chunk and head."""
    os.environ["LINATTN_EMULATED_SMS"] = str(processors)
    q, k, v = (torch.randn(1, 2, T, D).bfloat16() for _ in range(3))
    beta, gate = torch.rand(1, 2, T), -0.05 * torch.rand(1, 2, T, *((D,) if per_channel else ()))
    torch.ops.linattn._reset_warp_emulation_counters()
    torch.ops.linattn.delta_rule_fwd_fused(q, k, v, beta, gate, None, None, causal, D ** -0.5, True)
    del os.environ["LINATTN_EMULATED_SMS"]
    mma, matrices, wavefronts, shuffles, read, written = torch.ops.linattn._warp_emulation_counters().tolist()
    floor = 4 * 2 * T * D * 2 + 2 * 2 * T * 4 + (2 * T * D * 4 if per_channel else 0)
    return {"T": T, "D": D, "causal": causal, "processors": processors, "per_channel": per_channel, "mma": mma,
            "read_bytes": read,
            "written_bytes": written,
            "traffic_over_floor": (read + written) / floor, "wavefronts_per_matrix": wavefronts / max(matrices, 1),
            "mma_per_chunk": mma / (2 * -(-T // 64))}


def emulated_flash_figures(T, D, window, causal):
    """One flash forward at B=1 H=2 under a sliding window (left, right) (causal: right = 0)."""
    from linattn.ops.restricted import Pattern

    pattern = Pattern(window=(window, window), causal=causal)
    q, k, v = (torch.randn(1, 2, T, D).bfloat16() for _ in range(3))
    torch.ops.linattn._reset_warp_emulation_counters()
    torch.ops.linattn.restricted_softmax_fwd_fused(q, k, v, D ** -0.5, *pattern.op_args())
    mma, matrices, wavefronts, shuffles, read, written = torch.ops.linattn._warp_emulation_counters().tolist()
    visible = int(pattern.dense_mask(T, T).sum()) * 2
    mma_per_tile = 4 * (D // 16 * 8 + D // 8 * 4)  # 4 warps: scores (D/16 k-steps x 8) and P.V (4 x D/8)
    tiles = mma // mma_per_tile
    kv_read = read - 2 * T * D * 2  # all but the queries
    return {"T": T, "D": D, "window": window, "causal": causal, "mma": mma, "key_tiles": tiles,
            "computed_per_visible_pair": tiles * 64 * 64 / visible,
            "kv_reads_per_visited_tile": kv_read / (tiles * 64 * 2 * D * 2),
            "wavefronts_per_matrix": wavefronts / max(matrices, 1)}


def find_tool(name):
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for sub in ("cu13/bin", "cuda_cuobjdump/bin", "cuda_nvdisasm/bin"):
            path = os.path.join(root, sub, name)
            if os.path.exists(path):
                return path
    return None


def h100_blocks_per_sm(registers, shared_bytes, threads):
    """Blocks of `threads` threads per SM on an H100: registers are allocated per warp in units of
    256, shared memory per block plus 1 KiB the system reserves."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = H100["registers"] // (per_warp * threads // 32)
    by_shared = H100["shared"] // (shared_bytes + H100["reserved_per_block"])
    return min(by_registers, by_shared, H100["threads"] // threads, H100["blocks"])


def cubin_figures(library):
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        return None, "cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
    nvdisasm = find_tool("nvdisasm")
    env = dict(os.environ)
    if nvdisasm:
        env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    usage = subprocess.run([cuobjdump, "-res-usage", library], capture_output=True, text=True, env=env).stdout
    rows, arch = [], None
    lines = usage.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        for kernel, spec in KERNELS.items():
            m = re.search(spec["pattern"], line)
            if not m:
                continue
            figures = dict(re.findall(r"(\w+(?:\[\d\])?):(\d+)", lines[i + 1]))
            dk, dv, dtype = spec["instance"](m)
            rows.append({"kernel": kernel, "arch": arch, "function": m.group(1), "dk": dk, "dv": dv, "dtype": dtype,
                         "registers": int(figures["REG"]), "stack": int(figures["STACK"]),
                         "local": int(figures["LOCAL"])})
    if nvdisasm:
        for row in rows:
            sass = subprocess.run([cuobjdump, "-sass", "-arch", row["arch"], "-fun", row["function"], library],
                                  capture_output=True, text=True, env=env).stdout
            row["hmma"] = len(re.findall(r"\bHMMA\.16816\.F32", sass))
            row["ldsm"] = len(re.findall(r"\bLDSM\b", sass))
            # Static instruction count, and the convergence barriers a branch the compiler cannot
            # prove warp-uniform costs (BSSY/BSYNC pairs): the overhead around the mma.
            row["instructions"] = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+\S", sass))
            row["bssy"] = len(re.findall(r"\bBSSY\b", sass))
    for row in rows:
        spec = KERNELS[row["kernel"]]
        row["shared_bytes"] = spec["shared"](row["dk"], row["dv"], row["dtype"])
        threads = spec["threads"](row["dk"]) if callable(spec["threads"]) else spec["threads"]
        row["h100_blocks_per_sm"] = h100_blocks_per_sm(row["registers"], row["shared_bytes"], threads)
    return rows, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=1024 instead of 4096")
    args = parser.parse_args()
    T = 1024 if args.quick else 4096
    emulated = [emulated_figures(T, 128, causal, processors) for processors in (2, 132) for causal in (True, False)]
    emulated += [emulated_figures(T, 128, True, processors, gated=True, per_channel=per_channel)
                 for per_channel in (False, True) for processors in (2, 132)]
    print(f"Emulated tensor-core forward, B=1 H=2 D=128 T={T} bf16 (floor = q, k, v read + o written once; "
          f"gated: + the log factors read; GLA: gates per channel, (T, D) fp32 of them):")
    for e in emulated:
        kind = "one block per head" if e["processors"] == 2 else "split for 132 SMs"
        mask = (("GLA" if e["per_channel"] else "gated") if e["gated"] else "causal") if e["causal"] else "full"
        print(f"  {mask:>6}, {kind}: traffic {e['traffic_over_floor']:.3f}x the floor "
              f"(target <= 1.15 unsplit, 2 split), {e['wavefronts_per_matrix']:.2f} wavefronts per ldmatrix matrix, "
              f"{e['mma']} mma ({e['mma_per_chunk']:.0f} per chunk and head)")
    backward = [emulated_backward_figures(T, 128, causal, processors) for processors in (2, 132)
                for causal in (True, False)]
    backward += [emulated_backward_figures(T, 128, True, processors, gated=True, per_channel=per_channel)
                 for per_channel in (False, True) for processors in (2, 132)]
    print(f"Emulated tensor-core backward, B=1 H=2 D=128 T={T} bf16 (floor = q, k, v, o, grad_out read + dq, dk, dv "
          f"written once; gated: + the log factors read and their gradient written; GLA: (T, D) of each, value "
          f"tiles of 64):")
    for e in backward:
        kind = "one block per head" if e["processors"] == 2 else "split for 132 SMs"
        mask = (("GLA" if e["per_channel"] else "gated") if e["gated"] else "causal") if e["causal"] else "full"
        print(f"  {mask:>6}, {kind}: traffic {e['traffic_over_floor']:.3f}x the floor "
              f"(target <= 1.3 unsplit), {e['wavefronts_per_matrix']:.2f} wavefronts per ldmatrix matrix, "
              f"{e['mma']} mma")
    wide = [emulated_backward_figures(T, 256, causal, 2) for causal in (True, False)]
    print(f"Emulated tensor-core backward at head dim 256 (four 128 x 128 tiles, dq, dk, dv through fp32 sums), "
          f"B=1 H=2 T={T} bf16, one block per head and tile (floor as above):")
    for e in wide:
        print(f"  {'causal' if e['causal'] else 'full':>6}: traffic {e['traffic_over_floor']:.3f}x the floor, "
              f"{e['wavefronts_per_matrix']:.2f} wavefronts per ldmatrix matrix, {e['mma']} mma")
    two_long = torch.tensor([0, T // 2 - 96, T], dtype=torch.int32)
    packed = [emulated_packed_figures(T, 128, processors) for processors in (1, 132)]
    packed += [emulated_packed_figures(T, 128, processors, two_long) for processors in (1, 132)]
    print(f"Emulated tensor-core forward and backward of packed sequences (cu_seqlens), H=2 D=128 T={T} bf16, "
          f"causal:")
    for e in packed:
        documents = f"{e['sequences']} of {e['shortest']}-{e['longest']} rows"
        kind = "a block per (sequence, head)" if e["processors"] == 1 else "132 SMs (long ones split)"
        print(f"  {documents}, {kind}: traffic {e['forward_traffic_over_floor']:.3f}x and "
              f"{e['backward_traffic_over_floor']:.3f}x their floors (above)")
    delta = [emulated_delta_figures(T, 128, causal, processors, per_channel) for processors, causal in
             ((2, True), (2, False), (132, True)) for per_channel in (False, True)]
    print(f"Emulated delta-rule forward (Gated DeltaNet; KDA: a gate per key channel), B=1 H=2 D=128 T={T} bf16 "
          f"(floor = q, k, v, beta, g read + o written once; KDA's g is (T, dk) fp32):")
    for e in delta:
        kind = "one block per head" if e["processors"] == 2 else "split for 132 SMs"
        kind += ", KDA" if e["per_channel"] else ""
        print(f"  {'causal' if e['causal'] else 'full':>6}, {kind}: traffic {e['traffic_over_floor']:.3f}x the floor "
              f"(the final state's write above it), {e['wavefronts_per_matrix']:.2f} wavefronts per ldmatrix matrix, "
              f"{e['mma_per_chunk']:.0f} mma per chunk and head")
    flash = [emulated_flash_figures(T, 64, 256, causal) for causal in (False, True)]
    print(f"Emulated flash engine forward, B=1 H=2 D=64 T={T} bf16, sliding window 256:")
    for e in flash:
        print(f"  {'causal' if e['causal'] else 'both sides':>10}: {e['key_tiles']} key tiles, "
              f"{e['computed_per_visible_pair']:.2f} score pairs computed per visible pair, "
              f"K/V read {e['kv_reads_per_visited_tile']:.2f}x per visited tile, "
              f"{e['wavefronts_per_matrix']:.2f} wavefronts per ldmatrix matrix")
    library = linattn._C.__file__ if hasattr(linattn._C, "__file__") else None
    cubins, why = (None, "no CUDA kernels in this build")
    from linattn import _build_info
    if getattr(_build_info, "CUDA_KERNELS", False) and library:
        cubins, why = cubin_figures(library)
    if cubins is None:
        print(f"Cubins: {why}")
    else:
        print("Compiled kernels (linear: forward_kernel<DK, DV, dtype, gated, channels>; linear-bwd: query / "
              "key_value_gradient_kernel<DK, DV, dtype, gated, channels>; delta: delta_forward_kernel<DK, DV, dtype, keeping, "
              "channels>; delta-bwd: delta_backward_walk_kernel<DK, dtype, channels>; flash: forward_kernel<D, buffers, dtype>, "
              "backward_kernel<KeyBlock or QueryBlock<dtype, D, buffers>>):")
        print(f"  {'kernel':9} {'arch':6} {'DK':>4} {'DV':>4} {'dtype':25} {'regs':>5} {'stack':>5} {'local':>5} "
              f"{'HMMA':>5} {'SASS':>6} {'BSSY':>5} {'smem KiB':>8} {'H100 blocks/SM':>14}")
        for r in cubins:
            print(f"  {r['kernel']:9} {r['arch']:6} {r['dk']:>4} {r['dv']:>4} {r['dtype']:25} {r['registers']:>5} "
                  f"{r['stack']:>5} "
                  f"{r['local']:>5} {r.get('hmma', '?'):>5} {r.get('instructions', '?'):>6} {r.get('bssy', '?'):>5} "
                  f"{r['shared_bytes'] / 1024:>8.1f} "
                  f"{r['h100_blocks_per_sm']:>14}")
        print("  Linear (both directions): below two blocks per SM because each block keeps its fp32 state in\n"
              "  its 8 warps' registers (at D = 128 a lane holds 68 of them) and two chunk buffers in shared\n"
              "  memory; the next chunk's cp.async copies hide the load latency instead of a second block.")
    figures = {"machine": machine_info(), "emulated": emulated, "backward": backward, "wide_backward": wide,
               "packed": packed,
               "delta": delta, "flash": flash, "cubins": cubins}
    path, _ = write_results("results", "tensor_core", figures)
    print(f"Wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
