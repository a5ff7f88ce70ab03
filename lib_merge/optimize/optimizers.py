"""Optimisers for AutoMBW, in ask/tell form: `suggest(k, history, pending)` -> the parameters of trial k.

Every suggestion is a function of (seed, k, the trials completed so far, the trials still running): each call
draws from a random generator seeded from (seed, k) and rebuilds the optimiser's model from the history. So
the run log *is* the optimiser's state: a run killed at any moment and resumed from its log makes the very
suggestions an uninterrupted run would have made, and nothing else needs saving.

- `random`: uniform in the bounds (the baseline that shows whether the guidance helps).
- `bayes`: the bayesian-optimization package (a Gaussian process; acquisition UCB, EI or PI with their
  constants; optional SequentialDomainReduction). Its acquisition optimiser is tuned down from the package's
  defaults (10 000 random points + 10 L-BFGS-B runs: about 12 s per suggestion in 26 dimensions at trial 100)
  to `n_random` 1000 + `n_smart` 1 (docs/BENCHMARKS.md). Trials still running are registered with a
  "constant liar" value, so a batch of suggestions for parallel workers comes out distinct.
- `cma`: CMA-ES (the `cma` package), better above ~20 dimensions: generations of `popsize` candidates; the
  next generation waits for the current one (suggest returns None while it cannot go on).
The first `init_points` trials of `bayes` are uniform random points; trial 0 may be the starting point
(warm start, decided by the runner). Failed trials are left out of the Gaussian process; CMA-ES, which
needs a value for every candidate, gets the worst score seen.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import InputError

NAMES = ("bayes", "random", "cma")
ACQUISITIONS = ("ucb", "ei", "pi")
LIARS = ("min", "mean", "max")


@dataclass(frozen=True)
class Dimension:
    name: str
    low: float
    high: float


def derived_seed(seed: int, *parts: Any) -> int:
    """A 32-bit seed from (seed, parts...), the same on every machine and Python."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def uniform_point(dims: list[Dimension], seed: int, k: int) -> dict[str, float]:
    rng = np.random.default_rng(derived_seed(seed, "uniform", k))
    return {d.name: float(d.low + (d.high - d.low) * rng.random()) for d in dims}


class Optimizer:
    """suggest(k, history, pending): history = [(trial, params, score or None for a failed trial)] in trial
    order (a parallel run may have gaps: trials still running are in `pending`, as parameters)."""

    name = ""

    def __init__(self, dims: list[Dimension], seed: int, settings: dict, start: dict[str, float] | None = None,
                 offset: int = 0):
        # offset: trials before the optimiser's own (the warm start), which it sees in the history
        self.dims, self.seed, self.settings, self.start, self.offset = dims, seed, settings, start, offset

    def suggest(self, k: int, history: list[tuple[int, dict, float | None]], pending: list[dict]) -> dict | None:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, **self.settings}


class RandomSearch(Optimizer):
    name = "random"

    def suggest(self, k, history, pending):
        return uniform_point(self.dims, self.seed, k)


class Bayes(Optimizer):
    name = "bayes"
    DEFAULTS = {"acquisition": "ucb", "kappa": 2.576, "xi": 0.01, "init_points": 5, "domain_reduction": False,
                "n_random": 1000, "n_smart": 1, "liar": "min"}

    def __init__(self, dims, seed, settings, start=None, offset=0):
        settings = {**self.DEFAULTS, **settings}
        check_choice("optimizer.acquisition", settings["acquisition"], ACQUISITIONS)
        check_choice("optimizer.liar", settings["liar"], LIARS)
        super().__init__(dims, seed, settings, start, offset)
        import bayes_opt   # noqa: F401  (fail here, with the package's own message, if it is missing)

    def _acquisition(self):
        from bayes_opt import acquisition
        s = self.settings
        base = {"ucb": acquisition.UpperConfidenceBound, "ei": acquisition.ExpectedImprovement,
                "pi": acquisition.ProbabilityOfImprovement}[s["acquisition"]]
        n_random, n_smart = int(s["n_random"]), int(s["n_smart"])

        class Tuned(base):
            """The package's acquisition with our acquisition-optimiser budget."""
            def suggest(self, gp, target_space, n_random=n_random, n_smart=n_smart, fit_gp=True, random_state=None):
                return super().suggest(gp, target_space, n_random=n_random, n_smart=n_smart, fit_gp=fit_gp,
                                       random_state=random_state)

        return Tuned(kappa=float(s["kappa"])) if s["acquisition"] == "ucb" else Tuned(xi=float(s["xi"]))

    def suggest(self, k, history, pending):
        done = [(p, y) for _, p, y in history if y is not None]
        if k < self.offset + int(self.settings["init_points"]) or not done:
            return uniform_point(self.dims, self.seed, k)
        from bayes_opt import BayesianOptimization, SequentialDomainReductionTransformer
        sdr = SequentialDomainReductionTransformer() if self.settings["domain_reduction"] else None
        opt = BayesianOptimization(f=None, pbounds={d.name: (d.low, d.high) for d in self.dims},
                                   acquisition_function=self._acquisition(), verbose=0, allow_duplicate_points=True,
                                   random_state=np.random.RandomState(derived_seed(self.seed, "bayes", k)),
                                   bounds_transformer=sdr)
        for params, y in done:
            opt.register(params={d.name: params[d.name] for d in self.dims}, target=float(y))
            if sdr is not None:
                opt.set_bounds(sdr.transform(opt.space))
        if pending:
            ys = [y for _, y in done]
            lie = {"min": min(ys), "mean": float(np.mean(ys)), "max": max(ys)}[self.settings["liar"]]
            for params in pending:
                opt.register(params={d.name: params[d.name] for d in self.dims}, target=lie)
        suggestion = opt.suggest()
        return {d.name: float(suggestion[d.name]) for d in self.dims}


