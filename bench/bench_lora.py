"""Benchmark: LoRA extract and SVD merge, ours vs the plain kohya-style algorithm (bench/peers/plain_svd.py).

    .venv/bin/python bench/bench_lora.py --data /work/bench-data

(a) extract a rank-64 LoRA from sd15_1 (tuned) − sd15_0 (base): `python -m lib_merge lora extract` vs
    `bench/peers/plain_svd.py extract`;
(b) SVD-merge 4 rank-32 LoRAs (extracted once with ours from sd15_1/2/3 − sd15_0 and, for the fourth,
    sd15_1 − sd15_2; reused on later runs) to rank 64 with mode add: `lora merge-svd` vs the peer.
Each command is timed whole under /usr/bin/time -v (bench/common.timed), the tools interleaved in one run.
Then the accuracy of every result against the exact truncated SVD of the true ΔW on a few modules:
  rel. error  = ‖R − T_k‖_F / ‖T_k‖_F   (R: the result's ΔW, T_k: exact rank-k truncation of ΔW, unclamped)
  residual    = ‖ΔW − R‖_F / ‖ΔW − T_k‖_F (1.000 = as good as the best rank-k approximation)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import timed  # noqa: E402

PY = sys.executable
# ours = the CLI (randomized SVD where it is cheaper: svd.choose_method); ours-full = the same library call
# with method="full" (LAPACK SVD, as the peer) — the CLI has no flag for it, so it runs through `python -c`
TOOLS = ("ours", "plain", "ours-full")
_FULL_EXTRACT = ("import sys; from lib_merge.lora.extract import extract; "
                 "extract(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), method='full', overwrite=True)")
_FULL_MERGE = ("import sys; from lib_merge.lora.svd import merge_svd; "
               "merge_svd(sys.argv[3:], sys.argv[1], mode='add', rank=int(sys.argv[2]), method='full', overwrite=True)")
# modules checked for accuracy: a few of the largest and some small ones (SD1 kohya names)
CHECK = ["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",       # 10240 x 1280
         "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2",          # 1280 x 5120
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",      # 320 x 768
         "lora_unet_up_blocks_3_attentions_2_proj_out",                               # 320 x 320 (1x1)
         "lora_te_text_model_encoder_layers_11_mlp_fc1"]                              # 3072 x 768


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


def accuracy_extract(base, tuned, outs: dict[str, Path], k: int):
    from lib_merge.lora import keys as K
    from lib_merge.lora import open_lora
    from lib_merge.models import open_model
    rows = []
    files = {t: open_lora(p) for t, p in outs.items()}
    with open_model(base) as b, open_model(tuned) as t:
        for name in CHECK:
            if not all(name in lf.modules for lf in files.values()):
                continue
            tgt = K.module_map("sd1")[name]
            dw = t.read(tgt.key).double() - b.read(tgt.key).double()
            rows.append((name, tuple(dw.shape), _metrics(dw, {n: lf.delta(name) for n, lf in files.items()}, k)))
    for lf in files.values():
        lf.close()
    return rows


def accuracy_merge(loras: list[Path], outs: dict[str, Path], k: int):
    from lib_merge.lora import open_lora
    ins = [open_lora(p) for p in loras]
    files = {t: open_lora(p) for t, p in outs.items()}
    rows = []
    for name in CHECK:
        if not all(name in lf.modules for lf in files.values()):
            continue
        dw = sum(lf.delta(name).double() for lf in ins if name in lf.modules)
        rows.append((name, tuple(dw.shape), _metrics(dw, {n: lf.delta(name) for n, lf in files.items()}, k)))
    for lf in ins + list(files.values()):
        lf.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/bench-data"))
    ap.add_argument("--work", type=Path, default=None, help="where LoRAs are written (default DATA/lora)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--merge-input-rank", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--only", nargs="+", choices=TOOLS, default=list(TOOLS),
                    help="run only these tools (accuracy covers every result file present)")
    args = ap.parse_args(argv)
    d = args.data
    work = args.work or d / "lora"
    work.mkdir(parents=True, exist_ok=True)
    base, tuned = d / "sd15_0.safetensors", d / "sd15_1.safetensors"
    results: dict = {"timing": {}, "accuracy": {}}

    # inputs of (b): 4 rank-32 LoRAs, extracted once with ours
    pairs = [("sd15_1", "sd15_0"), ("sd15_2", "sd15_0"), ("sd15_3", "sd15_0"), ("sd15_1", "sd15_2")]
    loras = []
    for t, b in pairs:
        p = work / f"r{args.merge_input_rank}_{t}-{b}.safetensors"
        if not p.exists():
            w, rss = timed([PY, "-m", "lib_merge", "lora", "extract", "--base", str(d / f"{b}.safetensors"),
                            "--tuned", str(d / f"{t}.safetensors"), "--rank", str(args.merge_input_rank),
                            "-o", str(p)])
            print(f"made {p.name}: {w:.1f} s, {rss:.2f} GB", flush=True)
        loras.append(p)

    # (a) extract
    ext = {t: work / f"extract_{t.replace('-', '_')}.safetensors" for t in TOOLS}
    cmds = {"ours": [PY, "-m", "lib_merge", "lora", "extract", "--base", str(base), "--tuned", str(tuned),
                     "--rank", str(args.rank), "-o", str(ext["ours"]), "--overwrite"],
            "plain": [PY, "bench/peers/plain_svd.py", "extract", "--base", str(base), "--tuned", str(tuned),
                      "--rank", str(args.rank), "-o", str(ext["plain"])],
            "ours-full": [PY, "-c", _FULL_EXTRACT, str(base), str(tuned), str(ext["ours-full"]), str(args.rank)]}
    for tool, cmd in cmds.items():
        if tool not in args.only:
            continue
        w, rss = timed(cmd)
        results["timing"][f"extract/{tool}"] = (w, rss)
        print(f"extract  {tool:6s} {w:7.1f} s  {rss:5.2f} GB", flush=True)

    # (b) SVD merge
    mrg = {t: work / f"merge_{t.replace('-', '_')}.safetensors" for t in TOOLS}
    specs = [f"{p}:1" for p in loras]
    cmds = {"ours": [PY, "-m", "lib_merge", "lora", "merge-svd", "--mode", "add", *sum((["--lora", s] for s in specs), []),
                     "--rank", str(args.rank), "-o", str(mrg["ours"]), "--overwrite"],
            "plain": [PY, "bench/peers/plain_svd.py", "merge-svd", "--mode", "add",
                      *sum((["--lora", s] for s in specs), []), "--rank", str(args.rank), "-o", str(mrg["plain"])],
            "ours-full": [PY, "-c", _FULL_MERGE, str(mrg["ours-full"]), str(args.rank), *map(str, loras)]}
    for tool, cmd in cmds.items():
        if tool not in args.only:
            continue
        w, rss = timed(cmd)
        results["timing"][f"merge-svd/{tool}"] = (w, rss)
        print(f"merge    {tool:6s} {w:7.1f} s  {rss:5.2f} GB", flush=True)

    # accuracy
    results["accuracy"]["extract"] = accuracy_extract(base, tuned, {t: p for t, p in ext.items() if p.exists()},
                                                      args.rank)
    results["accuracy"]["merge-svd"] = accuracy_merge(loras, {t: p for t, p in mrg.items() if p.exists()}, args.rank)

    print("\n| step | tool | wall s | peak RSS GB |\n|---|---|---|---|")
    for key, (w, rss) in results["timing"].items():
        step, tool = key.split("/")
        print(f"| {step} | {tool} | {w:.1f} | {rss:.2f} |")
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
