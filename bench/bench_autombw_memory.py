"""AutoMBW memory over a run: RSS after trial 5 and after the last trial (standalone host, the runnable demo
models or two checkpoints given with --models, a cheap plug-in scorer, generation every trial). Target: the last
within 5 % of trial 5's.

    .venv/bin/python bench/bench_autombw_memory.py --trials 50
    .venv/bin/python bench/bench_autombw_memory.py --trials 20 --models /work/bench-data/sd15_0.safetensors /work/bench-data/sd15_1.safetensors
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--models", nargs=2, metavar="CHECKPOINT", help="two checkpoints of one family (default: "
                    "two runnable demo models written to a temporary folder)")
    args = ap.parse_args()
    import torch

    from lib_merge.core.files import save_state_dict
    from lib_merge.host.standalone import StandaloneHost
    from lib_merge.optimize.jobs import execute
    from lib_merge.optimize.runner import start_run
    from lib_merge.preview.tiny import make_runnable_state_dict
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="autombw-mem-"))
    if args.models:
        models_dir, models = Path(args.models[0]).parent, [str(Path(m).resolve()) for m in args.models]
    else:
        models_dir, models = work / "models", ["r1.safetensors", "r2.safetensors"]
        models_dir.mkdir()
        for i in (1, 2):
            save_state_dict(make_runnable_state_dict("sd1", seed=i), models_dir / models[i - 1])
    (work / "sc.py").write_text("def s(images, payloads, params):\n"
                                "    return [-sum((v - 0.4) ** 2 for v in params.values())] * len(images)\n")
    host = StandaloneHost(models_dir, work / "out")
    cfg = {"name": "mem", "models": models, "space": {"alpha": "all"},
           "optimizer": {"name": "bayes", "seed": 0}, "budget": {"trials": args.trials},
           "payloads": [{"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1}],
           "scorer": "python:sc:s"}
    log = start_run(cfg, host, root=work / "runs", base_dir=work)
    rss: dict[int, float] = {}

    def echo(line: str) -> None:
        if line.startswith("trial "):
            rss[int(line.split()[1].rstrip(":"))] = rss_mb()

    execute(log, host=host, echo=echo)
    last = max(rss)
    print(f"models: {', '.join(models)}; run folder: {log.folder}")
    print(f"| trials | RSS after trial 5 (MB) | after trial {last} (MB) | change |")
    print("|---|---|---|---|")
    print(f"| {args.trials} | {rss[5]:.0f} | {rss[last]:.0f} | {(rss[last] / rss[5] - 1) * 100:+.1f} % |")
    print("RSS by trial:", ", ".join(f"{k}:{v:.0f}" for k, v in sorted(rss.items()) if k % 5 == 0))


if __name__ == "__main__":
    main()
