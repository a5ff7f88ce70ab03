"""The plain (kohya sd-scripts style) LoRA extract and SVD merge, as a peer for bench/bench_lora.py.

What kohya's extract_lora_from_models.py / svd_merge_lora.py do, written here from their description
(docs: /work/shared/reference/lora-and-masks.md §3.4, §3.6): load the needed tensors of every input whole,
then per module a full `torch.linalg.svd` in float32, keep the top `rank` triples, `up = U·S`, `down = Vh`,
clamp both to the 0.99 quantile of their absolute values, alpha = rank, save a kohya file with
`safetensors.torch.save_file`. (full_matrices=False: the thin SVD, cheaper than kohya's default and the
same top triples, so the peer is not handicapped.)

Same I/O as ours:
    python bench/peers/plain_svd.py extract --base B --tuned T --rank 64 -o OUT [--family sdxl]
    python bench/peers/plain_svd.py merge-svd --lora F:W ... --rank 64 -o OUT

The module list (which checkpoint weight each kohya module name belongs to) is taken from lib_merge's key
map so both tools write the same modules; the algorithm itself uses nothing of ours.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CLAMP = 0.99
MIN_DIFF = 0.01     # kohya's min_diff: the text encoder is skipped when no |Δ| exceeds it


def factor(mat: torch.Tensor, rank: int):
    """kohya: full SVD, U·S and Vh truncated, clamped at the 0.99 quantile."""
    out_shape = mat.shape
    conv = mat.dim() == 4
    if conv:
        mat = mat.reshape(mat.shape[0], -1)
    rank = min(rank, mat.shape[0], mat.shape[1])
    U, S, Vh = torch.linalg.svd(mat.float(), full_matrices=False)
    U = U[:, :rank] @ torch.diag(S[:rank])
    Vh = Vh[:rank, :]
    dist = torch.cat([U.flatten(), Vh.flatten()])
    k = max(1, int(CLAMP * dist.numel()))          # torch.quantile refuses > 2^24 elements: kthvalue
    hi = dist.abs().kthvalue(k).values
    U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    if conv:
        U = U.reshape(out_shape[0], rank, 1, 1)
        Vh = Vh.reshape(rank, *out_shape[1:])
    return U.contiguous(), Vh.contiguous(), rank


def save(modules: dict, out: str, dim: int, family: str = "sd1") -> None:
    sd = {}
    for name, (up, down, r) in modules.items():
        sd[f"{name}.lora_up.weight"] = up.to(torch.float16)
        sd[f"{name}.lora_down.weight"] = down.to(torch.float16)
        sd[f"{name}.alpha"] = torch.tensor(float(r))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(float(dim)),
            "ss_v2": str(family == "sd2"),
            "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]}
    save_file(sd, out, metadata=meta)


def cmd_extract(args) -> None:
    from lib_merge.lora import keys as K
    from lib_merge.lora.extract import plan_modules
    with safe_open(args.base, "pt") as fb, safe_open(args.tuned, "pt") as ft:
        keys = set(fb.keys()) & set(ft.keys())
        plan = plan_modules(args.family, keys, conv=False)
        needed = sorted({t.key for _, t in plan})
        # kohya loads both models whole; we load every tensor a module needs, in float32 (as kohya does)
        base = {k: fb.get_tensor(k).float() for k in needed}
        tuned = {k: ft.get_tensor(k).float() for k in needed}
    te = [(n, t) for n, t in plan if K.part_of(n) != "unet"]
    te_max = max((float((tuned[t.key] - base[t.key]).abs().max()) for _, t in te), default=0.0)
    if te_max <= MIN_DIFF:
        plan = [(n, t) for n, t in plan if K.part_of(n) == "unet"]
    modules = {}
    for name, t in plan:
        d = tuned[t.key] - base[t.key]
        if t.rows is not None:
            d = d[t.rows[0]:t.rows[1]]
        up, down, r = factor(d, args.rank)
        modules[name] = (up, down, r)
    save(modules, args.output, args.rank, args.family)
    print(f"wrote {args.output} ({len(modules)} modules)")


def _delta(sd: dict, name: str) -> torch.Tensor:
    up = sd[f"{name}.lora_up.weight"].float()
    down = sd[f"{name}.lora_down.weight"].float()
    r = down.shape[0]
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else r
    if down.dim() == 2:
        return up @ down * (alpha / r)
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[0], *down.shape[1:]) * (alpha / r)


def cmd_merge_svd(args) -> None:
    loras = []
    for spec in args.lora:
        path, _, w = spec.rpartition(":") if ":" in spec else (spec, "", "1")
        loras.append((load_file(path), float(w)))
    names = sorted({k.split(".lora_down.weight")[0] for sd, _ in loras for k in sd if k.endswith(".lora_down.weight")})
    modules = {}
    for name in names:
        dw = None
        for sd, w in loras:
            if f"{name}.lora_down.weight" not in sd:
                continue
            d = _delta(sd, name) * w
            dw = d if dw is None else dw + d
        up, down, r = factor(dw, args.rank)
        modules[name] = (up, down, r)
    save(modules, args.output, args.rank)
    print(f"wrote {args.output} ({len(modules)} modules)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--base", required=True)
    e.add_argument("--tuned", required=True)
    e.add_argument("--rank", type=int, required=True)
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"],
                   help="which key map names the modules (given, not detected: the peer stays plain)")
    e.set_defaults(func=cmd_extract)
    m = sub.add_parser("merge-svd")
    m.add_argument("--lora", action="append", required=True)
    m.add_argument("--mode", default="add", choices=["add"])
    m.add_argument("--rank", type=int, required=True)
    m.add_argument("-o", "--output", required=True)
    m.set_defaults(func=cmd_merge_svd)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
