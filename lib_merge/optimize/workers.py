"""Several candidates at once, on Ray actors (the `ray` package, optional: `pip install ray`).

Each actor holds one host — a standalone host (diffusers, on one GPU where the cluster has GPUs) or a
client of one WebUI URL — and its scorers, loaded once. The driver (runner.py) asks the optimiser for a
batch of distinct suggestions (the trials still running are registered with a "constant liar" value) and
is the only one that writes the run folder. An actor that dies (its process killed, out of memory, a lost
node) has its candidate run again on a fresh actor; the log still holds each trial exactly once.

On a cluster (`--ray-address`), every node must be able to import Merge Lab and read the models at the
paths the run's config.json names (or run with --webui, where the WebUIs hold the models).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..core.errors import InputError, MergeError

REPO = Path(__file__).resolve().parents[2]
MAX_REPLACEMENTS = 3   # fresh actors per worker slot before the run gives up


class TrialWorker:
    """One actor: a host + scorers, evaluating candidates sent as plain data."""

    def __init__(self, config: dict, index: int, webui: str | None, auth, models_dir: str | None,
                 output_dir: str, threads: int | None):
        import torch

        from .scorers import build_scorers, scorer_keys
        from .trial import Evaluator, RemoteEvaluator
        if threads:
            torch.set_num_threads(threads)
        self.index = index
        base_dir = Path(config["resolved"].get("base_dir") or ".")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scorers = build_scorers(config["scorer"], base_dir, device=device)
        keys = scorer_keys(config["scorer"])
        if webui:
            self.evaluator = RemoteEvaluator(webui, scorers, keys, auth=auth)
        else:
            from ..host.standalone import StandaloneHost
            settings = {"merge_lab_device": config["device"] or device}
            host = StandaloneHost(models_dir=models_dir or "models", output_dir=output_dir, settings=settings)
            self.evaluator = Evaluator(host, scorers, keys, device=config["device"] or device)

    def evaluate(self, recipe: dict, payloads: list[dict], params: dict):
        from ..engine.recipe import Recipe
        from .payloads import Payload
        outcome = self.evaluator.evaluate(Recipe.from_dict(recipe),
                                          [Payload.from_dict(p, f"payload {i + 1}") for i, p in enumerate(payloads)],
                                          params)
        outcome.worker = f"ray-{self.index}"
        return outcome


class RayPool:
    def __init__(self, run, *, workers: int = 0, address: str | None = None, webui: str | None = None,
                 auth=None, models_dir: str | None = None, echo: Callable[[str], None] = print):
        try:
            import ray
        except ImportError:
            raise InputError("--workers / --ray-address need the ray package: pip install ray") from None
        if any(s["kind"] == "manual" for s in run.config["scorer"]):
            raise InputError("The manual scorer rates images in the tab: it cannot run on Ray workers.")
        self.ray, self.run, self.echo = ray, run, echo
        self.webui, self.auth, self.models_dir = webui, auth, models_dir
        self._own = not ray.is_initialized()
        if self._own:
            kwargs = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                          job_config=ray.job_config.JobConfig(code_search_path=[str(REPO)]))
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=max(workers, 1), **kwargs)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.capacity = workers or max(gpus, 1)
        self.gpu_each = 1 if gpus >= self.capacity and not webui else 0
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.threads = max(1, cpus // self.capacity)
        self.remote_cls = ray.remote(num_gpus=self.gpu_each, num_cpus=1, max_restarts=0)(TrialWorker)
        self.actors = [self._new_actor(i) for i in range(self.capacity)]
        self.replacements = [0] * self.capacity
        self.inflight: dict = {}   # ObjectRef -> (slot, job)
        self.waiting: list = []    # jobs not yet given to an actor
        echo(f"Ray: {self.capacity} worker(s)" + (f", one GPU each" if self.gpu_each else " on CPU")
             + (f", driving {webui}" if webui else ""))

    def _new_actor(self, slot: int):
        return self.remote_cls.remote(self.run.config, slot, self.webui, self.auth,
                                      self.models_dir or self.run.config.get("models_dir"),
                                      str(self.run.log.folder / "worker-outputs"), self.threads)

    def _free_slots(self) -> list[int]:
        busy = {slot for slot, _ in self.inflight.values()}
        return [i for i in range(self.capacity) if i not in busy]

    def _dispatch(self) -> None:
        for slot in self._free_slots():
            if not self.waiting:
                return
            job = self.waiting.pop(0)
            tag, recipe, payloads, params = job
            ref = self.actors[slot].evaluate.remote(recipe.to_dict(), [p.to_dict() for p in payloads], params)
            self.inflight[ref] = (slot, job)

    def submit(self, tag, recipe, payloads, params) -> None:
        self.waiting.append((tag, recipe, payloads, params))
        self._dispatch()

    def next_done(self):
        from ray.exceptions import RayActorError, WorkerCrashedError
        from .trial import Interrupted
        while True:
            if not self.inflight:
                raise MergeError("No trial is running on the Ray workers.")
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
            if not ready:
                if self.run.stopped:
                    raise Interrupted("Interrupted.")
                continue
            ref = ready[0]
            slot, job = self.inflight.pop(ref)
            try:
                outcome = self.ray.get(ref)
            except (RayActorError, WorkerCrashedError) as e:
                self.replacements[slot] += 1
                if self.replacements[slot] > MAX_REPLACEMENTS:
                    raise MergeError(f"Ray worker {slot} died {self.replacements[slot]} times; the last time: "
                                     f"{type(e).__name__}. The run stops (resume it when the cluster is well).") from None
                self.echo(f"Ray worker {slot} died ({type(e).__name__}); {job[0][0]} {job[0][1]} runs again "
                          f"on a fresh worker.")
                self.actors[slot] = self._new_actor(slot)
                self.waiting.insert(0, job)
                self._dispatch()
                continue
            self._dispatch()
            return job[0], outcome

    def interrupt(self) -> None:
        pass   # next_done() notices run.stopped; the trials already running finish or are dropped

    def finish(self, how: str, recipe) -> list[str]:
        return ["The Ray workers' models are dropped with them: the best recipe is in best.json "
                "(merge --recipe, or save_best, makes the checkpoint)."]

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._own:
            self.ray.shutdown()
