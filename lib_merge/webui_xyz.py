"""Merge Lab's axes in the WebUI's own X/Y/Z plot script (scripts/xyz_grid.py), as Model Mixer offers them:
"Merge Lab: α", "Merge Lab: block weights preset" and "Merge Lab: model B".

Each cell re-merges the merge the Merge tab has loaded, with the axis's value (a slider change: only the changed
tensors are rewritten where the live cache holds the inputs), inside the plot's own generation job: the plot
already holds the WebUI's queue lock, so the merge runs under `host.inside_generation()` instead of taking it
again. Two Merge Lab axes combine: each starts from what the other left loaded. The last cell's merge stays
loaded after the plot; Restore original model puts the checkpoint back.
"""
from __future__ import annotations

from . import session
from .core.errors import MergeError
from .engine.recipe import Recipe
from .host import Host

AXES = {"Merge Lab: α": ("alpha", float), "Merge Lab: block weights preset": ("preset", str),
        "Merge Lab: model B": ("model:B", str)}


def loaded_recipe(host: Host) -> Recipe:
    if host.loaded is None:
        raise MergeError("The Merge Lab axes change the merge the Merge tab has loaded: merge two models there "
                         "(Merge), then run the X/Y/Z plot.")
    return session.resolve_recipe(host, Recipe.from_json(host.loaded.recipe_json))


def apply_axis(host: Host, kind: str, value) -> Recipe:
    """The loaded merge with one Merge Lab axis value, merged into the WebUI's model; returns the recipe."""
    from .xy import Axis, apply_value
    base = loaded_recipe(host)
    family = base.arch or session.header_of(host, base)[0]
    recipe = session.resolve_recipe(host, apply_value(base, Axis(kind, [value]), 0, family))
    with host.inside_generation():
        s = session.merge_to_memory(host, recipe)
    if not s.ok:
        raise MergeError(f"Merge Lab ({kind} = {value}): {s.message}")
    return recipe


def axis_options(xyz, host: Host) -> list:
    """AxisOption objects for the xyz_grid module `xyz` (the WebUI's class, so its plot treats them as its own)."""
    from .core.weights import PRESETS

    def applier(kind):
        def apply(p, x, xs):
            try:
                apply_axis(host, kind, x)
            except MergeError as e:   # the plot shows a RuntimeError's text in the page
                raise RuntimeError(str(e)) from None
        return apply

    def confirm_models(p, xs):
        for x in xs:
            host.resolve_checkpoint(str(x))

    return [xyz.AxisOption("Merge Lab: α", float, applier("alpha"), cost=0.5),
            xyz.AxisOption("Merge Lab: block weights preset", str, applier("preset"), choices=lambda: list(PRESETS),
                           cost=0.5),
            xyz.AxisOption("Merge Lab: model B", str, applier("model:B"), confirm=confirm_models, cost=1.0,
                           choices=lambda: host.list_checkpoints())]


def txt2img_indices(xyz) -> dict[str, int]:
    """The X/Y/Z type index of each Merge Lab axis in txt2img's plot (what its API script_args take)."""
    shown = [o.label for o in xyz.axis_options if type(o) is xyz.AxisOption or not getattr(o, "is_img2img", False)]
    return {label: shown.index(label) for label in AXES if label in shown}
