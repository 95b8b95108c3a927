"""RTN quantize + pack throughput on a 4096×4096 float32 tensor (issue: core benchmark).

    .venv/bin/python bench/bench_rtn.py [--repeats 5] [--threads 2]

Prints the median over repeats of weights/second for every scheme × observer, and MSE's slowdown
relative to min-max measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lowbit


def bench(w: torch.Tensor, scheme: str, observer: str, repeats: int) -> float:
    lowbit.quantize_tensor(w, scheme, observer=observer)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        lowbit.quantize_tensor(w, scheme, observer=observer)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=4096)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    w = torch.randn(a.size, a.size)
    print(f"torch {torch.__version__}, threads {a.threads}, tensor {a.size}x{a.size} float32, median of {a.repeats}")
    print(f"{'scheme':<12}{'observer':<10}{'seconds':>10}{'M weights/s':>14}{'× min-max':>11}")
    for scheme in ("int8", "int4-g128", "int3-g128"):
        base = None
        for obs in ("minmax", "mse"):
            t = bench(w, scheme, obs, a.repeats)
            base = base or t
            print(f"{scheme:<12}{obs:<10}{t:>10.3f}{w.numel() / t / 1e6:>14.1f}{t / base:>11.1f}")


if __name__ == "__main__":
    main()
