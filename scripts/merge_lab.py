"""A1111 glue for Merge Lab: makes `lib_merge` importable. Nothing else lives here.

The tab, settings and API routes are registered from lib_merge.ui / lib_merge.host.webui as they land;
importing this file stays cheap (no matplotlib, diffusers or ImageReward at WebUI start-up).
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import lib_merge  # noqa: E402,F401  (cheap: the package imports nothing heavy)
