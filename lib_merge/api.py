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

AutoMBW (lib_merge/optimize/, docs/AUTOMBW.md): one run at a time per host, in the background.

    POST /merge-lab/v1/optimize/start    a run config (as `optimize run` reads) -> {"ok", "run"}
    GET  /merge-lab/v1/optimize/status   ?run=ID (default: the running one): state, trials, best, ETA
    POST /merge-lab/v1/optimize/stop     stop the running run (within the current trial)
    POST /merge-lab/v1/optimize/resume   {"run": ID}: continue a stopped or crashed run
    GET  /merge-lab/v1/optimize/runs     the run folders, with their state
    POST /merge-lab/v1/optimize/rate     {"ratings": [...]}: the manual scorer's ratings, one per image

LoRA tools (lora/actions.py checks names and outputs as the tab does; LoRAs are names in the host's LoRA
folder, given as "name:weight" texts or {"name": ..., "weight": 1, "weight_te": 1} objects):

    GET  /merge-lab/v1/lora/list           the LoRA folder's files
    GET  /merge-lab/v1/lora/info?name=N    format, architecture, modules, ranks, training fields, top tags
    POST /merge-lab/v1/lora/merge          {"loras": [...], "mode": "concat", "density": 1, "seed": 0,
                                            "rank": null, "conv_rank": null, "name": "...", "where": "lora",
                                            "dtype": "float16", "overwrite": false} -> a new LoRA file
    POST /merge-lab/v1/lora/resize         {"lora": "...", "rank": 16 | "dynamic": "sv_fro:0.9", "conv_rank",
                                            "name", "where", "dtype", "overwrite"} -> a new LoRA file
    POST /merge-lab/v1/lora/extract        {"base": "...", "tuned": "...", "rank": 32, "conv_rank", "name",
                                            "where", "dtype", "overwrite"} -> a new LoRA file
    POST /merge-lab/v1/lora/bake           {"checkpoint": "...", "loras": [...], "lbw": null, "live": false,
                                            "name": "...", "dtype": "float16", "overwrite": false}: a new
                                            checkpoint in the output folder, or (live) into the loaded model
    POST /merge-lab/v1/lora/xy             {"checkpoint": "...", "loras": [...], "mode", "density", "rank",
                                            "merge_seed", "lbw", "x": {"kind": "strength:1", "values": "0, 1"},
                                            "y": {...} or null, "generation": {txt2img fields},
                                            "images": false, "save_loras": false} -> labels, folder, grid
                                            (and cells) as base64 PNG, saved_loras
"""
from __future__ import annotations

from typing import Any

from .core.errors import InputError, MergeError
from .host import Host

PREFIX = "/merge-lab/v1"
RECIPE_OPTIONS = ("seed", "compute_dtype", "dtype", "components", "missing_keys", "nonfinite", "elemental", "adjust")


def recipe_from_body(host: Host, body: Any):
    from . import session
    from .engine.recipe import Recipe
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

    from .core.generation import GenerationRequest
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

    def xyz_axes():
        def run():
            from .webui_xyz import txt2img_indices
            xyz = host.xyz_module()
            if xyz is None:
                raise MergeError("There is no X/Y/Z plot here: its Merge Lab axes are the WebUI's.")
            return {"axes": txt2img_indices(xyz)}
        return guarded(run)

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

    routes = [("/methods", methods, "GET"), ("/models", models, "GET"), ("/status", status, "GET"),
              ("/xyz-axes", xyz_axes, "GET"), ("/merge", merge, "POST"), ("/save", save, "POST"),
              ("/restore", restore, "POST"), ("/generate", generate, "POST"), ("/interrupt", interrupt, "POST")] + _lora_routes(host, guarded) \
        + _optimize_routes(host, guarded)
    for path, fn, method in routes:
        app.add_api_route(PREFIX + path, fn, methods=[method], dependencies=dependencies or [])


def _optimize_routes(host: Host, guarded) -> list:
    """AutoMBW's routes (see the module docstring); the tab drives the same Runs."""
    from fastapi import Body

    def runs():
        from .optimize.jobs import runs_for
        return runs_for(host)

    def start(body: dict = Body(...)):
        def run():
            if not isinstance(body, dict):
                raise InputError("The request body must be a run config (a JSON object).")
            return {"ok": True, "run": runs().start(body)}
        return guarded(run)

    def status(run: str = ""):
        return guarded(lambda: {"ok": True, **runs().status(run or None)})

    def stop():
        return guarded(lambda: {"ok": True, "message": runs().stop()})

    def resume(body: dict = Body(...)):
        def run():
            name = body.get("run") if isinstance(body, dict) else None
            if not isinstance(name, str) or not name:
                raise InputError("Give 'run': the run's folder name (GET /merge-lab/v1/optimize/runs lists them).")
            return {"ok": True, "run": runs().resume(name)}
        return guarded(run)

    def run_list():
        return guarded(lambda: {"ok": True, "runs": runs().list()})

    def rate(body: dict = Body(...)):
        def run():
            ratings = body.get("ratings") if isinstance(body, dict) else None
            if not isinstance(ratings, list):
                raise InputError("Give 'ratings': a list of numbers, one per image.")
            return {"ok": True, "message": runs().rate(ratings)}
        return guarded(run)

    return [("/optimize/start", start, "POST"), ("/optimize/status", status, "GET"), ("/optimize/stop", stop, "POST"),
            ("/optimize/resume", resume, "POST"), ("/optimize/runs", run_list, "GET"), ("/optimize/rate", rate, "POST")]


