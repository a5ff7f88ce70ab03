"""Packaging: the extension imports cheaply, install.py respects the WebUI, CI runs README's test command."""
import re
import runpy
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


FAKE_WEBUI = """
import sys, types
modules = types.ModuleType("modules")
cb = types.ModuleType("modules.script_callbacks")
cb.registered = []
for name in ("on_ui_tabs", "on_ui_settings", "on_app_started"):
    setattr(cb, name, lambda fn, name=name: cb.registered.append(name))
scripts = types.ModuleType("modules.scripts")
scripts.Script = object
scripts.AlwaysVisible = object()
modules.script_callbacks, modules.scripts = cb, scripts
sys.modules.update({"modules": modules, "modules.script_callbacks": cb, "modules.scripts": scripts})
"""


def test_extension_import_is_cheap_and_registers_its_callbacks():
    # the WebUI's `modules` stand-in has only what scripts/merge_lab.py touches at import time
    code = FAKE_WEBUI + (
        "import runpy; runpy.run_path('scripts/merge_lab.py');"
        "heavy = [m for m in ('matplotlib', 'diffusers', 'ImageReward', 'transformers', 'gradio', 'lib_merge.ui')"
        " if m in sys.modules];"
        "print(heavy, sorted(cb.registered))"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[] ['on_app_started', 'on_ui_settings', 'on_ui_tabs']"


def test_install_py_installs_only_missing_tagged_requirements(monkeypatch):
    calls, checked = [], []
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: checked.append(name) or name == "matplotlib"
    launch.run_pip = lambda args, desc: calls.append(args)
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(ROOT / "install.py"))
    assert "matplotlib" in checked and "bayes_opt" in checked and "yaml" in checked and "cma" in checked
    assert calls == ['install "bayesian-optimization>=3,<4"', 'install "cma>=4,<5"', 'install "pyyaml"']
    for forbidden in ("torch", "gradio", "numpy", "safetensors", "transformers"):
        assert forbidden not in checked


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = re.search(r"^\s*(bash test\.sh)\s*$", readme, re.M)
    run_cmd = re.search(r"^\s*(bash run\.sh)\s*$", readme, re.M)
    assert test_cmd and run_cmd
    assert test_cmd.group(1) in ci


def test_requirements_pin_the_webui_stack():
    req = (ROOT / "requirements.txt").read_text()
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "gradio==3.41.2", "image-reward==1.5", "numpy<2"):
        assert pin in req
