"""Live re-merge benchmark: what one AutoMBW trial (or one slider change) costs before generation.

A "live model" is a state dict shaped like model A (float32, what a WebUI on the CPU holds with --no-half,
or --live-dtype float16), weighted sum of two full-size checkpoints from bench/make_checkpoints.py. Each
way runs in its own process under /usr/bin/time -v (peak RSS), first merges once, then does --trials
trials that each change EVERY block's alpha, timed one by one:

  ours-kept     re-merge into the live model, the inputs' merged keys kept in memory (LiveCache, budget 64 GB)
  ours-reread   re-merge into the live model, the changed tensors read again from the files (budget 0)
  dict+load     a full merge into a new state dict, then load it into the live model (bayesian-merger)
  file+load     a full merge to a .safetensors file, then load the file into the live model and delete it
                (AutoMBW V1: it writes a checkpoint per candidate and makes the WebUI load it)

    python bench/bench_live.py --data /work/bench-data [--arch sd1|sdxl] [--trials 3] [--only ours-kept ...]

Prints a markdown table: median seconds per trial, each trial's seconds, tensors written, peak RSS.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WAYS = ("ours-kept", "ours-reread", "dict+load", "file+load")
NAMES = {"sd1": "sd15", "sdxl": "sdxl"}


def child(args) -> None:
    import torch

    from lib_merge.core.files import open_model
    from lib_merge.engine.live import LiveCache
    from lib_merge.engine.merge import merge
    from lib_merge.engine.recipe import ModelRef, Recipe
    from lib_merge.engine.sinks import DictSink, FileSink, TensorSink

    a, b = (str(Path(args.data) / f"{NAMES[args.arch]}_{i}.safetensors") for i in (0, 1))
    live_dtype = getattr(torch, args.live_dtype)
    with open_model(a) as f:
        live = {k: torch.zeros(i.shape, dtype=live_dtype if i.is_float else i.dtype) for k, i in f.tensors.items()}
    n_blocks = 26 if args.arch == "sd1" else 20
    sink = TensorSink(live)
    cache = LiveCache((64 << 30) if args.way == "ours-kept" else 0)

    def recipe(trial: int) -> Recipe:
        blocks = [round(0.05 + 0.9 * ((i * 7 + trial * 3) % n_blocks) / n_blocks, 4) for i in range(n_blocks)]
        return Recipe("weighted_sum", [ModelRef("a", a), ModelRef("b", b)], params={"alpha": 0.5},
                      blocks={"alpha": blocks}, dtype="float16")

    def load(state) -> None:
        with torch.no_grad():
            for k, v in state.items():
                live[k].copy_(v)

    def trial(i: int) -> int:
        if args.way.startswith("ours"):
            return merge(recipe(i), sink, live=cache, hashes=False).rewritten
        if args.way == "dict+load":
            state = merge(recipe(i), DictSink(), hashes=False).output
            load(state)
            return len(state)
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            path = Path(d) / "candidate.safetensors"
            merge(recipe(i), FileSink(path), hashes=False)
            with open_model(path) as f:
                load({k: f.read(k) for k in f.tensors})
                return len(f.tensors)

    started = time.perf_counter()
    first = trial(0)
    setup = time.perf_counter() - started
    times, written = [], []
    for i in range(1, args.trials + 1):
        t = time.perf_counter()
        written.append(trial(i))
        times.append(time.perf_counter() - t)
    print("RESULT " + json.dumps({"setup": setup, "first": first, "times": times, "written": written,
                                  "kept_gb": cache.kept_bytes / 2**30, "note": cache.note}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with sd15_0/1 or sdxl_0/1 (bench/make_checkpoints.py)")
    ap.add_argument("--arch", default="sd1", choices=list(NAMES))
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--live-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--only", nargs="*", choices=WAYS, default=list(WAYS))
    ap.add_argument("--tmp", default=None, help="folder for file+load's candidate files (default: the system's)")
    ap.add_argument("--way", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.way:
        return child(args)
    print(f"{args.arch}, live model {args.live_dtype}, {args.trials} trials each changing every block\n")
    print("| way | median s / trial | trials (s) | first merge (s) | tensors written per trial | peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    for way in args.only:
        cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--data", args.data, "--arch", args.arch,
               "--trials", str(args.trials), "--live-dtype", args.live_dtype, "--way", way]
        if args.tmp:
            cmd += ["--tmp", args.tmp]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode or line is None:
            print(f"| {way} | failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]} | | | | |")
            continue
        r = json.loads(line[7:])
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1e6
        extra = f" (kept {r['kept_gb']:.1f} GiB)" if r["kept_gb"] else ""
        print(f"| {way}{extra} | {statistics.median(r['times']):.2f} | {', '.join(f'{t:.2f}' for t in r['times'])} "
              f"| {r['setup']:.2f} | {r['written'][-1]} | {rss:.2f} |")


if __name__ == "__main__":
    main()
