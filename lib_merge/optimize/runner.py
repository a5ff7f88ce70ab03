"""The AutoMBW loop: suggest → candidate recipe → merge + generate + score (trial.py) → register → log.

One loop for every way of running: a pool runs the candidates, one at a time in this process
(`SerialPool`) or several at once on Ray actors (workers.py), and the driver here is the only writer of
the run folder, so every completed trial is logged exactly once, in a line fsync'd before the next
suggestion. Suggestions are rebuilt from the log (optimizers.py), which makes a resume after kill -9 make
the same suggestions an uninterrupted run makes. Budget: trials (all of them, the warm start and the
random initial points included), seconds, patience + tolerance (early stop), and stop() (Interrupt).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from ..core.errors import InputError, MergeError
from ..engine.recipe import Recipe
from .optimizers import make_optimizer
from .payloads import Payload
from .runlog import RunLog
from .scorers import ScorerError, Standardiser, aggregate, per_image_scores, scorer_keys
from .space import SearchSpace
from .trial import Interrupted, Outcome

OPTIMIZER_KEYS = ("name", "seed")


class SerialPool:
    """Candidates one at a time, in this process."""
    capacity = 1

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.jobs: list = []

    def submit(self, tag, recipe, payloads, params) -> None:
        self.jobs.append((tag, recipe, payloads, params))

    def next_done(self):
        tag, recipe, payloads, params = self.jobs.pop(0)
        return tag, self.evaluator.evaluate(recipe, payloads, params)

    def interrupt(self) -> None:
        if self.evaluator.host is not None:
            self.evaluator.host.interrupt()

    def finish(self, how: str, recipe) -> list[str]:
        return self.evaluator.finish(how, recipe)

    def close(self) -> None:
        self.evaluator.close()


class Run:
    """A run folder being run (or looked at): its config, search space, payloads, log and best trial."""

    def __init__(self, log: RunLog, echo: Callable[[str], None] = lambda line: None):
        self.log, self.echo = log, echo
        self.config = log.config()
        resolved = self.config.get("resolved")
        if not resolved:
            raise InputError(f"{log.folder}: config.json has no resolved section (not written by Merge Lab?).")
        self.start_recipe = Recipe.from_dict(resolved["recipe"])
        self.family = resolved["family"]
        self.space = SearchSpace(self.config["space"], self.start_recipe, self.family)
        payloads = [Payload.from_dict(d, f"payload {i + 1}") for i, d in enumerate(resolved["payloads"])]
        self.train = [p for p in payloads if not p.holdout]
        self.holdout = [p for p in payloads if p.holdout]
        self.keys = scorer_keys(self.config["scorer"])
        self.weights = {k: s["weight"] for k, s in zip(self.keys, self.config["scorer"])}
        opt = self.config["optimizer"]
        settings = {k: v for k, v in opt.items() if k not in OPTIMIZER_KEYS}
        self.warm = bool(self.config["warm_start"])
        self.optimizer = make_optimizer(opt["name"], self.space.dims, opt["seed"], settings,
                                        start=self.space.start_point(), offset=1 if self.warm else 0)
        self.records = log.trials()
        self.holdouts = log.holdouts()
        self.standardiser = Standardiser(self.keys)
        for r in self.records:
            if r.get("raw"):
                self.standardiser.add(r["raw"])
        self._stop = threading.Event()
        self.stop_reason = ""
        self.latest: dict | None = None     # the last trial's images and scores, for the tab
        self.current: dict | None = None    # the trials running now
        self.pool = None

    # ------------------------------------------------------------------ the loop
    def suggest(self, k: int, pending: list[dict]) -> dict | None:
        if k == 0 and self.warm:
            return self.space.start_point()
        history = [(r["trial"], r["params"], r["score"]) for r in self.records]
        return self.optimizer.suggest(k, history, pending)

    def stop(self, reason: str = "stopped by the user") -> None:
        self.stop_reason = self.stop_reason or reason
        self._stop.set()
        if self.pool is not None:
            self.pool.interrupt()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self, pool, host=None) -> dict:
        """Run until the budget is spent, patience runs out or stop(); then holdout, finish, report.
        `host` saves the best merge at the end (save_best); the pool's own host(s) hold the live models."""
        self.pool = pool
        budget = self.config["budget"]
        elapsed0 = self.records[-1]["elapsed"] if self.records else 0.0
        started = time.monotonic()
        pending: dict[int, tuple[dict, Recipe]] = {}   # trial -> (params, candidate recipe), running now
        suggest_seconds: dict[int, float] = {}
        self.log.write_state(state="running", trials=len(self.records), optimizer=self.optimizer.describe(),
                             space=self.space.describe(), total=budget["trials"])
        self.echo(f"Run {self.log.folder.name}: {len(self.space.dims)} dimensions, "
                  f"{self.optimizer.name} optimiser, {len(self.records)}/{budget['trials']} trials done.")
        if not self.records:
            for note in self.config["resolved"].get("notes", []):
                self.echo(f"note: {note}")
        try:
            while True:
                while (len(pending) < pool.capacity and not self.stopped and not self._budget_spent(
                        elapsed0 + time.monotonic() - started, len(pending))):
                    k = self._next_index(pending)
                    if k is None:
                        break
                    t = time.monotonic()
                    params = self.suggest(k, [p for p, _ in pending.values()])
                    if params is None:
                        break   # CMA-ES: the next generation waits for this one
                    suggest_seconds[k] = time.monotonic() - t
                    pending[k] = params, self.space.recipe_for(params)
                    pool.submit(("trial", k), pending[k][1], self.train, params)
                self.current = {"trials": sorted(pending)}
                if not pending:
                    break
                try:
                    (kind, k), outcome = pool.next_done()
                except Interrupted:
                    break
                params, recipe = pending.pop(k)
                if self.stopped and outcome.error is not None:
                    break   # interrupted in the middle: this trial is run again on resume
                self._record(k, params, recipe, outcome, suggest_seconds.pop(k, 0.0),
                             elapsed0 + time.monotonic() - started)
                self._maybe_holdout()
        except Interrupted:
            pass
        finally:
            self.current = None
        return self._finish(host)

    def _next_index(self, pending: dict) -> int | None:
        """The lowest trial index neither logged nor running (a parallel run killed mid-way leaves gaps)."""
        done = {r["trial"] for r in self.records} | set(pending)
        k = next(i for i in range(len(done) + 1) if i not in done)
        return k if k < self.config["budget"]["trials"] else None

    def _budget_spent(self, elapsed: float, running: int) -> bool:
        budget = self.config["budget"]
        if budget["seconds"] is not None and elapsed >= budget["seconds"]:
            self.stop_reason = self.stop_reason or f"the time budget ({budget['seconds']:g} s) is spent"
            return True
        if budget["patience"] is not None and running == 0:
            since = self._trials_since_improvement()
            if since >= budget["patience"]:
                self.stop_reason = self.stop_reason or (
                    f"no improvement above {budget['tolerance']:g} in the last {since} trials (patience)")
                return True
        return False

    def _trials_since_improvement(self) -> int:
        tolerance = self.config["budget"]["tolerance"]
        best, last = None, -1
        for i, r in enumerate(self.records):
            if r["score"] is not None and (best is None or r["score"] > best + tolerance):
                best, last = r["score"], i
            elif r["score"] is not None and r["score"] > best:
                best = r["score"]
        return len(self.records) - 1 - last

    # ------------------------------------------------------------------ one trial's record
    def _score(self, outcome: Outcome, payloads: list[Payload]) -> tuple[float | None, list[float], str | None]:
        if outcome.error is not None:
            return None, [], outcome.error
        try:
            per_image = per_image_scores(outcome.raw, self.weights, self.standardiser)
            weights = [payloads[i].weight for i in outcome.payload_of]
            return aggregate(per_image, weights, self.config["aggregate"]), per_image, None
        except ScorerError as e:
            return None, [], f"score: {e}"

    def _save_images(self, trial: int, outcome: Outcome, holdout: bool = False) -> list[str]:
        if not self.config["images"]:
            return []
        from PIL.PngImagePlugin import PngInfo
        names = []
        for i, (image, info) in enumerate(zip(outcome.images, outcome.infotexts or [""] * len(outcome.images))):
            path = self.log.image_path(trial, i, holdout)
            meta = PngInfo()
            meta.add_text("parameters", info)
            try:
                image.save(path, format="PNG", pnginfo=meta)
            except OSError as e:
                raise MergeError(f"Could not save the trial's image {path}: {e.strerror or e}.") from None
            names.append(path.relative_to(self.log.folder).as_posix())
        return names

    def _record(self, k: int, params: dict, recipe: Recipe, outcome: Outcome, suggest_s: float,
                elapsed: float) -> None:
        from ..session import recipe_hash
        if outcome.error is None:
            self.standardiser.add(outcome.raw)
        score, per_image, error = self._score(outcome, self.train)
        images = self._save_images(k, outcome)
        seconds = {**{s: round(v, 3) for s, v in outcome.seconds.items()}, "suggest": round(suggest_s, 3)}
        record = {"trial": k, "params": params, "score": score, "status": "ok" if error is None else "failed",
                  "error": error, "scores": per_image, "raw": outcome.raw if error is None else {},
                  "payloads": outcome.payload_of, "recipe_hash": recipe_hash(recipe), "seconds": seconds,
                  "images": images, "elapsed": round(elapsed, 3), "worker": outcome.worker,
                  "rewritten": outcome.rewritten}
        self.log.append_trial(record)
        self.records.append(record)
        self.records.sort(key=lambda r: r["trial"])
        best = self.best()
        if best is not None and best["trial"] == k:
            self.log.write_best({"trial": k, "params": params, "score": score, "recipe": recipe.to_dict(),
                                 "recipe_hash": record["recipe_hash"]})
        self.log.write_state(trials=len(self.records), best=None if best is None else best["score"])
        self.latest = {"trial": k, "images": images, "scores": per_image, "score": score, "error": error}
        line = f"trial {k}: " + (f"score {score:.4f}" if error is None else f"failed ({error})")
        self.echo(line + (f"   best {best['score']:.4f} (trial {best['trial']})" if best else ""))

    def best(self) -> dict | None:
        ok = [r for r in self.records if r["score"] is not None]
        return max(ok, key=lambda r: (r["score"], -r["trial"])) if ok else None

    # ------------------------------------------------------------------ holdout
    def _maybe_holdout(self, final: bool = False) -> None:
        every = self.config["holdout"]["every"]
        if not self.holdout or not (final or (every and len(self.records) % every == 0)):
            return
        done = {h["trial"] for h in self.holdouts}
        ok = sorted((r for r in self.records if r["score"] is not None), key=lambda r: (-r["score"], r["trial"]))
        for r in [r for r in ok[:self.config["holdout"]["top"]] if r["trial"] not in done]:
            if self.stopped:
                return
            self.pool.submit(("holdout", r["trial"]), self.space.recipe_for(r["params"]), self.holdout, r["params"])
            try:
                (_, k), outcome = self.pool.next_done()
            except Interrupted:
                return
            if self.stopped and outcome.error is not None:
                return
            score, per_image, error = self._score(outcome, self.holdout)
            record = {"trial": k, "after": len(self.records), "score": score, "error": error,
                      "train_score": r["score"], "scores": per_image, "raw": outcome.raw,
                      "images": self._save_images(k, outcome, holdout=True)}
            self.log.append_holdout(record)
            self.holdouts.append(record)
            self.echo(f"holdout of trial {k}: " + (f"{score:.4f} (training {r['score']:.4f})" if error is None
                                                   else f"failed ({error})"))

    # ------------------------------------------------------------------ the end
    def _finish(self, host) -> dict:
        budget = self.config["budget"]
        complete = len(self.records) >= budget["trials"] or (bool(self.stop_reason) and not self.stopped)
        if not self.stopped:
            self._maybe_holdout(final=True)
        best = self.best()
        messages = []
        try:   # at the end and on Interrupt alike: the user's choice of what stays loaded
            messages += self.pool.finish(self.config["finish"], self.best_recipe())
        except MergeError as e:
            messages.append(f"Could not {self.config['finish']} at the end: {e}")
        if complete and self.config["save_best"] and best is not None and host is not None and not self.stopped:
            messages.append(self.save_best(host, self.config["save_best"]))
        state = "done" if complete and not self.stopped else "stopped"
        reason = self.stop_reason or ("the trial budget is spent" if complete else "")
        self.log.write_state(state=state, trials=len(self.records), reason=reason,
                             best=None if best is None else best["score"])
        try:
            from .report import draw_report
            draw_report(self)
        except Exception as e:  # noqa: BLE001 - a plot must never lose a run
            messages.append(f"The report could not be drawn ({type(e).__name__}: {e}).")
        self.echo(f"Run {state}" + (f" ({reason})" if reason else "") + f": {len(self.records)} trials, best "
                  + (f"{best['score']:.4f} at trial {best['trial']}." if best else "none."))
        for m in messages:
            self.echo(m)
        return {"state": state, "reason": reason, "trials": len(self.records), "best": best,
                "messages": messages, "folder": str(self.log.folder)}

    def best_recipe(self) -> Recipe | None:
        best = self.best()
        return None if best is None else self.space.recipe_for(best["params"])

    def save_best(self, host, name: str | bool) -> str:
        from .. import session
        best = self.best()
        if best is None:
            return "No trial succeeded: nothing to save."
        if name is True:
            name = f"{self.config['name']}-best-trial{best['trial']}"
        summary = session.save(host, self.space.recipe_for(best["params"]), str(name))
        return summary.message

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        budget = self.config["budget"]
        best = self.best()
        done = len(self.records)
        times = [sum(v for s, v in r["seconds"].items()) for r in self.records[-20:]]
        capacity = getattr(self.pool, "capacity", 1) if self.pool is not None else 1
        eta = (sum(times) / len(times)) * max(0, budget["trials"] - done) / capacity if times else None
        if eta is not None and budget["seconds"] is not None and self.records:
            eta = min(eta, max(0.0, budget["seconds"] - self.records[-1]["elapsed"]))
        state = self.log.state()
        return {"run": self.log.folder.name, "folder": str(self.log.folder), "state": state.get("state"),
                "trials": done, "total": budget["trials"], "failed": sum(1 for r in self.records if r["score"] is None),
                "best": None if best is None else {"trial": best["trial"], "score": best["score"],
                                                   "params": best["params"]},
                "eta_seconds": None if eta is None else round(eta, 1), "reason": state.get("reason", ""),
                "latest": self.latest, "running": None if self.current is None else self.current["trials"]}


def start_run(config: dict, host, *, root: Path, base_dir: Path | None, run_dir: Path | None = None) -> RunLog:
    """A new run folder with the resolved config (the files, models and payloads checked first)."""
    from .config import check_config, resolve
    from .runlog import new_run_dir
    config = resolve(check_config(config), host, base_dir)
    SearchSpace(config["space"], Recipe.from_dict(config["resolved"]["recipe"]), config["resolved"]["family"])
    if run_dir is not None:
        run_dir = Path(run_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise InputError(f"--run-dir '{run_dir}' is not empty: resume it with 'optimize resume', or pick a new folder.")
    else:
        run_dir = new_run_dir(Path(root), config["name"])
    return RunLog.create(run_dir, config)