class CMA(Optimizer):
    name = "cma"
    DEFAULTS = {"sigma0": 0.2, "popsize": None}

    def __init__(self, dims, seed, settings, start=None, offset=0):
        settings = {**self.DEFAULTS, **settings}
        super().__init__(dims, seed, settings, start, offset)
        import cma  # noqa: F401
        self.popsize = int(settings["popsize"] or 4 + int(3 * np.log(len(dims))))
        self._es = None
        self._told = 0                       # generations told
        self._asked: dict[int, list] = {}    # generation -> its candidates (unit cube)

    def _new(self):
        """The distribution starts at the starting point (the unit cube's centre without one)."""
        import cma
        x0 = [0.5] * len(self.dims) if self.start is None else [
            (self.start[d.name] - d.low) / (d.high - d.low) if d.high > d.low else 0.5 for d in self.dims]
        x0 = [min(0.999, max(0.001, v)) for v in x0]
        return cma.CMAEvolutionStrategy(x0, float(self.settings["sigma0"]),
                                        {"bounds": [0, 1], "popsize": self.popsize, "verbose": -9,
                                         "seed": derived_seed(self.seed, "cma") or 1})

    def _ask(self, generation: int) -> list:
        if generation not in self._asked:
            state = np.random.get_state()   # the package draws from numpy's global generator: seed it per generation
            np.random.seed(derived_seed(self.seed, "cma", generation))
            try:
                self._asked[generation] = self._es.ask()
            finally:
                np.random.set_state(state)
        return self._asked[generation]

    def suggest(self, k, history, pending):
        if self._es is None:
            self._es = self._new()
        generation, j = divmod(k - self.offset, self.popsize)
        while self._told < generation:
            g = self._told
            start = self.offset + g * self.popsize
            rows = {t: y for t, _, y in history if start <= t < start + self.popsize}
            if len(rows) < self.popsize:
                return None   # the previous generation is still running
            scores = [y for _, _, y in history if y is not None]
            worst = min(scores) if scores else 0.0
            candidates = self._ask(g)
            self._es.tell(candidates, [-(rows[t] if rows[t] is not None else worst)
                                       for t in range(start, start + self.popsize)])
            self._asked.pop(g, None)
            self._told += 1
        x = self._ask(generation)[j]
        return {d.name: float(d.low + (d.high - d.low) * min(1.0, max(0.0, v))) for d, v in zip(self.dims, x)}


def check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise InputError(f"{what} is '{value}': use one of {', '.join(choices)}.")


def make_optimizer(name: str, dims: list[Dimension], seed: int, settings: dict,
                   start: dict[str, float] | None = None, offset: int = 0) -> Optimizer:
    check_choice("optimizer.name", name, NAMES)
    cls = {"bayes": Bayes, "random": RandomSearch, "cma": CMA}[name]
    known = set(getattr(cls, "DEFAULTS", {}))
    unknown = set(settings) - known
    if unknown:
        raise InputError(f"Unknown setting(s) for the {name} optimizer: {', '.join(sorted(unknown))}"
                         + (f" (it takes {', '.join(sorted(known))})." if known else " (it takes none)."))
    if not dims:
        raise InputError("The search space is empty: name at least one block or parameter to search.")
    return cls(dims, seed, settings, start, offset)
