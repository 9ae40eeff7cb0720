"""Writes gpu_check.json (scripts/gpu_check.sh): the device, the pass/fail counts of each test
run (from pytest's JUnit XML), the failures' names, the stages' durations and the benchmark.

    python scripts/gpu_report.py FOLDER [stage=seconds ...]"""
import json
import os
import sys
import xml.etree.ElementTree as ElementTree

import torch


def test_counts(path):
    if not os.path.exists(path):
        return {"missing": True}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def main():
    folder = sys.argv[1]
    stages = dict(arg.split("=", 1) for arg in sys.argv[2:])
    def benchmark(name):
        path = os.path.join(folder, f"{name}.json")
        return json.load(open(path)) if os.path.exists(path) else None

    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "seconds": {name: int(value) for name, value in stages.items()},
        "cuda_tests": test_counts(os.path.join(folder, "cuda_tests.xml")),
        "suite_fused_backend": test_counts(os.path.join(folder, "suite_fused_backend.xml")),
        "benchmark": benchmark("bench_cuda"),
        "benchmark_restricted": benchmark("bench_restricted_cuda"),
        "benchmark_delta_rule": benchmark("bench_delta_cuda"),
        "benchmark_swin": benchmark("swin_cuda"),
    }
    path = os.path.join(folder, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    for run in ("cuda_tests", "suite_fused_backend"):
        c = report[run]
        print(f"{run}: " + ("missing" if c.get("missing") else
                            f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
