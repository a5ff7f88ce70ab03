"""One trial's work: merge the candidate into the host's live model, generate the payloads, score the images.

`Evaluator` does it in this process with a Host (the WebUI's, or the standalone app's diffusers model);
`RemoteEvaluator` asks a running WebUI or standalone app that has Merge Lab to merge and generate over its
HTTP API and scores here. Both return an `Outcome`; a failure (NaN image, out of memory, a scorer error, a
merge error) is an outcome with its reason, never an exception that ends the run. Only an Interrupt is
raised (`Interrupted`), so the runner leaves that trial out of the log and a resume runs it again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..core.errors import MergeError


class Interrupted(MergeError):
    """The user stopped the run during a trial."""


@dataclass
class Outcome:
    images: list = field(default_factory=list)           # PIL images, payload order, batch images in turn
    infotexts: list[str] = field(default_factory=list)
    payload_of: list[int] = field(default_factory=list)   # index of each image's payload
    raw: dict[str, list[float]] = field(default_factory=dict)   # scorer key -> one score per image
    seconds: dict[str, float] = field(default_factory=dict)     # merge, generate, score
    error: str | None = None
    rewritten: int | None = None      # tensors the re-merge wrote (None: unknown)
    worker: str = "local"


def flat_image(image) -> bool:
    """True for an image of a single colour: what a NaN in the model's output becomes."""
    lo, hi = zip(*image.convert("RGB").getextrema())
    return lo == hi


class Evaluator:
    """Merge → generate → score in this process, through a Host and scorers loaded once."""

    def __init__(self, host, scorers: list, keys: list[str], *, device: str | None = None,
                 stopped: Callable[[], bool] = lambda: False):
        self.host, self.scorers, self.keys, self.device, self.stopped = host, scorers, keys, device, stopped

    # the two steps a remote evaluator does over HTTP instead
    def merge(self, recipe) -> int | None:
        from .. import session
        summary = session.merge_to_memory(self.host, recipe, device=self.device)
        if not summary.ok:
            raise MergeError(summary.message)
        return summary.rewritten

    def generate(self, request) -> tuple[list, list[str]]:
        from .. import session
        summary = session.generate(self.host, request)
        if not summary.ok:
            raise MergeError(summary.message)
        return summary.images, summary.infotexts

    def finish(self, how: str, recipe) -> list[str]:
        """At the end: the best recipe into the live model (apply), or the original model back (restore)."""
        from .. import session
        if how == "apply" and recipe is not None:
            summary = session.merge_to_memory(self.host, recipe, device=self.device)
            return [f"Best recipe loaded: {summary.message}"]
        return [session.restore(self.host).message]

    def evaluate(self, recipe, payloads: list, params: dict) -> Outcome:
        out = Outcome()
        step = "merge"
        self._check_stop()
        try:
            t = time.monotonic()
            out.rewritten = self.merge(recipe)
            out.seconds["merge"] = time.monotonic() - t
            step, t = "generate", time.monotonic()
            for i, payload in enumerate(payloads):
                images, infos = self.generate(payload.request())
                for image in images:
                    if flat_image(image):
                        raise MergeError(f"payload {i + 1} gave an image of one flat colour "
                                         f"(NaN or inf in the merged model's output?)")
                out.images += images
                out.infotexts += infos
                out.payload_of += [i] * len(images)
                self._check_stop()
            out.seconds["generate"] = time.monotonic() - t
            step, t = "score", time.monotonic()
            dicts = [payloads[i].to_dict() for i in out.payload_of]
            for key, scorer in zip(self.keys, self.scorers):
                out.raw[key] = scorer.score(out.images, dicts, params)
            out.seconds["score"] = time.monotonic() - t
        except Interrupted:
            raise
        except Exception as e:   # noqa: BLE001 - a failed trial is logged with its reason; the run goes on
            self._check_stop()
            out.error = f"{step}: {_reason(e)}"
        return out

    def _check_stop(self) -> None:
        if self.stopped():
            raise Interrupted("Interrupted.")

    def close(self) -> None:
        for scorer in self.scorers:
            scorer.close()


class RemoteEvaluator(Evaluator):
    """Merge and generate in a running WebUI / standalone app (its /merge-lab/v1 API); score here."""

    def __init__(self, url: str, scorers: list, keys: list[str], *, auth: tuple[str, str] | None = None,
                 timeout: float = 3600.0, stopped: Callable[[], bool] = lambda: False):
        super().__init__(None, scorers, keys, stopped=stopped)
        self.url, self.auth, self.timeout = url.rstrip("/"), auth, timeout

    def _post(self, path: str, body: dict) -> dict:
        import httpx
        try:
            r = httpx.post(f"{self.url}/merge-lab/v1{path}", json=body, auth=self.auth, timeout=self.timeout)
        except httpx.HTTPError as e:
            raise MergeError(f"{self.url} did not answer ({type(e).__name__}: {e}).") from None
        try:
            data = r.json()
        except ValueError:
            raise MergeError(f"{self.url}{path} answered {r.status_code} without JSON.") from None
        if r.status_code != 200 or data.get("ok") is False:
            raise MergeError(data.get("message") or data.get("detail") or f"HTTP {r.status_code}")
        return data

    def merge(self, recipe) -> int | None:
        self._post("/merge", {"recipe": recipe.public_dict()})
        return None

    def generate(self, request) -> tuple[list, list[str]]:
        import base64
        import io
        from dataclasses import asdict

        from PIL import Image
        data = self._post("/generate", asdict(request))
        images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in data["images"]]
        return images, list(data.get("infotexts") or [""] * len(images))

    def finish(self, how: str, recipe) -> list[str]:
        if how == "apply" and recipe is not None:
            self.merge(recipe)
            return [f"Best recipe loaded into {self.url}."]
        data = self._post("/restore", {})
        return [f"{self.url}: {data.get('message', 'restored')}"]

    def _check_stop(self) -> None:
        if self.stopped():
            try:
                self._post("/interrupt", {})
            except MergeError:
                pass
            raise Interrupted("Interrupted.")


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, MemoryError) or "out of memory" in text.lower():
        return f"out of memory ({text})"
    return text if isinstance(e, MergeError) else f"{type(e).__name__}: {text}"

