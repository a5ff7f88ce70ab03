"""Benchmark: LoRA extract and SVD merge, ours vs the plain kohya-style algorithm (bench/peers/plain_svd.py).

    .venv/bin/python bench/bench_lora.py --data /work/bench-data --repeat 3
    .venv/bin/python bench/bench_lora.py --data /work/bench-data --arch sdxl --repeat 2

(a) extract a rank-64 LoRA from sd15_1 (tuned) − sd15_0 (base) (--arch sdxl: sdxl_1 − sdxl_0):
    `python -m lib_merge lora extract` vs `bench/peers/plain_svd.py extract`;
(b) SVD-merge 4 rank-32 LoRAs (extracted once with ours from sd15_1/2/3 − sd15_0 and, for the fourth,
    sd15_1 − sd15_2; reused on later runs) to rank 64 with mode add: `lora merge-svd` vs the peer.
    SD1 only (SDXL would need four SDXL checkpoints; --steps extract is the SDXL default).
Each command is timed whole under /usr/bin/time -v (bench/common.timed). --repeat N runs N rounds; in each
round every step runs every tool once, interleaved (extract: ours, plain, ours-full; merge-svd: the same), so
a slow stretch of the shared machine hits all tools alike. Reported per tool: the median wall time and the
largest peak RSS over the rounds, and every round's raw numbers (with the 1-minute load average at its start).
Before the peer's extract its peak RSS is estimated from the checkpoint headers; above --peer-max-gb it is
not run (it would be killed for memory on a small machine) and the estimate is reported instead.
Then the accuracy of every result against the exact truncated SVD of the true ΔW on a few modules:
  rel. error  = ‖R − T_k‖_F / ‖T_k‖_F   (R: the result's ΔW, T_k: exact rank-k truncation of ΔW, unclamped)
  residual    = ‖ΔW − R‖_F / ‖ΔW − T_k‖_F (1.000 = as good as the best rank-k approximation)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, _clean_stderr, timed  # noqa: E402

PY = sys.executable
# ours = the CLI (randomized SVD where it is cheaper: svd.choose_method); ours-full = the same library call
# with method="full" (LAPACK SVD, as the peer) — the CLI has no flag for it, so it runs through `python -c`
TOOLS = ("ours", "plain", "ours-full")
_FULL_EXTRACT = ("import sys; from lib_merge.lora.extract import extract; "
                 "extract(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), method='full', overwrite=True)")
_FULL_MERGE = ("import sys; from lib_merge.lora.svd import merge_svd; "
               "merge_svd(sys.argv[3:], sys.argv[1], mode='add', rank=int(sys.argv[2]), method='full', overwrite=True)")
# modules checked for accuracy: a few of the largest and some small ones (kohya names)
CHECK = {"sd1": ["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",     # 10240 x 1280
                 "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2",        # 1280 x 5120
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",    # 320 x 768
                 "lora_unet_up_blocks_3_attentions_2_proj_out",                             # 320 x 320 (1x1)
                 "lora_te_text_model_encoder_layers_11_mlp_fc1"],                           # 3072 x 768
         # SDXL: three (each module costs a float64 SVD): the largest, a cross-attention key, and a q slice
         # of clip_g's fused in_proj_weight (row slicing)
         "sdxl": ["lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",            # 10240 x 1280
                  "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",             # 640 x 2048
                  "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]}                 # 1280 x 1280
PREFIX = {"sd1": "sd15", "sdxl": "sdxl"}
SD1_PLAIN_EXTRACT_PEAK_GB = 4.78   # the peer's measured peak RSS on SD1.5 (docs/BENCHMARKS.md), for scaling


def _delta_of(lf, name):
    return lf.delta(name).double() if name in lf.modules else None


def _metrics(dw: torch.Tensor, results: dict[str, torch.Tensor], k: int) -> dict[str, tuple[float, float]]:
    mat = dw.reshape(dw.shape[0], -1).double()
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    T = (U[:, :k] * S[:k]) @ Vh[:k]
    best = float((mat - T).norm())
    out = {}
    for tool, r in results.items():
        R = r.reshape(r.shape[0], -1).double()
        out[tool] = (float((R - T).norm() / T.norm()), float((mat - R).norm()) / best if best else float("nan"))
    return out


def accuracy_extract(base, tuned, outs: dict[str, Path], k: int, family: str = "sd1"):
    from lib_merge.core.files import open_model
    from lib_merge.lora import keys as K, open_lora
    from lib_merge.lora.extract import _rows
    rows = []
    files = {t: open_lora(p) for t, p in outs.items()}
    with open_model(base) as b, open_model(tuned) as t:
        for name in CHECK[family]:
            if not all(name in lf.modules for lf in files.values()):
                continue
            tgt = K.module_map(family)[name]
            sl = _rows(tgt, b.tensors[tgt.key].shape)    # the fused q/k/v slice, scaled for tiny test models
            dw = t.read(tgt.key, sl).double() - b.read(tgt.key, sl).double()
            rows.append((name, tuple(dw.shape), _metrics(dw, {n: lf.delta(name) for n, lf in files.items()}, k)))
    for lf in files.values():
        lf.close()
    return rows


def accuracy_merge(loras: list[Path], outs: dict[str, Path], k: int):
    from lib_merge.lora import open_lora
    ins = [open_lora(p) for p in loras]
    files = {t: open_lora(p) for t, p in outs.items()}
    rows = []
    for name in CHECK["sd1"]:
        if not all(name in lf.modules for lf in files.values()):
            continue
        dw = sum(lf.delta(name).double() for lf in ins if name in lf.modules)
        rows.append((name, tuple(dw.shape), _metrics(dw, {n: lf.delta(name) for n, lf in files.items()}, k)))
    for lf in ins + list(files.values()):
        lf.close()
    return rows


def _needed_params(family: str, shapes: dict) -> int:
    """Parameters of the tensors the peer loads for an extract (both models hold this many, in float32)."""
    from lib_merge.lora.extract import plan_modules
    needed = {t.key for _, t in plan_modules(family, shapes.keys(), conv=False)}
    n = 0
    for k in needed:
        c = 1
        for d in shapes[k]:
            c *= d
        n += c
    return n


def estimate_plain_extract_gb(family: str, base: Path) -> dict:
    """The peer's peak RSS for an extract, from the checkpoint's header: `floor` = both models' needed tensors
    in float32 (what plain_svd.py holds at once, before any SVD); `scaled` = the SD1.5 measurement scaled by
    the needed-parameter count (adds what else it had resident: the float16 pages read, torch, the SVD)."""
    from safetensors import safe_open

    from lib_merge.core.keysets import checkpoint_keys
    with safe_open(str(base), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    n = _needed_params(family, shapes)
    n_sd1 = _needed_params("sd1", {k.key: tuple(k.shape) for k in checkpoint_keys("sd1")})
    return {"needed_params": n, "floor_gb": 8 * n / 1e9,
            "scaled_gb": SD1_PLAIN_EXTRACT_PEAK_GB * n / n_sd1, "sd1_needed_params": n_sd1}


def timed_cpu(cmd: list[str]) -> tuple[float, float, float]:
    """bench.common.timed plus the CPU time (user + system seconds) of the command: (wall s, peak RSS GB, CPU s).
    On a shared machine the CPU time moves less than the wall time when other jobs take the cores."""
    import re
    import subprocess
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, cwd=ROOT)
    err = p.stderr
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{_clean_stderr(err)[-3000:]}")
    parts = [float(x) for x in re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", err)
             .group(1).split(":")]
    wall = parts[-1] + 60 * parts[-2] + (3600 * parts[-3] if len(parts) > 2 else 0)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) * 1024 / 1e9
    cpu = sum(float(re.search(rf"{w} time \(seconds\): (\S+)", err).group(1)) for w in ("User", "System"))
    return wall, rss, cpu


def _load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/bench-data"))
    ap.add_argument("--arch", choices=sorted(PREFIX), default="sd1",
                    help="sd1: sd15_N.safetensors; sdxl: sdxl_N.safetensors (bench/make_checkpoints.py --arch)")
    ap.add_argument("--work", type=Path, default=None, help="where LoRAs are written (default DATA/lora)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--merge-input-rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="rounds; each round runs the tools interleaved")
    ap.add_argument("--steps", nargs="+", choices=("extract", "merge-svd"), default=None,
                    help="default: both for sd1, extract for sdxl")
    ap.add_argument("--peer-max-gb", type=float, default=20.0,
                    help="do not run the peer's extract when its estimated peak RSS is above this")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--only", nargs="+", choices=TOOLS, default=list(TOOLS),
                    help="run only these tools (accuracy covers every result file present)")
    args = ap.parse_args(argv)
    d = args.data
    fam = args.arch
    pre = PREFIX[fam]
    steps = args.steps or (["extract", "merge-svd"] if fam == "sd1" else ["extract"])
    if fam != "sd1" and "merge-svd" in steps:
        ap.error("merge-svd is set up for sd1 only")
    work = args.work or d / "lora"
    work.mkdir(parents=True, exist_ok=True)
    base, tuned = d / f"{pre}_0.safetensors", d / f"{pre}_1.safetensors"
    tag = "" if fam == "sd1" else f"{fam}_"
    results: dict = {"arch": fam, "repeat": args.repeat, "cpus": os.cpu_count(), "runs": [], "not_run": {},
                     "summary": {}, "accuracy": {}}
    cmds: dict[str, dict[str, list[str]]] = {}

    # (a) extract
    ext = {t: work / f"extract_{tag}{t.replace('-', '_')}.safetensors" for t in TOOLS}
    if "extract" in steps:
        cmds["extract"] = {
            "ours": [PY, "-m", "lib_merge", "lora", "extract", "--base", str(base), "--tuned", str(tuned),
                     "--rank", str(args.rank), "-o", str(ext["ours"]), "--overwrite"],
            "plain": [PY, "bench/peers/plain_svd.py", "extract", "--base", str(base), "--tuned", str(tuned),
                      "--rank", str(args.rank), "-o", str(ext["plain"]), "--family", fam],
            "ours-full": [PY, "-c", _FULL_EXTRACT, str(base), str(tuned), str(ext["ours-full"]), str(args.rank)]}
        if "plain" in args.only:
            est = estimate_plain_extract_gb(fam, base)
            results["plain_extract_estimate"] = est
            print(f"plain extract, estimated peak RSS: at least {est['floor_gb']:.1f} GB (float32 tensors held), "
                  f"~{est['scaled_gb']:.1f} GB scaling SD1.5's {SD1_PLAIN_EXTRACT_PEAK_GB} GB by "
                  f"{est['needed_params'] / 1e6:.0f}M / {est['sd1_needed_params'] / 1e6:.0f}M parameters", flush=True)
            if est["scaled_gb"] > args.peer_max_gb:
                results["not_run"]["extract/plain"] = (
                    f"not run: needs ~{est['scaled_gb']:.0f} GB peak RSS (at least {est['floor_gb']:.1f} GB), "
                    f"above --peer-max-gb {args.peer_max_gb:g}")
                print(results["not_run"]["extract/plain"], flush=True)
                del cmds["extract"]["plain"]

    # (b) SVD merge; its inputs: 4 rank-32 LoRAs, extracted once with ours
    mrg = {t: work / f"merge_{t.replace('-', '_')}.safetensors" for t in TOOLS}
    loras = []
    if "merge-svd" in steps:
        pairs = [("sd15_1", "sd15_0"), ("sd15_2", "sd15_0"), ("sd15_3", "sd15_0"), ("sd15_1", "sd15_2")]
        for t, b in pairs:
            p = work / f"r{args.merge_input_rank}_{t}-{b}.safetensors"
            if not p.exists():
                w, rss = timed([PY, "-m", "lib_merge", "lora", "extract", "--base", str(d / f"{b}.safetensors"),
                                "--tuned", str(d / f"{t}.safetensors"), "--rank", str(args.merge_input_rank),
                                "-o", str(p)])
                print(f"made {p.name}: {w:.1f} s, {rss:.2f} GB", flush=True)
            loras.append(p)
        specs = [f"{p}:1" for p in loras]
        cmds["merge-svd"] = {
            "ours": [PY, "-m", "lib_merge", "lora", "merge-svd", "--mode", "add",
                     *sum((["--lora", s] for s in specs), []), "--rank", str(args.rank), "-o", str(mrg["ours"]),
                     "--overwrite"],
            "plain": [PY, "bench/peers/plain_svd.py", "merge-svd", "--mode", "add",
                      *sum((["--lora", s] for s in specs), []), "--rank", str(args.rank), "-o", str(mrg["plain"])],
            "ours-full": [PY, "-c", _FULL_MERGE, str(mrg["ours-full"]), str(args.rank), *map(str, loras)]}

    # the rounds: each runs every step's tools once, in TOOLS order
    for rnd in range(1, args.repeat + 1):
        for step, by_tool in cmds.items():
            for tool, cmd in by_tool.items():
                if tool not in args.only:
                    continue
                load = _load1()
                w, rss, cpu = timed_cpu(cmd)
                results["runs"].append({"round": rnd, "step": step, "tool": tool, "wall_s": w, "peak_rss_gb": rss,
                                        "cpu_s": cpu, "load1_at_start": load})
                print(f"round {rnd}  {step:9s} {tool:9s} {w:7.1f} s  {rss:5.2f} GB  cpu {cpu:7.1f} s  "
                      f"(load {load:.2f})", flush=True)

    for step in cmds:
        for tool in TOOLS:
            runs = [r for r in results["runs"] if r["step"] == step and r["tool"] == tool]
            if runs:
                results["summary"][f"{step}/{tool}"] = {
                    "median_wall_s": statistics.median(r["wall_s"] for r in runs),
                    "max_peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
                    "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
                    "wall_s": [r["wall_s"] for r in runs], "peak_rss_gb": [r["peak_rss_gb"] for r in runs],
                    "cpu_s": [r["cpu_s"] for r in runs], "load1": [r["load1_at_start"] for r in runs]}

    # accuracy
    if not args.no_accuracy:
        if "extract" in steps:
            results["accuracy"]["extract"] = accuracy_extract(
                base, tuned, {t: p for t, p in ext.items() if p.exists() and (t in args.only)}, args.rank, fam)
        if "merge-svd" in steps:
            results["accuracy"]["merge-svd"] = accuracy_merge(
                loras, {t: p for t, p in mrg.items() if p.exists() and (t in args.only)}, args.rank)

    print(f"\n{fam}, {args.repeat} round(s), {os.cpu_count()} CPUs")
    print("\n| step | tool | median wall s | wall s per round | max peak RSS GB | peak RSS GB per round "
          "| median CPU s | CPU s per round | load at start |\n|---|---|---|---|---|---|---|---|---|")
    for key, sm in results["summary"].items():
        step, tool = key.split("/")
        print(f"| {step} | {tool} | {sm['median_wall_s']:.1f} | {', '.join(f'{w:.1f}' for w in sm['wall_s'])} "
              f"| {sm['max_peak_rss_gb']:.2f} | {', '.join(f'{r:.2f}' for r in sm['peak_rss_gb'])} "
              f"| {sm['median_cpu_s']:.1f} | {', '.join(f'{c:.1f}' for c in sm['cpu_s'])} "
              f"| {', '.join(f'{x:.1f}' for x in sm['load1'])} |")
    for key, why in results["not_run"].items():
        step, tool = key.split("/")
        print(f"| {step} | {tool} | {why} | | | | | | |")
    print("\n| step | module (ΔW shape) | tool | rel. error vs T_k | residual / best |\n|---|---|---|---|---|")
    for step, rows in results["accuracy"].items():
        for name, shape, m in rows:
            for tool, (rel, res) in m.items():
                print(f"| {step} | `{name}` {list(shape)} | {tool} | {rel:.4f} | {res:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
