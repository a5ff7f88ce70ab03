"""The "Merge" tab (gradio) and the standalone app. Importing this package is cheap: gradio is imported
only by build_tab / the app."""


def build_tab(host):
    """The Merge tab's gr.Blocks for `host` (see lib_merge.ui.tab)."""
    from .tab import build_tab as build
    return build(host)
