"""HTTP API under /merge-lab/v1/, on the WebUI's FastAPI app or the standalone app's.

Bodies are plain JSON objects (no pydantic models, so the same code runs with pydantic 1 in the WebUI and
pydantic 2 in Forge). A merge is described either by a full recipe (`{"recipe": {...}}`, as saved in a
file's metadata) or by names: `{"method": "weighted_sum", "models": ["a.safetensors", "b.safetensors"],
"base": null, "params": {"alpha": 0.3}, "blocks": {"alpha": [...]}, "seed": 0, ...}`.
User errors answer 400 with {"ok": false, "message": "..."}; nothing is written and the loaded model is
left as it was.

    GET  /merge-lab/v1/methods    every method with its parameter spec
    GET  /merge-lab/v1/models     the host's checkpoints
    GET  /merge-lab/v1/status     what is loaded now
    POST /merge-lab/v1/merge      merge into memory (the live model)
    POST /merge-lab/v1/save       merge to a file in the output folder ({"name": ..., "overwrite": false})
    POST /merge-lab/v1/restore    put the original model back
    POST /merge-lab/v1/generate   txt2img with the loaded model (hosts that generate): images as base64 PNG
    POST /merge-lab/v1/interrupt  stop the running merge
"""
from __future__ import annotations

from typing import Any

from .errors import InputError, MergeError
from .host import Host

PREFIX = "/merge-lab/v1"
RECIPE_OPTIONS = ("seed", "compute_dtype", "dtype", "components", "missing_keys", "nonfinite")


def recipe_from_body(host: Host, body: Any):
    from . import session
    from .recipe import Recipe
    if not isinstance(body, dict):
        raise InputError("The request body must be a JSON object.")
    if "recipe" in body:
        recipe = body["recipe"]
        recipe = Recipe.from_json(recipe) if isinstance(recipe, str) else Recipe.from_dict(recipe)
        return session.resolve_recipe(host, recipe)
    models = body.get("models")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise InputError("Give 'models': a list of checkpoint names (or a full 'recipe').")
    if not isinstance(body.get("method"), str):
        raise InputError("Give 'method': one of the names GET /merge-lab/v1/methods lists.")
    options = {k: body[k] for k in RECIPE_OPTIONS if k in body}
    return session.recipe_from_names(host, body["method"], models, base=body.get("base"),
                                     params=body.get("params") or {}, blocks=body.get("blocks") or {}, **options)


def generation_request(body: Any):
    """A GenerationRequest from a JSON body, with the WebUI API's field names (sampler_name too)."""
    from dataclasses import fields
    from .host import GenerationRequest
    if not isinstance(body, dict):
        raise InputError("The request body must be a JSON object.")
    body = dict(body)
    if "sampler_name" in body:
        body["sampler"] = body.pop("sampler_name")
    known = {f.name: f.type for f in fields(GenerationRequest)}
    unknown = set(body) - set(known)
    if unknown:
        raise InputError(f"Unknown generation field(s): {', '.join(sorted(unknown))}. Known: {', '.join(known)}.")
    defaults = GenerationRequest()
    try:
        values = {k: type(getattr(defaults, k))(v) for k, v in body.items()}
    except (TypeError, ValueError):
        raise InputError("A generation field has a value of the wrong type.") from None
    return GenerationRequest(**values)


def _png_base64(image) -> str:
    import base64
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def register_routes(app, host: Host, dependencies: list | None = None) -> None:
    """Add the routes to a FastAPI app; `dependencies` carry the host's auth (the WebUI's --api-auth)."""
    from fastapi import Body
    from fastapi.responses import JSONResponse
    from . import session
    from .methods import METHODS

    def answer(summary) -> JSONResponse:
        return JSONResponse(summary.as_dict(), status_code=200 if summary.ok else 400)

    def guarded(fn):
        try:
            return fn()
        except MergeError as e:
            return JSONResponse({"ok": False, "message": str(e)}, status_code=400)

    def methods():
        return [m.describe() for m in METHODS.values()]

    def models():
        return guarded(lambda: {"models": host.list_checkpoints(refresh=True)})

    def status():
        return session.status(host)

    def merge(body: dict = Body(...)):
        return guarded(lambda: answer(session.merge_to_memory(host, recipe_from_body(host, body))))

    def save(body: dict = Body(...)):
        def run():
            name = body.get("name") if isinstance(body, dict) else None
            if not isinstance(name, str):
                raise InputError("Give 'name': the file name to save as (inside the output folder).")
            return answer(session.save(host, recipe_from_body(host, body), name,
                                       overwrite=bool(body.get("overwrite", False))))
        return guarded(run)

    def restore():
        return answer(session.restore(host))

    def generate(body: dict = Body(...)):
        def run():
            summary = session.generate(host, generation_request(body))
            if not summary.ok:
                return JSONResponse({"ok": False, "message": summary.message}, status_code=400)
            return {"ok": True, "images": [_png_base64(i) for i in summary.images], "infotexts": summary.infotexts}
        return guarded(run)

    def interrupt():
        host.interrupt()
        return {"ok": True, "message": "Interrupt requested."}

    deps = dependencies or []
    for path, fn, method in (("/methods", methods, "GET"), ("/models", models, "GET"), ("/status", status, "GET"),
                             ("/merge", merge, "POST"), ("/save", save, "POST"), ("/restore", restore, "POST"),
                             ("/generate", generate, "POST"), ("/interrupt", interrupt, "POST")):
        app.add_api_route(PREFIX + path, fn, methods=[method], dependencies=deps)
