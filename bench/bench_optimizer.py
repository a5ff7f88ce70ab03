"""AutoMBW's optimiser cost per trial (suggest + register) at trial 100 in 26 dimensions, ours against the
bayesian-optimization package's defaults, in one process.

The history: 100 uniform random points of a smooth objective (a shifted negative quadratic). "defaults" is
the package used as its README shows (BayesianOptimization(f=None, pbounds), register 100 points, suggest());
"ours" is lib_merge.optimize.optimizers.Bayes (tuned acquisition optimiser; it rebuilds the model from the
history on every call, so the timing includes registering all 100 points).

    python bench/bench_optimizer.py [--trials 100] [--dims 26] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_merge.optimize.optimizers import Bayes, Dimension  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--dims", type=int, default=26)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--objective", default="quadratic", choices=["quadratic", "rugged"],
                    help="rugged: the quadratic plus sin(12·x) ripples, many local optima as noisy scores have")
    args = ap.parse_args()
    from bayes_opt import BayesianOptimization

    dims = [Dimension(f"alpha.B{i:02d}", 0.0, 1.0) for i in range(args.dims)]
    rng = np.random.default_rng(0)
    centre = rng.random(args.dims)
    points = rng.random((args.trials, args.dims))

    def objective(p) -> float:
        value = -((p - centre) ** 2).sum()
        if args.objective == "rugged":
            value += 0.3 * np.sin(12 * p).sum()
        return float(value)

    history = [(k, {d.name: float(x) for d, x in zip(dims, p)}, objective(p)) for k, p in enumerate(points)]

    def defaults(r: int) -> float:
        t = time.perf_counter()
        opt = BayesianOptimization(f=None, pbounds={d.name: (0.0, 1.0) for d in dims}, random_state=r, verbose=0)
        for _, params, y in history:
            opt.register(params=params, target=y)
        opt.suggest()
        return time.perf_counter() - t

    def ours(r: int) -> float:
        opt = Bayes(dims, seed=r, settings={})
        t = time.perf_counter()
        opt.suggest(args.trials, history, [])
        return time.perf_counter() - t

    def quality(fn_suggest) -> float:
        """The objective at the suggested point (higher is better), over the repeats."""
        return float(np.mean([fn_suggest(r) for r in range(args.repeat)]))

    rows = []
    for label, fn in (("package defaults (n_random 10000, n_smart 10)", defaults), ("ours (n_random 1000, n_smart 1)", ours)):
        times = [fn(r) for r in range(args.repeat)]
        rows.append((label, statistics.median(times), times))

    def value_defaults(r):
        opt = BayesianOptimization(f=None, pbounds={d.name: (0.0, 1.0) for d in dims}, random_state=r, verbose=0)
        for _, params, y in history:
            opt.register(params=params, target=y)
        s = opt.suggest()
        return objective(np.array([s[d.name] for d in dims]))

    def value_ours(r):
        s = Bayes(dims, seed=r, settings={}).suggest(args.trials, history, [])
        return objective(np.array([s[d.name] for d in dims]))

    best = max(y for _, _, y in history)
    print(f"{args.dims} dimensions, {args.objective} objective, suggestion for trial {args.trials} ({args.repeat} "
          f"repeats); best value in the "
          f"history {best:.3f}\n")
    print("| optimiser | median s per suggest | each (s) | objective at the suggestion (mean) |")
    print("|---|---|---|---|")
    for (label, med, times), value in zip(rows, (quality(value_defaults), quality(value_ours))):
        print(f"| {label} | {med:.2f} | {', '.join(f'{t:.2f}' for t in times)} | {value:.3f} |")


if __name__ == "__main__":
    main()
