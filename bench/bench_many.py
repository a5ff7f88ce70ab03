"""Many-model benchmark: TIES, TSD, TGMD, Model Stock, soups and geometric median on "3 fine-tunes + base".

Each command runs as its own process under `/usr/bin/time -v` (wall time and peak RSS of the whole
command, process start included), the tools interleaved so machine noise hits both alike:

- ours:  `python -m lib_merge merge --method M ... --merge-vae --dtype float16` to a file;
- mecha: sd-mecha 1.1.8 (`bench/peers/mecha_merge.py M ...`, run with its own venv).

On the same four full-size files: sd15_0 is the base, sd15_1..3 the fine-tunes.

| method           | ours                                                | sd-mecha (bench/peers/mecha_merge.py)       |
|------------------|-----------------------------------------------------|---------------------------------------------|
| ties             | ties, base 0, models 1-3, density=0.2, election=sum | ties BASE M1 M2 M3 --k 0.2 (vote_sgn=True)  |
| ties_soup        | ties_soup, base 0, models 1-3                       | ties_soup (ties_sum k=1, vote_sgn=True)     |
| tsd              | tsd, base 0, models 1-3, drop=0.1                   | tsd --probability 0.1 (add_ties_with_dare)  |
| tgmd             | tgmd, base 0, models 1-3, drop=0.1                  | tgmd --probability 0.1 (apply_median=True)  |
| model_stock      | model_stock, base 0, models 1-3                     | model_stock (n_model_stock)                 |
| uniform_soup     | uniform_soup, models 0-3                            | uniform_soup (n_average of all four)        |
| geometric_median | geometric_median, models 0-3                        | geometric_median (all four)                 |

`--merge-vae` is passed to ours because sd-mecha merges every key, the VAE included (ours keeps the first
model's VAE by default). Both compute in float32 and write float16; both use their default thread
counts (ours: one worker per core, at most 8; sd-mecha: min(max(#files, 2), #cores, 4)).
The two differ in details that do not change the amount of work: see bench/peers/mecha_merge.py.

Usage:
    python bench/make_checkpoints.py --out /work/bench-data --count 4
    python bench/bench_many.py --data /work/bench-data --mecha-python /work/mecha-venv/bin/python --repeat 3
    python bench/bench_many.py --data /work/bench-data --only ours ties tsd --repeat 1     # a subset
    python bench/bench_many.py --scaling --data /work/bench-data --scale 4 --counts 2 4 8 16

--scaling: memory and time of OUR uniform_soup and ties (density 0.2) against the number of models N,
on synthetic SD1.5-keyed models with every large dimension divided by --scale (bench/make_synthetic.py;
scale 4 = 134 MB a file, N + 1 files: sd15_0 is the base of ties, sd15_1..N the models of both).
The synthetic files are kept for the next run (DATA/synthetic_scale{S} by default; --clean-synthetic
deletes them at the end). --scaling-mecha runs sd-mecha's n_average and ties there too.

Outputs go to a scratch folder (--out, default DATA/bench_many_scratch), deleted before every run
and at the end. `--only` takes tool names (ours, mecha) and/or method names; each filters its kind.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import timed  # noqa: E402

TOOLS = ("ours", "mecha")
METHODS = ("ties", "ties_soup", "tsd", "tgmd", "model_stock", "uniform_soup", "geometric_median")
SCALING_METHODS = ("uniform_soup", "ties")

# method -> (uses a base, our extra args, sd-mecha's extra args)
SPECS: dict[str, tuple[bool, list[str], list[str]]] = {
    "ties": (True, ["--param", "density=0.2", "--param", "election=sum"], ["--k", "0.2", "--vote-sgn", "true"]),
    "ties_soup": (True, [], []),
    "tsd": (True, ["--param", "drop=0.1"], ["--probability", "0.1"]),
    "tgmd": (True, ["--param", "drop=0.1"], ["--probability", "0.1"]),
    "model_stock": (True, [], []),
    "uniform_soup": (False, [], []),
    "geometric_median": (False, [], []),
}


def ours_cmd(method: str, base: str | None, models: list[str], out: str, extra: list[str]) -> list[str]:
    flags = (["--base", base] if base else []) + [x for m in models for x in ("--model", m)]
    return [sys.executable, "-m", "lib_merge", "merge", "--method", method, *flags, *extra,
            "--merge-vae", "--dtype", "float16", "--overwrite", "-o", out]


def mecha_cmd(python: str, method: str, base: str | None, models: list[str], out: str, extra: list[str]) -> list[str]:
    return [python, "bench/peers/mecha_merge.py", method, *([base] if base else []), *models, out, *extra]


def split_only(only: list[str] | None, methods: tuple[str, ...]) -> tuple[set[str], set[str]]:
    only = only or []
    unknown = [x for x in only if x not in TOOLS and x not in methods]
    if unknown:
        raise SystemExit(f"--only: unknown name(s) {', '.join(unknown)}; tools: {', '.join(TOOLS)}; "
                         f"methods: {', '.join(methods)}")
    tools = {x for x in only if x in TOOLS} or set(TOOLS)
    meths = {x for x in only if x in methods} or set(methods)
    return tools, meths


def remove(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


def run_jobs(jobs: dict[tuple, list[str]], repeat: int, out: str, env, cache: str, cold_hash: bool,
             label) -> dict[tuple, list[tuple[float, float]]]:
    """Run every job `repeat` times, interleaved; prints one line per run as it goes."""
    results: dict[tuple, list[tuple[float, float]]] = {k: [] for k in jobs}
    total, done, started = repeat * len(jobs), 0, time.monotonic()
    for rep in range(repeat):
        for key, cmd in jobs.items():
            if key[0] == "ours" and cold_hash:
                shutil.rmtree(cache, ignore_errors=True)
            remove(out)
            print(f"[{done + 1}/{total}] {label(key)} ...", end="", flush=True)
            try:
                wall, rss = timed(cmd, env)
            finally:
                remove(out)
            results[key].append((wall, rss))
            done += 1
            print(f" {wall:7.2f} s  {rss:5.2f} GB   (round {rep + 1}/{repeat}, {time.monotonic() - started:.0f} s so far)",
                  flush=True)
    return results


def fmt_walls(rs: list[tuple[float, float]]) -> str:
    walls = [r[0] for r in rs]
    return f"{statistics.median(walls):.1f} ({min(walls):.1f}–{max(walls):.1f})"


def data_files(data: Path, n: int) -> list[str]:
    return [str(data / f"sd15_{i}.safetensors") for i in range(n)]


def check_files(files: list[str], hint: str) -> None:
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise SystemExit(f"missing input file(s): {', '.join(missing)}\nmake them with:\n    {hint}")


def main_benchmark(args, out: str, env, cache: str) -> None:
    data = Path(args.data)
    files = data_files(data, 4)
    check_files(files, f"python bench/make_checkpoints.py --out {data} --count 4   "
                       f"(existing sd15_0..2 are kept; writes sd15_3, 2.1 GB)\n"
                       f"or, for small test files: python bench/make_synthetic.py --out {data} --count 4 --scale 16")
    base, tuned = files[0], files[1:]
    tools, methods = split_only(args.only, METHODS)
    if "mecha" in tools and not args.mecha_python:
        print("note: no --mecha-python, sd-mecha skipped", flush=True)
        tools.discard("mecha")
    jobs: dict[tuple[str, str], list[str]] = {}
    for method in METHODS:
        if method not in methods:
            continue
        uses_base, ours_extra, mecha_extra = SPECS[method]
        b, models = (base, tuned) if uses_base else (None, files)
        if "ours" in tools:
            jobs[("ours", method)] = ours_cmd(method, b, models, out, ours_extra)
        if "mecha" in tools:
            jobs[("mecha", method)] = mecha_cmd(args.mecha_python, method, b, models, out, mecha_extra)
    if not jobs:
        raise SystemExit("nothing to run")
    print(f"{len(jobs)} commands x {args.repeat} rounds; inputs: {', '.join(files)}; output: {out}", flush=True)
    for key, cmd in jobs.items():
        print(f"  {key[0]:5s} {key[1]:16s} {' '.join(cmd)}")
    results = run_jobs(jobs, args.repeat, out, env, cache, args.cold_hash,
                       lambda k: f"{k[0]:5s} {k[1]:16s}")

    print("\n| method | tool | wall s (median, min–max) | peak RSS GB (max) | speed-up vs sd-mecha | RSS vs sd-mecha |")
    print("|---|---|---|---|---|---|")
    for (tool, method), rs in results.items():
        med = statistics.median(r[0] for r in rs)
        rss = max(r[1] for r in rs)
        speed = mem = ""
        peer = results.get(("mecha", method))
        if peer and tool != "mecha":
            speed = f"{statistics.median(r[0] for r in peer) / med:.1f}x"
            mem = f"{rss / max(r[1] for r in peer):.2f}x"
        print(f"| {method} | {tool} | {fmt_walls(rs)} | {rss:.2f} | {speed} | {mem} |")


def main_scaling(args, out: str, env, cache: str) -> None:
    counts = sorted(set(args.counts))
    if counts[0] < 2:
        raise SystemExit("--counts: every N must be at least 2")
    syn = Path(args.synthetic or (Path(args.data) / f"synthetic_scale{args.scale}" if args.data
                                  else Path(tempfile.gettempdir()) / f"merge_lab_synthetic_scale{args.scale}"))
    sys.path.insert(0, str(ROOT / "bench"))
    import make_synthetic  # bench/make_synthetic.py
    n_files = counts[-1] + 1
    size = make_synthetic.file_size(args.scale)
    print(f"synthetic models: {n_files} files of {size / 1e6:.1f} MB (scale 1/{args.scale}) in {syn}", flush=True)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "bench/make_synthetic.py", "--out", str(syn), "--count", str(n_files),
                    "--scale", str(args.scale)], cwd=ROOT, check=True)
    print(f"synthetic models ready in {time.monotonic() - t0:.0f} s", flush=True)
    files = data_files(syn, n_files)
    tools, methods = split_only(args.only, SCALING_METHODS)
    tools &= {"ours"} | ({"mecha"} if args.scaling_mecha and args.mecha_python else set())
    if args.scaling_mecha and not args.mecha_python:
        print("note: --scaling-mecha without --mecha-python, sd-mecha skipped", flush=True)

    jobs: dict[tuple[str, str, int], list[str]] = {}
    for method in SCALING_METHODS:
        if method not in methods:
            continue
        uses_base, ours_extra, mecha_extra = SPECS[method]
        for n in counts:
            models = files[1:n + 1]
            b = files[0] if uses_base else None
            if "ours" in tools:
                jobs[("ours", method, n)] = ours_cmd(method, b, models, out, ours_extra)
            if "mecha" in tools:
                jobs[("mecha", method, n)] = mecha_cmd(args.mecha_python, method, b, models, out, mecha_extra)
    print(f"{len(jobs)} commands x {args.repeat} rounds; output: {out}", flush=True)
    try:
        results = run_jobs(jobs, args.repeat, out, env, cache, args.cold_hash,
                           lambda k: f"{k[0]:5s} {k[1]:13s} N={k[2]:<3d}")
    finally:
        if args.clean_synthetic:
            shutil.rmtree(syn, ignore_errors=True)

    print(f"\nScaling with the number of models N (synthetic SD1.5 keys, shapes / {args.scale}, "
          f"{size / 1e6:.3g} MB a file; ties: + 1 base, density 0.2)\n")
    print("| method | tool | N | input MB | wall s (median, min–max) | s per model | peak RSS GB (max) | RSS − RSS(N=%d) GB |"
          % counts[0])
    print("|---|---|---|---|---|---|---|---|")
    for (tool, method, n), rs in results.items():
        med = statistics.median(r[0] for r in rs)
        rss = max(r[1] for r in rs)
        first = results.get((tool, method, counts[0]))
        grow = rss - max(r[1] for r in first) if first else float("nan")
        n_in = n + (1 if SPECS[method][0] else 0)
        print(f"| {method} | {tool} | {n} | {n_in * size / 1e6:.0f} | {fmt_walls(rs)} | {med / n:.2f} | {rss:.2f} "
              f"| {grow:+.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--data", help="folder with sd15_0..3.safetensors (bench/make_checkpoints.py --count 4)")
    ap.add_argument("--mecha-python", help="python of a venv with sd-mecha 1.1.8 (peer skipped without it)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="scratch folder for the output file (default: DATA/bench_many_scratch)")
    ap.add_argument("--cold-hash", action="store_true", help="clear our hash cache before each of our runs")
    ap.add_argument("--only", nargs="*", help=f"subset: tools ({' '.join(TOOLS)}) and/or methods ({' '.join(METHODS)})")
    ap.add_argument("--scaling", action="store_true", help="our uniform_soup and ties against the number of models")
    ap.add_argument("--scale", type=int, default=4, help="--scaling: divide every dimension > 16 by this (default 4)")
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8, 16], help="--scaling: numbers of models")
    ap.add_argument("--synthetic", help="--scaling: folder for the synthetic models (default: DATA/synthetic_scale{S})")
    ap.add_argument("--clean-synthetic", action="store_true", help="--scaling: delete the synthetic models at the end")
    ap.add_argument("--scaling-mecha", action="store_true", help="--scaling: run sd-mecha too (needs --mecha-python)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if not args.scaling and not args.data:
        ap.error("--data is required (or --scaling)")

    default_out = (Path(args.data) if args.data else Path(tempfile.gettempdir())) / "bench_many_scratch"
    out_dir = Path(args.out) if args.out else default_out
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = str(out_dir / "bench_out.safetensors")
    cache = tempfile.mkdtemp(prefix="merge_lab_bench_cache_")
    env = dict(os.environ, MERGE_LAB_CACHE=cache)
    try:
        (main_scaling if args.scaling else main_benchmark)(args, out, env, cache)
    finally:
        remove(out)
        shutil.rmtree(cache, ignore_errors=True)
        if created:
            try:
                out_dir.rmdir()
            except OSError:
                pass


if __name__ == "__main__":
    main()
