"""Our in-memory merge (DictSink) as a command, for the benchmark: what the UI's "Merge" does.

    python bench/dictsink_merge.py weighted_sum A B [--alpha 0.5]
    python bench/dictsink_merge.py add_difference A B C [--alpha 1.0]

Prints the output size so peak RSS can be compared with it (target: output size + 0.5 GB).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_merge.core.arch import COMPONENTS  # noqa: E402
from lib_merge.engine.merge import merge  # noqa: E402
from lib_merge.engine.recipe import ModelRef, Recipe  # noqa: E402
from lib_merge.engine.sinks import DictSink


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--alpha", type=float, default=0.5)
    args = ap.parse_args()
    recipe = Recipe(args.method, [ModelRef(Path(m).name, m) for m in args.models], params={"alpha": args.alpha},
                    components=list(COMPONENTS))   # every key, the VAE too, as the file benchmark and the peers
    result = merge(recipe, DictSink())
    size = sum(t.numel() * t.element_size() for t in result.output.values())
    print(f"in-memory result: {len(result.output)} tensors, {size / 1e9:.2f} GB, {result.seconds:.1f} s")


if __name__ == "__main__":
    main()
