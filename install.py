"""WebUI install hook: install what Merge Lab needs and the WebUI lacks; never torch, never a WebUI pin.

The one list of requirements is requirements.txt; only its lines tagged `[webui]` are considered here,
and only when the package is not importable yet (`launch.is_installed`). Everything the WebUI pins itself
(torch, gradio, numpy, safetensors, transformers...) is left exactly as the WebUI installed it.
"""
import os
import re

import launch  # provided by the WebUI at install time

HERE = os.path.dirname(os.path.abspath(__file__))


def webui_requirements(path=os.path.join(HERE, "requirements.txt")):
    """(import name, pip spec) for each requirements line tagged [webui]."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            spec, _, comment = line.partition("#")
            spec = spec.strip()
            if not spec or "[webui]" not in comment:
                continue
            dist = re.split(r"[<>=!~ ;\[]", spec, maxsplit=1)[0]
            module = {"bayesian-optimization": "bayes_opt", "pyyaml": "yaml"}.get(dist, dist.replace("-", "_"))
            out.append((module, spec))
    return out


for module, spec in webui_requirements():
    if not launch.is_installed(module):
        launch.run_pip(f'install "{spec}"', f"Merge Lab requirement: {spec}")
