"""Shared by the examples: running one configuration in a fresh process (so that its peak memory
is its own), peak memory, and where results go."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
if str(ROOT) not in sys.path:  # run as a file: make benchmarks/ importable
    sys.path.insert(0, str(ROOT))

from benchmarks.common import peak_rss_bytes, reset_peak_rss  # noqa: E402


def run_worker(script: str, config: dict, timeout: int = 900) -> dict:
    """Runs `python script --worker '<json>'` and returns the JSON it prints last. One process
    per configuration: its peak RSS then belongs to that configuration alone."""
    out = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(config)], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class PeakMemory:
    """Peak memory of a block above what was in use when it started: CUDA allocator peak on a
    GPU, process RSS high-water mark on the CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            self.start = peak_rss_bytes()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = peak_rss_bytes() - self.start
        return False


def print_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(f"{h:>{w}}" for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(f"{str(c):>{w}}" for c, w in zip(row, widths)))


def save_results(name, rows, plot):
    """Writes results/<name>.json and the figure plot(rows, path) to results/<name>.png, and
    says where they are."""
    RESULTS.mkdir(exist_ok=True)
    json_path, png_path = RESULTS / f"{name}.json", RESULTS / f"{name}.png"
    json_path.write_text(json.dumps(rows, indent=1))
    plot(rows, png_path)
    print(f"\nplot: {png_path}\nraw numbers: {json_path}")


def timed_training_step(model, optimizer, inputs, labels):
    """One cross-entropy training step; returns (seconds, loss value). Waits for the GPU, so the
    time is the step's own."""
    import time

    import torch

    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(inputs), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if inputs.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss.item()
