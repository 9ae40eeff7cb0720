"""Shared helpers of the benchmark scripts: timing, machine description, peak memory, output."""
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def median_time(fn, reps, warmup=1):
    """Median wall time of fn() over reps runs, after warmup runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median times of several implementations, run round-robin so that machine noise hits
    each of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def gemm_gflops(n=2048, reps=5):
    """The machine's fp32 GEMM rate (torch.mm on n×n), measured now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_time(lambda: torch.mm(a, b), reps) / 1e9


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss():
    """Resets the kernel's high-water mark of this process's RSS (Linux ≥ 4.0), so that a
    later peak_rss_bytes() sees only what came after, not the import of torch."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes():
    """Peak RSS since the process started or since reset_peak_rss()."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(module_args, timeout=900):
    """Runs `python -m benchmarks.X args` in a fresh process (for peak-memory measurements,
    which need a process of their own) and returns its JSON output."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m"] + module_args, cwd=root, capture_output=True, text=True,
                         timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(folder, name, payload, figure=None):
    os.makedirs(folder, exist_ok=True)
    json_path = os.path.join(folder, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    png_path = None
    if figure is not None:
        png_path = os.path.join(folder, f"{name}.png")
        figure.savefig(png_path, dpi=120, bbox_inches="tight")
    return json_path, png_path
