"""Foundation benchmark: two-model merges of full-size SD1.5 float16 checkpoints, side by side with peers.

Each command runs as its own process under `/usr/bin/time -v` (wall time and peak RSS of the whole
command, process start included), the runs interleaved so machine noise hits every peer alike:

- ours:    `python -m lib_merge merge --merge-vae` to a file (weighted_sum 0.5, add_difference 1.0): every key,
           the VAE included, as sd-mecha and the naive merge do; and an in-memory merge into a DictSink
           (bench/dictsink_merge.py, the UI's "Merge"; it writes no file, so it gets no speed-up column);
- sd-mecha 1.1.8 (`bench/peers/mecha_merge.py`, run with its own venv, see docs/BENCHMARKS.md);
- naive:   load every input whole, merge, save (`bench/peers/naive_merge.py`).

Usage:
    python bench/make_checkpoints.py --out /work/bench-data --count 3
    python bench/bench_foundation.py --data /work/bench-data --mecha-python /work/mecha-venv/bin/python --repeat 3

Our input hashes are cached after the first merge (as the WebUI caches them); `--cold-hash` clears the
cache before each of our runs so the sha256 of both inputs is computed during the merge.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with sd15_0/1/2.safetensors (bench/make_checkpoints.py)")
    ap.add_argument("--mecha-python", help="python of a venv with sd-mecha 1.1.8 (peer skipped without it)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="scratch folder for outputs (default: beside the data)")
    ap.add_argument("--cold-hash", action="store_true", help="clear our hash cache before each of our runs")
    ap.add_argument("--only", nargs="*", help="subset of: ours ours_dict mecha naive")
    args = ap.parse_args()

    data = Path(args.data)
    a, b, c = (str(data / f"sd15_{i}.safetensors") for i in range(3))
    out_dir = Path(args.out or data)
    out = str(out_dir / "bench_out.safetensors")
    py = sys.executable
    cache = tempfile.mkdtemp(prefix="merge_lab_bench_cache_")
    env = dict(os.environ, MERGE_LAB_CACHE=cache)

    jobs: dict[tuple[str, str], list[str]] = {}
    for method, inputs, alpha in (("weighted_sum", [a, b], "0.5"), ("add_difference", [a, b, c], "1.0")):
        model_flags = [x for m in inputs for x in ("--model", m)]
        jobs[("ours", method)] = [py, "-m", "lib_merge", "merge", "--method", method, *model_flags,
                                  "--alpha", alpha, "--merge-vae", "--dtype", "float16", "--overwrite", "-o", out]
        jobs[("ours_dict", method)] = [py, "bench/dictsink_merge.py", method, *inputs, "--alpha", alpha]
        if args.mecha_python:
            jobs[("mecha", method)] = [args.mecha_python, "bench/peers/mecha_merge.py", method, *inputs, out,
                                       "--alpha", alpha]
        jobs[("naive", method)] = [py, "bench/peers/naive_merge.py", method, *inputs, out, "--alpha", alpha]
    if args.only:
        jobs = {k: v for k, v in jobs.items() if k[0] in args.only}

    results: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in jobs}
    for rep in range(args.repeat):
        for key, cmd in jobs.items():
            if key[0].startswith("ours") and args.cold_hash:
                shutil.rmtree(cache, ignore_errors=True)
            if os.path.exists(out):
                os.unlink(out)
            wall, rss = timed(cmd, env)
            results[key].append((wall, rss))
            print(f"[{rep + 1}/{args.repeat}] {key[0]:9s} {key[1]:15s} {wall:7.2f} s  {rss:5.2f} GB", flush=True)
    if os.path.exists(out):
        os.unlink(out)
    shutil.rmtree(cache, ignore_errors=True)

    print("\n| method | tool | wall s (median, min–max) | peak RSS GB (max) | speed-up vs sd-mecha |")
    print("|---|---|---|---|---|")
    for (tool, method), rs in results.items():
        walls = [r[0] for r in rs]
        med = statistics.median(walls)
        ratio = ""
        peer = results.get(("mecha", method))
        if peer and tool not in ("mecha", "ours_dict"):   # the in-memory merge writes no file: not like for like
            ratio = f"{statistics.median([r[0] for r in peer]) / med:.1f}x"
        print(f"| {method} | {tool} | {med:.1f} ({min(walls):.1f}–{max(walls):.1f}) | {max(r[1] for r in rs):.2f} | {ratio} |")


if __name__ == "__main__":
    main()