def _lora_routes(host: Host, guarded) -> list:
    """The LoRA tools' routes (see the module docstring)."""
    from fastapi import Body

    from .lora import actions
    from .lora.merge import DEFAULT_DENSITY

    def number(body: dict, key: str, default, kind=float):
        try:
            v = body.get(key, default)
            return None if v is None else kind(v)
        except (TypeError, ValueError):
            raise InputError(f"'{key}' must be a number.") from None

    def wrote(out, message: str) -> dict:
        """The answer of a job that wrote a file: its message (warnings after the first line), path, name."""
        first, *warnings = message.split("\n")
        return {"ok": True, "message": first, "warnings": warnings, "path": str(out), "name": out.name}

    def need_dict(body) -> dict:
        if not isinstance(body, dict):
            raise InputError("The request body must be a JSON object.")
        return body

    def lora_list():
        return guarded(lambda: {"loras": host.list_loras(refresh=True)})

    def lora_info(name: str = ""):
        from .lora.info import describe
        return guarded(lambda: describe(actions.lora_path(host, name), tags=20))

    def lora_merge(body: dict = Body(...)):
        def run():
            need_dict(body)
            items = actions.lora_entries(host, body.get("loras"))
            mode = str(body.get("mode", "concat"))
            rank = number(body, "rank", None, int)
            out = actions.new_lora_path(host, str(body.get("name") or f"lora_merge_{mode}"), str(body.get("where", "lora")),
                                        [i.path for i in items], bool(body.get("overwrite", False)))
            with actions.job(host, "Merging LoRAs"):
                message = actions.merge_loras(
                    items, out, mode=mode, density=number(body, "density", DEFAULT_DENSITY), seed=number(body, "seed", 0, int),
                    majority=str(body.get("election", body.get("majority", "sum"))), rank=rank,
                    conv_rank=number(body, "conv_rank", None, int), dtype=str(body.get("dtype", "float16")),
                    overwrite=bool(body.get("overwrite", False)), cancel=host.interrupted)
            return wrote(out, message)
        return guarded(run)

    def lora_resize(body: dict = Body(...)):
        def run():
            need_dict(body)
            src = actions.lora_path(host, str(body.get("lora") or ""))
            rank, rule = number(body, "rank", None, int), body.get("dynamic") or None
            actions.check_resize(rank, rule)
            name = str(body.get("name") or actions.resized_name(src, rank, rule))
            out = actions.new_lora_path(host, name, str(body.get("where", "lora")), [src], bool(body.get("overwrite")))
            with actions.job(host, "Resizing"):
                message = actions.resize_lora(src, out, rank=rank, rule=rule, conv_rank=number(body, "conv_rank", None, int),
                                              dtype=str(body.get("dtype", "float16")),
                                              overwrite=bool(body.get("overwrite")), cancel=host.interrupted)
            return wrote(out, message)
        return guarded(run)

    def lora_extract(body: dict = Body(...)):
        def run():
            need_dict(body)
            base = host.resolve_checkpoint(str(body.get("base") or ""))
            tuned = host.resolve_checkpoint(str(body.get("tuned") or ""))
            actions.check_extract(base, tuned)
            rank = number(body, "rank", None, int)
            if rank is None or rank < 1:
                raise InputError("Give 'rank': the LoRA's rank (at least 1).")
            out = actions.new_lora_path(host, str(body.get("name") or actions.extracted_name(tuned, rank)),
                                        str(body.get("where", "lora")), [base, tuned], bool(body.get("overwrite")))
            with actions.job(host, "Extracting"):
                message = actions.extract_lora(base, tuned, out, rank, conv_rank=number(body, "conv_rank", None, int),
                                               dtype=str(body.get("dtype", "float16")),
                                               overwrite=bool(body.get("overwrite")), cancel=host.interrupted)
            return wrote(out, message)
        return guarded(run)

    def lora_bake(body: dict = Body(...)):
        def run():
            from .core.files import check_output_path, safe_output_path
            from .lora.bake import bake
            from .lora.live import bake_into_host
            need_dict(body)
            ckpt = host.resolve_checkpoint(str(body.get("checkpoint") or ""))
            items = actions.lora_entries(host, body.get("loras"))
            lbw = actions.check_lbw(body.get("lbw"), ckpt)
            if body.get("live"):
                actions.check_live(host)
                with actions.job(host, "Baking into the loaded model"):
                    r = bake_into_host(host, ckpt, items, lbw=lbw)
                return {"ok": True, "message": f"Baked into the loaded model as {host.loaded.name}.",
                        "name": host.loaded.name, "short_hash": host.loaded.short_hash,
                        "keys_changed": len(r.touched), "warnings": r.warnings}
            name = str(body.get("name") or actions.baked_name(ckpt, items))
            overwrite = bool(body.get("overwrite", False))
            out = check_output_path(safe_output_path(host.output_dir(), name), [ckpt] + [i.path for i in items],
                                    overwrite)
            with actions.job(host, "Baking"):
                r = bake(ckpt, items, out, lbw=lbw, dtype=str(body.get("dtype", "float16")), overwrite=overwrite,
                         cancel=host.interrupted)
            host.saved(r.path)
            return {"ok": True, "message": f"Wrote {r.path.name}.", "path": str(r.path), "name": r.path.name,
                    "keys_changed": len(r.touched), "warnings": r.warnings}
        return guarded(run)

    def lora_xy(body: dict = Body(...)):
        def run():
            from .lora import xy as lxy
            need_dict(body)
            ckpt = host.resolve_checkpoint(str(body.get("checkpoint") or ""))
            plot = lxy.LoraPlot(ckpt, actions.lora_entries(host, body.get("loras")), mode=str(body.get("mode", "concat")),
                                density=number(body, "density", DEFAULT_DENSITY), rank=number(body, "rank", None, int),
                                conv_rank=number(body, "conv_rank", None, int),
                                merge_seed=number(body, "merge_seed", 0, int), lbw=actions.check_lbw(body.get("lbw"), ckpt))
            axes = []
            for key in ("x", "y"):
                a = body.get(key)
                if a is None and key == "y":
                    axes.append(None)
                    continue
                if not isinstance(a, dict):
                    raise InputError(f"Give '{key}': {{\"kind\": ..., \"values\": ...}} (the kinds: "
                                     f"{', '.join(lxy.kind_choices(2))}).")
                axes.append(lxy.LoraAxis(str(a.get("kind", "")), a.get("values", "")))
            result = lxy.run_lora_xy(host, plot, axes[0], axes[1], generation_request(body.get("generation") or {}),
                                     save_loras=bool(body.get("save_loras", False)))
            out = {"ok": True, "message": result.message, "folder": str(result.folder), "labels": result.labels,
                   "x_labels": result.x_labels, "y_labels": result.y_labels, "merges": result.merges_done,
                   "infotexts": result.infotexts, "grid": _png_base64(result.grid_image),
                   "saved_loras": [str(p) for p in result.saved_models]}
            if body.get("images"):
                out["images"] = [_png_base64(i) for i in result.images]
            return out
        return guarded(run)

    return [("/lora/list", lora_list, "GET"), ("/lora/info", lora_info, "GET"), ("/lora/merge", lora_merge, "POST"),
            ("/lora/resize", lora_resize, "POST"), ("/lora/extract", lora_extract, "POST"),
            ("/lora/bake", lora_bake, "POST"), ("/lora/xy", lora_xy, "POST")]


