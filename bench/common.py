"""What the benchmark scripts share: timing a whole command under /usr/bin/time -v."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _clean_stderr(err: str) -> str:
    """Drop tqdm progress lines (sd-mecha writes one per key, separated by carriage returns)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "Merging recipe" not in ln]
    return "\n".join(lines)


def timed(cmd: list[str], env=None) -> tuple[float, float]:
    """Run a command under /usr/bin/time -v from the repository root; (wall seconds, peak RSS in GB)."""
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    err = p.stderr
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{_clean_stderr(err)[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", err).group(1)
    parts = [float(x) for x in wall.split(":")]
    seconds = parts[-1] + 60 * parts[-2] + (3600 * parts[-3] if len(parts) > 2 else 0)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    return seconds, rss_kb * 1024 / 1e9
