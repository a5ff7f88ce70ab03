"""Benchmark: the exact SVD against the randomized one, as `factorize` runs them (docs/LORA.md's table).

    .venv/bin/python bench/bench_svd.py --repeat 2

For each matrix shape of a LoRA module (an SD attention projection, SD1's 3x3 convs flattened) and rank, a
matrix with a slowly decaying spectrum S_i ∝ (1+i)^-0.7 (a hard case: real fine-tune deltas decay faster) is
factorised by lib_merge.lora.svd.factorize with method 'full' and 'lowrank' (the code's own oversampling and
power iterations), unclamped. Printed per row: the best wall time of --repeat runs of each, the relative
Frobenius error ‖A − up·down‖/‖A‖ of each, the optimum (Eckart–Young: √(Σ_{i>r} S_i²)/‖S‖) and what `auto` picks.
Output: a Markdown table (paste into docs/LORA.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib_merge.lora.svd import NITER, OVERSAMPLE_FACTOR, choose_method, factorize  # noqa: E402

CASES = [((1280, 1280), r) for r in (32, 64, 128)] + [((320, 2880), r) for r in (32, 64, 128)] + \
        [((640, 5760), r) for r in (32, 64, 128)]


def test_matrix(shape: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = (1.0 + torch.arange(k, dtype=torch.float32)) ** -0.7
    return (u * s) @ v.T, s


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; lowrank: q = {OVERSAMPLE_FACTOR}·rank "
          f"columns, {NITER} power iterations; best of {args.repeat}\n")
    print("| shape | rank | full: time, error | lowrank: time, error | optimum | auto |")
    print("|---|---|---|---|---|---|")
    for shape, rank in CASES:
        a, s = test_matrix(shape)
        optimum = float(s[rank:].norm() / s.norm())
        row = []
        for method in ("full", "lowrank"):
            t, (up, down, _) = best_time(lambda: factorize(a, rank, clamp_quantile=None, method=method), args.repeat)
            err = float((a - up @ down).norm() / a.norm())
            row.append(f"{t * 1000:.0f} ms, {err:.4f}")
        print(f"| {shape[0]}×{shape[1]} | {rank} | {row[0]} | {row[1]} | {optimum:.4f} | "
              f"{choose_method(*shape, rank)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
