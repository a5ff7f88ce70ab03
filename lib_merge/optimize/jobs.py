"""Running a run folder: with which evaluators (here, a WebUI over HTTP, Ray actors), in the foreground (the
CLI) or in the background of a host process (the tab and the HTTP API, through `Runs`).
"""
from __future__ import annotations

import threading
import traceback
from pathlib import Path
from typing import Callable

from ..core.errors import InputError, MergeError
from .runlog import RunLog, list_runs
from .runner import Run, SerialPool, start_run


def scorers_for(run: Run, *, device: str = "cpu", settings=None, echo: Callable[[str], None] = print):
    from .scorers import build_scorers
    base_dir = Path(run.config["resolved"].get("base_dir") or run.log.folder)
    warned: set[str] = set()

    def warn(message: str) -> None:
        if message not in warned:
            warned.add(message)
            echo(f"warning: {message}")

    return build_scorers(run.config["scorer"], base_dir, device=device, warn=warn, cancel=lambda: run.stopped,
                         settings=settings)


def make_pool(run: Run, *, host=None, webui: str | None = None, auth: tuple[str, str] | None = None,
              workers: int = 0, ray_address: str | None = None, echo: Callable[[str], None] = print):
    """The pool that runs the candidates: Ray actors, one WebUI over HTTP, or this process's host."""
    if workers or ray_address:
        from .workers import RayPool
        return RayPool(run, workers=workers, address=ray_address, webui=webui, auth=auth, echo=echo,
                       models_dir=str(host.models_dir) if getattr(host, "models_dir", None) else None)
    from .trial import Evaluator, RemoteEvaluator
    if webui:
        return SerialPool(RemoteEvaluator(webui, scorers_for(run, echo=echo), run.keys, auth=auth,
                                          stopped=lambda: run.stopped))
    if host is None:
        raise InputError("No host to run the trials on.")
    device = run.config["device"] or host.setting("merge_lab_device", "cpu")
    scorers = scorers_for(run, device=_score_device(device), settings=host.setting, echo=echo)
    return SerialPool(Evaluator(host, scorers, run.keys, device=run.config["device"], stopped=lambda: run.stopped))


def _score_device(merge_device: str) -> str:
    import torch
    return "cuda" if str(merge_device).startswith("cuda") or torch.cuda.is_available() else "cpu"


def execute(log: RunLog, *, host=None, webui=None, auth=None, workers=0, ray_address=None,
            echo: Callable[[str], None] = print, on_run: Callable[[Run], None] | None = None) -> dict:
    """Run (or resume) a run folder to its end; the pool is closed (scorers freed) whatever happens."""
    run = Run(log, echo=echo)
    if on_run is not None:
        on_run(run)
    try:
        pool = make_pool(run, host=host, webui=webui, auth=auth, workers=workers, ray_address=ray_address, echo=echo)
    except BaseException as e:
        log.write_state(state="failed", reason=str(e))
        raise
    try:
        return run.run(pool, host=host)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            log.write_state(state="failed", reason=str(e))
        raise
    finally:
        pool.close()


class Runs:
    """AutoMBW runs in the background of a WebUI or standalone app: one at a time (the live model is shared)."""

    def __init__(self, host, root: Path | None = None):
        self.host = host
        self.root = Path(root) if root else Path(host.output_dir()) / "autombw"
        self.run: Run | None = None
        self.thread: threading.Thread | None = None
        self.lines: list[str] = []
        self.result: dict | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _launch(self, log: RunLog) -> str:
        with self._lock:
            if self.busy:
                raise InputError(f"A run is going on ({self.run.log.folder.name if self.run else '...'}): "
                                 f"stop it first.")
            self.lines, self.result, self.error, self.run = [], None, None, None

            def work():
                try:
                    self.result = execute(log, host=self.host, echo=self.lines.append, on_run=self._set_run)
                except MergeError as e:
                    self.error = str(e)
                except Exception as e:  # noqa: BLE001 - shown in the tab and the API, with the traceback logged
                    self.error = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                if self.error:
                    self.lines.append(f"error: {self.error}")

            self.thread = threading.Thread(target=work, name=f"autombw-{log.folder.name}", daemon=True)
            self.thread.start()
            return log.folder.name

    def _set_run(self, run: Run) -> None:
        self.run = run

    def start(self, config: dict, base_dir: Path | None = None) -> str:
        if self.busy:
            raise InputError("A run is going on: stop it first.")
        log = start_run(config, self.host, root=self.root, base_dir=base_dir)
        return self._launch(log)

    def folder(self, name: str) -> Path:
        name = str(name)
        if not name or any(ord(ch) < 32 for ch in name) or len(name) > 255:   # NUL and friends: no such run
            raise InputError(f"No AutoMBW run {name[:80]!r} under {self.root}.")
        path = (self.root / name).resolve()
        if path.parent != self.root.resolve() or not (path / "config.json").is_file():
            raise InputError(f"No AutoMBW run '{name}' under {self.root}.")
        return path

    def resume(self, name: str) -> str:
        return self._launch(RunLog.open(self.folder(name)))

    def stop(self) -> str:
        if not self.busy or self.run is None:
            return "No run is going on."
        self.run.stop()
        return f"Stopping {self.run.log.folder.name} (after the current trial's step)."

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def status(self, name: str | None = None) -> dict:
        if name is None or (self.run is not None and self.run.log.folder.name == name):
            if self.run is None:
                return {"state": "idle" if not self.busy else "starting", "lines": self.lines[-20:],
                        "error": self.error}
            status = self.run.status()
            if self.busy and status["state"] not in ("running",):
                status["state"] = "running"
            return {**status, "lines": self.lines[-20:], "error": self.error,
                    "waiting_for_ratings": self.waiting_for_ratings()}
        run = Run(RunLog.open(self.folder(name)))
        return {**run.status(), "lines": [], "error": None}

    def list(self) -> list[dict]:
        runs = list_runs(self.root)
        for r in runs:
            if self.busy and self.run is not None and r["run"] == self.run.log.folder.name:
                r["state"], r["resumable"] = "running", False
        return runs

    def manual(self):
        if self.run is None or self.run.pool is None:
            return None
        evaluator = getattr(self.run.pool, "evaluator", None)
        from .scorers import ManualScorer
        return next((s for s in getattr(evaluator, "scorers", []) if isinstance(s, ManualScorer)), None)

    def waiting_for_ratings(self) -> int:
        m = self.manual()
        return 0 if m is None or m.waiting is None else len(m.waiting["images"])

    def rate(self, ratings: list) -> str:
        m = self.manual()
        if m is None:
            raise InputError("The running run has no manual scorer.")
        m.rate(ratings)
        return f"{len(ratings)} rating(s) taken."


_RUNS: dict[int, Runs] = {}


def runs_for(host) -> Runs:
    """The one Runs of a host, shared by its tab and its HTTP API."""
    if id(host) not in _RUNS:
        _RUNS[id(host)] = Runs(host)
    return _RUNS[id(host)]
