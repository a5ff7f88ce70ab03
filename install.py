"""WebUI install hook: install what Merge Lab needs and the WebUI lacks, without moving any package the WebUI has.

The one list of requirements is requirements.txt; only its lines tagged `[webui]` are considered here, and
only when the package is not importable yet (`launch.is_installed`). Each install runs under a constraints
file made from the venv's own `pip freeze`, so pip may add packages but never upgrade or downgrade one that
is there (torch, gradio, numpy, transformers...). A line tagged `[webui moves: NAME]` lets just NAME move:
ImageReward 1.5 pins timm==0.6.13, which the WebUI's own timm users (BLIP interrogate) accept.
A requirement that cannot be installed that way is reported in one sentence and skipped: the WebUI starts
regardless, and only the feature that needs it is unavailable.
"""
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
IMPORT_NAMES = {"bayesian-optimization": "bayes_opt", "pyyaml": "yaml", "image-reward": "ImageReward"}
FEATURE = {"image-reward": "AutoMBW's imagereward scorer", "ray": "AutoMBW's parallel workers"}


def dist_name(spec):
    return re.split(r"[<>=!~ ;\[]", spec.strip(), maxsplit=1)[0]


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def webui_requirements(path=os.path.join(HERE, "requirements.txt")):
    """(import name, pip spec, names allowed to move) for each requirements line tagged [webui...]."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            spec, _, comment = line.partition("#")
            spec = spec.strip()
            tag = re.search(r"\[webui(?: moves: ([^\]]+))?\]", comment)
            if not spec or not tag:
                continue
            dist = dist_name(spec)
            moves = [canonical(n) for n in (tag.group(1) or "").replace(",", " ").split()]
            out.append((IMPORT_NAMES.get(dist, dist.replace("-", "_")), spec, moves))
    return out


def pip_freeze():
    """The venv's installed distributions as `name==version` lines (pip itself and setuptools included)."""
    p = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    return p.stdout.splitlines()


def constraints(freeze_lines, moves=()):
    """Constraint lines pinning every installed distribution at its version, except those allowed to move.
    Editable and direct-URL installs are left out (pip refuses them as constraints; nothing asks for them)."""
    keep = []
    for line in freeze_lines:
        line = line.strip()
        if "==" not in line or line.startswith(("-", "#")) or " @ " in line:
            continue
        if canonical(line.split("==", 1)[0]) not in moves:
            keep.append(line)
    return keep


def versions(freeze_lines):
    return {canonical(line.split("==", 1)[0]): line.split("==", 1)[1]
            for line in freeze_lines if "==" in line and " @ " not in line and not line.startswith("-")}


def install(launch, spec, moves, freeze=pip_freeze):
    """Install spec with every other installed distribution held at its version; report what changed.
    Returns True when installed; False (after one printed sentence) when pip could not do it that way."""
    before = freeze()
    fd, path = tempfile.mkstemp(prefix="merge-lab-constraints-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(constraints(before, moves)) + "\n")
    try:
        launch.run_pip(f'install "{spec}" --constraint "{path}"', f"Merge Lab requirement: {spec}")
    except Exception as e:  # launch.run_pip raises RuntimeError with pip's output
        feature = FEATURE.get(dist_name(spec), "the Merge Lab feature that needs it")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        first = next((ln[ln.index("ERROR:"):] for ln in lines if "ERROR:" in ln), lines[0])  # pip's own reason, when given
        print(f"Merge Lab: could not install {spec} without changing a package the WebUI has installed "
              f"({first}); {feature} is unavailable, everything else works. To add it by hand: "
              f'"{sys.executable}" -m pip install "{spec}"', flush=True)
        return False
    finally:
        os.unlink(path)
    old, new = versions(before), versions(freeze())
    moved = [f"{n} {old[n]} -> {new[n]}" for n in sorted(old) if n in new and new[n] != old[n]]
    added = [f"{n} {new[n]}" for n in sorted(new) if n not in old]
    print(f"Merge Lab: installed {spec}" + (f"; added {', '.join(added)}" if added else "")
          + (f"; changed {', '.join(moved)}" if moved else ""), flush=True)
    return True


def main(launch, freeze=pip_freeze):
    for module, spec, moves in webui_requirements():
        if not launch.is_installed(module):
            install(launch, spec, moves, freeze)


if __name__ == "__main__":
    import launch  # provided by the WebUI, which runs this file with its venv's python

    main(launch)
