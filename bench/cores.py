"""Whether the two cores the split stack pins to are independent for torch work (issue 8's premise).

Times one small fp32 matrix product (a drafter-sized [8, 256] x [256, 768]) on core 0,
alone and while core 1 runs, in another process: an integer loop, then the same torch product. On
independent cores the three times are equal; a slowdown with torch beside it means the two share
floating-point capacity (SMT siblings on the host, say), so a drafter computing on core 1 slows the
verifier on core 0, and pipelining can hide little.
Usage: python -m bench.cores [--products 20000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

INTEGER_LOOP = "while True: pass"
TORCH_LOOP = ("import torch; torch.set_num_threads(1); a = torch.randn(8, 256); b = torch.randn(256, 768)\n"
              "while True: a @ b")


def product_us(products: int) -> float:
    rows, weight = torch.randn(8, 256), torch.randn(256, 768)
    for _ in range(products // 100):
        rows @ weight
    started = time.perf_counter()
    for _ in range(products):
        rows @ weight
    return 1e6 * (time.perf_counter() - started) / products


def beside(code: str | None, products: int) -> float:
    """The product's time on core 0 while `code` runs on core 1 (None: nothing)."""
    if code is None:
        return product_us(products)
    other = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", code])
    try:
        time.sleep(1.0)  # started and spinning
        return product_us(products)
    finally:
        other.kill()
        other.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=20000)
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two cores")
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    times = {name: beside(code, args.products) for name, code in
             (("alone", None), ("integer loop on core 1", INTEGER_LOOP), ("same torch product on core 1", TORCH_LOOP),
              ("alone again", None))}
    print(f"one [8, 256] x [256, 768] fp32 product on core 0, mean of {args.products}:")
    for name, value in times.items():
        print(f"  {name:<30} {value:7.1f} us")
    alone = (times["alone"] + times["alone again"]) / 2
    print(f"slowdown with torch on core 1: {times['same torch product on core 1'] / alone:.2f}x "
          f"(1.00x: independent cores)")


if __name__ == "__main__":
    main()
