"""Packaging: the extension imports cheaply, install.py respects the WebUI, CI runs README's test command."""
import re
import runpy
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


FAKE_WEBUI = """
import sys, types
modules = types.ModuleType("modules")
cb = types.ModuleType("modules.script_callbacks")
cb.registered = []
for name in ("on_ui_tabs", "on_ui_settings", "on_app_started", "on_before_ui"):
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
    assert p.stdout.strip() == "[] ['on_app_started', 'on_before_ui', 'on_ui_settings', 'on_ui_tabs']"


WEBUI_FREEZE = ["torch==2.14.1", "numpy==1.26.2", "timm==1.0.9", "transformers==4.30.2", "pip==24.0",
                "clip @ git+https://github.com/openai/CLIP.git@d50d76d", "-e git+https://example/x.git#egg=x",
                "matplotlib==3.8.0", "PyYAML==6.0.1"]


def installer(installed, fail=()):
    """install.py's functions with a stand-in `launch` that records each pip call and its constraints file."""
    calls = []

    def run_pip(args, desc):
        spec = args.split('"')[1]
        path = args.split('--constraint "')[1].rstrip('"')
        calls.append((spec, Path(path).read_text().split()))
        if spec in fail:
            raise RuntimeError(f"Couldn't install {desc}.\nCommand: pip\nstderr: ERROR: Cannot install {spec} "
                               "because these package versions have conflicting dependencies.")
        installed.append(spec)

    launch = types.SimpleNamespace(run_pip=run_pip, is_installed=lambda module: module in ("matplotlib", "yaml"))
    ns = runpy.run_path(str(ROOT / "install.py"))   # not __main__: defines, installs nothing
    freeze = lambda: WEBUI_FREEZE + [f"{s.split('=')[0].split('>')[0]}==9" for s in installed]
    return ns, launch, freeze, calls


def test_install_py_installs_only_missing_tagged_requirements_with_the_webui_packages_held(capsys):
    ns, launch, freeze, calls = installer([])
    ns["main"](launch, freeze)
    assert [spec for spec, _ in calls] == ["bayesian-optimization>=3,<4", "cma>=4,<5", "image-reward==1.5"]
    for spec, pins in calls:
        assert "torch==2.14.1" in pins and "numpy==1.26.2" in pins and "transformers==4.30.2" in pins
        assert "pip==24.0" in pins and not any("@" in p or p.startswith("-") for p in pins)
        # only ImageReward may move timm (it pins timm==0.6.13); nothing else may
        assert ("timm==1.0.9" in pins) == (spec != "image-reward==1.5")
    out = capsys.readouterr().out
    assert "Merge Lab: installed cma>=4,<5; added cma 9\nMerge Lab: installed image-reward==1.5; added image-reward 9" in out
    for forbidden in ("torch", "gradio", "numpy", "safetensors", "transformers", "ray"):
        assert all(not spec.startswith(forbidden) for spec, _ in calls)


def test_install_py_reports_a_requirement_pip_cannot_add_and_goes_on(capsys):
    installed = []
    ns, launch, freeze, calls = installer(installed, fail=("cma>=4,<5",))
    ns["main"](launch, freeze)
    assert installed == ["bayesian-optimization>=3,<4", "image-reward==1.5"]
    out = capsys.readouterr().out
    assert ("Merge Lab: could not install cma>=4,<5 without changing a package the WebUI has installed "
            "(ERROR: Cannot install cma>=4,<5 because these package versions have conflicting dependencies.); "
            "the Merge Lab feature that needs it is unavailable, everything else works.") in out
    assert not list(Path(tempfile.gettempdir()).glob("merge-lab-constraints-*"))


def test_install_py_reads_every_tagged_line_of_requirements_txt():
    ns = runpy.run_path(str(ROOT / "install.py"))
    reqs = {spec: (module, moves) for module, spec, moves in ns["webui_requirements"]()}
    assert reqs == {"matplotlib": ("matplotlib", []), "bayesian-optimization>=3,<4": ("bayes_opt", []),
                    "cma>=4,<5": ("cma", []), "pyyaml": ("yaml", []), "image-reward==1.5": ("ImageReward", ["timm"])}


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
