"""The run folder: everything a run knows, on disk, so that a run killed at any moment resumes exactly.

    outputs/autombw/<YYYYmmdd-HHMMSS>-<name>/
      config.json     the resolved config (models as files, payloads with fixed seeds, the starting recipe)
      trials.jsonl    one JSON line per completed trial, flushed and fsync'd before the next trial starts
      holdout.jsonl   holdout scores of the best trials (every N trials and at the end)
      best.json       the best trial so far: trial, params, score, recipe (rewritten atomically)
      state.json      running / done / stopped / failed, trials done, best score, the optimiser's settings
      images/         each trial's images as PNG, with the candidate's recipe in their infotext
      convergence.png, blocks.png   the report (optimize/report.py)
The optimiser keeps no state of its own: its suggestions are rebuilt from trials.jsonl (optimizers.py),
so the log is the optimiser's state. A line cut short by a kill is dropped when the run is opened again.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from ..core.errors import InputError, OutputError
from ..core.files import write_file_atomic

CONFIG, TRIALS, HOLDOUT, BEST, STATE, IMAGES = (
    "config.json", "trials.jsonl", "holdout.jsonl", "best.json", "state.json", "images")
FINAL_STATES = ("done", "stopped", "failed")


def new_run_dir(root: Path, name: str) -> Path:
    """A fresh folder under root named by time and run name (a suffix where two runs start in one second)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        path = root / (f"{stamp}-{safe}" + (f"-{n + 1}" if n else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise OutputError(f"Could not make a run folder under {root}.")


def _write_json(path: Path, data) -> None:
    write_file_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _read_lines(path: Path) -> list[dict]:
    """The complete lines of a JSONL log; a last line cut short by a kill is cut off the file."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    rows, good = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return rows


class RunLog:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.images = self.folder / IMAGES

    @classmethod
    def create(cls, folder: Path, config: dict) -> "RunLog":
        log = cls(folder)
        folder.mkdir(parents=True, exist_ok=True)
        log.images.mkdir(exist_ok=True)
        _write_json(folder / CONFIG, config)
        return log

    @classmethod
    def open(cls, folder: str | Path) -> "RunLog":
        folder = Path(folder)
        if not (folder / CONFIG).is_file():
            raise InputError(f"'{folder}' is not an AutoMBW run folder (it has no {CONFIG}).")
        log = cls(folder)
        log.images.mkdir(exist_ok=True)
        return log

    def config(self) -> dict:
        try:
            return json.loads((self.folder / CONFIG).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{self.folder / CONFIG}: cannot be read ({e}).") from None

    def trials(self) -> list[dict]:
        return sorted(_read_lines(self.folder / TRIALS), key=lambda r: r["trial"])

    def holdouts(self) -> list[dict]:
        return _read_lines(self.folder / HOLDOUT)

    def _append(self, name: str, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode("utf-8")
        try:
            with open(self.folder / name, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"Could not write the run log {self.folder / name}: {e.strerror or e}.") from None

    def append_trial(self, record: dict) -> None:
        self._append(TRIALS, record)

    def append_holdout(self, record: dict) -> None:
        self._append(HOLDOUT, record)

    def best(self) -> dict | None:
        p = self.folder / BEST
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    def write_best(self, best: dict) -> None:
        _write_json(self.folder / BEST, best)

    def state(self) -> dict:
        p = self.folder / STATE
        try:
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {"state": "new"}
        except json.JSONDecodeError:
            return {"state": "unknown"}

    def write_state(self, **fields) -> None:
        _write_json(self.folder / STATE, {**self.state(), **fields, "updated": time.time()})

    def image_path(self, trial: int, index: int, holdout: bool = False) -> Path:
        return self.images / f"{'holdout-' if holdout else ''}trial-{trial:04d}-{index:02d}.png"


def list_runs(root: Path) -> list[dict]:
    """The run folders under root, newest first, with their state (unfinished ones can be resumed)."""
    if not root.is_dir():
        return []
    runs = []
    for folder in sorted((p for p in root.iterdir() if (p / CONFIG).is_file()), reverse=True):
        log = RunLog(folder)
        state = log.state()
        best = log.best()
        runs.append({"run": folder.name, "folder": str(folder), "state": state.get("state", "new"),
                     "trials": state.get("trials", 0), "best": None if best is None else best.get("score"),
                     "resumable": state.get("state") not in ("done",)})
    return runs
