"""Live re-merge benchmark: merging into a loaded model again after a slider change.

A "live model" here is a float32 state dict (what a WebUI on the CPU holds with --no-half) of a full-size
SD1.5. In one process, timed with time.perf_counter:

  (a) the first merge into the live model (weighted sum; the terms are kept, LiveCache),
  (b) a re-merge after changing ONE block's α (only that block's tensors are rewritten),
  (c) a re-merge after changing EVERY block's α (every merged tensor is finished again, nothing read),
  (d) what SuperMerger-style tools do for the same change: a full merge into a new state dict, then
      load_state_dict-style copying of every tensor into the live model.

    python bench/bench_live.py --data /work/bench-data [--device cpu|cuda] [--budget-gb 12]

Prints a markdown table. Peak RSS of the whole run: wrap it in /usr/bin/time -v.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_merge.core.files import open_model  # noqa: E402
from lib_merge.core.weights import preset  # noqa: E402
from lib_merge.engine.live import LiveCache
from lib_merge.engine.merge import merge  # noqa: E402
from lib_merge.engine.recipe import ModelRef, Recipe  # noqa: E402
from lib_merge.engine.sinks import DictSink, TensorSink


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with sd15_0 and sd15_1 (bench/make_checkpoints.py)")
    ap.add_argument("--device", default="cpu", help="where the live model and the kept terms live")
    ap.add_argument("--budget-gb", type=float, default=12.0, help="LiveCache budget for the kept terms")
    args = ap.parse_args()
    a, b = (str(Path(args.data) / f"sd15_{i}.safetensors") for i in (0, 1))
    device = torch.device(args.device)

    with open_model(a) as f:  # the live model: float32 tensors shaped like A's
        live = {k: torch.zeros(i.shape, dtype=torch.float32 if i.is_float else i.dtype, device=device)
                for k, i in f.tensors.items()}
    sink = TensorSink(live)
    cache = LiveCache(int(args.budget_gb * 2**30))
    models = [ModelRef("sd15_0", a), ModelRef("sd15_1", b)]

    def run(blocks, label, **kw):
        recipe = Recipe("weighted_sum", [ModelRef(m.name, m.path) for m in models], params={"alpha": 0.5},
                        blocks={"alpha": blocks}, dtype="float16")
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = merge(recipe, kw.pop("sink", sink), device=args.device, live=kw.pop("live", cache), **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return label, time.perf_counter() - t, result

    base = preset("FLAT_50", "sd1")
    one = list(base)
    one[5] = 0.9                       # IN04 only (a resnet and a transformer block)
    every = [min(1.0, v + 0.1) for v in base]
    rows = [run(base, "(a) first merge into the live model")]
    rows.append(run(one, "(b) re-merge after changing one block (IN04)"))
    rows.append(run(every, "(c) re-merge after changing every block"))

    t = time.perf_counter()
    full = merge(Recipe("weighted_sum", [ModelRef(m.name, m.path) for m in models], params={"alpha": 0.5},
                        blocks={"alpha": base}, dtype="float16"), DictSink(), device=args.device).output
    with torch.no_grad():
        for k, v in full.items():
            live[k].copy_(v)
    rows.append(("(d) full merge to a state dict + load into the live model", time.perf_counter() - t, None))

    print(f"\nlive model: {sum(v.numel() for v in live.values()) / 1e9:.2f} G parameters in float32 on {device}; "
          f"kept terms: {sum(t.numel() * t.element_size() for ts in cache.terms.values() for t in ts) / 2**30:.1f} GiB"
          f"{'; ' + cache.note if cache.note else ''}\n")
    print("| step | seconds | tensors written |")
    print("|---|---|---|")
    for label, seconds, result in rows:
        written = result.rewritten if result is not None else len(full)
        print(f"| {label} | {seconds:.2f} | {written} |")


if __name__ == "__main__":
    main()
