"""Host overhead: the time of calls so small that their arithmetic is nothing, which is what a
small or medium call costs on a GPU (the host prepares kernels the device runs in microseconds).

Each linattn call is timed round-robin against its PyTorch counterpart in the same run, on CPU
tensors, eager, one thread, and quoted as the median ratio (linattn / PyTorch):
  - linear_attention forward, B=1 H=1 T=16 D=16 causal, against SDPA (causal);
  - the same forward + backward against SDPA's;
  - linear_attention_step at B=1 H=8 D=64 against SDPA of one query over 64 cached keys;
  - sliding_window_attention forward (window 8, causal) at B=1 H=1 T=16 D=16 against SDPA;
  - one linattn.nn.MultiheadAttention layer (E=64, 4 heads, T=16, method "softmax" and "linear")
    against torch.nn.MultiheadAttention.

    python -m benchmarks.bench_host_overhead            # 2000 repetitions each
    python -m benchmarks.bench_host_overhead --quick    # 300

Writes results/host_overhead.json.
"""
import argparse

import torch

import linattn
from benchmarks.common import interleaved_medians, machine_info, write_results

SDPA = torch.nn.functional.scaled_dot_product_attention


def tensors(*shape, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).requires_grad_(grad) for _ in range(3)]


def forward_small():
    q, k, v = tensors(1, 1, 16, 16)
    return {"linattn": lambda: linattn.linear_attention(q, k, v, causal=True),
            "torch": lambda: SDPA(q, k, v, is_causal=True)}


def forward_backward_small():
    q, k, v = tensors(1, 1, 16, 16, grad=True)
    return {"linattn": lambda: linattn.linear_attention(q, k, v, causal=True).sum().backward(),
            "torch": lambda: SDPA(q, k, v, is_causal=True).sum().backward()}


def decoding_step():
    q, k, v = tensors(1, 8, 64)
    state = (torch.rand(1, 8, 64, 64), torch.rand(1, 8, 64) + 1)
    keys, values = tensors(1, 8, 64, 64, seed=1)[:2]
    return {"linattn": lambda: linattn.linear_attention_step(q, k, v, state),
            "torch": lambda: SDPA(q[:, :, None], keys, values)}


def sliding_window_small():
    q, k, v = tensors(1, 1, 16, 16)
    return {"linattn": lambda: linattn.sliding_window_attention(q, k, v, 8, causal=True),
            "torch": lambda: SDPA(q, k, v, is_causal=True)}


def module_layer(method):
    def make():
        torch.manual_seed(0)
        reference = torch.nn.MultiheadAttention(64, 4, batch_first=True)
        ours = linattn.nn.MultiheadAttention(64, 4, batch_first=True, method=method)
        ours.load_state_dict(reference.state_dict())
        x = torch.randn(1, 16, 64)
        return {"linattn": lambda: ours(x, x, x, need_weights=False),
                "torch": lambda: reference(x, x, x, need_weights=False)}
    return make


CASES = {
    # name: (set-up, target ratio from issue 24, whether to run under no_grad)
    "linear_attention forward": (forward_small, 2.0, True),
    "linear_attention forward+backward": (forward_backward_small, 1.5, False),
    "linear_attention_step": (decoding_step, 2.0, True),
    "sliding_window_attention forward": (sliding_window_small, 1.5, True),
    "MultiheadAttention softmax layer": (module_layer("softmax"), 1.2, True),
    "MultiheadAttention linear layer": (module_layer("linear"), 1.2, True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    reps = args.reps or (300 if args.quick else 2000)
    torch.set_num_threads(1)
    rows = []
    print(f"{'call':40s} {'linattn us':>11s} {'torch us':>9s} {'ratio':>6s} {'target':>7s}")
    for name, (make, target, no_grad) in CASES.items():
        fns = make()
        with torch.no_grad() if no_grad else torch.enable_grad():
            times = interleaved_medians(fns, reps, warmup=20)
        ours, theirs = times["linattn"] * 1e6, times["torch"] * 1e6
        rows.append({"call": name, "linattn_us": ours, "torch_us": theirs, "ratio": ours / theirs,
                     "target": target})
        print(f"{name:40s} {ours:11.1f} {theirs:9.1f} {ours / theirs:6.2f} {target:6.1f}x")
    path, _ = write_results("results", "host_overhead", {"machine": machine_info(), "reps": reps, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
