"""A1111 glue for Merge Lab: registers the "Merge" tab, its settings section, its API routes, and the
infotext label of merged models. Nothing else lives here; the work is in lib_merge.

Importing this file stays cheap: lib_merge's UI, torch-heavy and plotting modules load when first used.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from modules import script_callbacks, scripts  # noqa: E402

import lib_merge  # noqa: E402,F401  (cheap; the WebUI restores sys.path after loading scripts, so import now)

_host = None


def host():
    """The one WebUIHost of this WebUI process."""
    global _host
    if _host is None:
        from lib_merge.host.webui import WebUIHost
        _host = WebUIHost()
        try:
            _host.remove_stale_partials()   # what saves killed mid-write left behind (logged)
        except Exception as e:   # never stop the WebUI's start over a cleanup
            print(f"Merge Lab: could not clean up unfinished saves: {e}")
    return _host


def on_ui_tabs():
    from lib_merge.ui.tab import build_tab
    return [(build_tab(host()), "Merge", "merge_lab_tab")]


def on_ui_settings():
    from lib_merge.host.webui import register_settings
    register_settings()


def on_app_started(demo, app):
    from lib_merge.api import register_routes
    from lib_merge.host.webui import api_dependencies
    register_routes(app, host(), api_dependencies())


def add_xyz_axes():
    """Merge Lab's axes in the WebUI's X/Y/Z plot script (lib_merge/webui_xyz.py), before its UI is built."""
    from lib_merge.webui_xyz import AXES, axis_options
    xyz = host().xyz_module()
    if xyz is not None and not any(o.label in AXES for o in xyz.axis_options):   # once, also after a UI reload
        xyz.axis_options.extend(axis_options(xyz, host()))


class MergeLabInfotext(scripts.Script):
    """Adds the loaded merge's recipe to the infotext of every txt2img/img2img generation."""

    def title(self):
        return "Merge Lab infotext"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        if _host is not None and _host.loaded is not None:
            from lib_merge.host.webui import add_recipe_to_infotext
            add_recipe_to_infotext(p, _host.loaded)


script_callbacks.on_before_ui(add_xyz_axes)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
