"""What `--help` shows on every command: a description (its one-line help when it has no other), the defaults
of its options, and examples. One place, applied to the whole parser tree by make_parser."""
from __future__ import annotations

import argparse

P = "merge-lab"   # the console script; `python -m lib_merge` is the same
EXAMPLES = {
    "merge": [f"{P} merge --method weighted_sum --model A.safetensors --model B.safetensors --alpha 0.3 -o AB.safetensors",
              f"{P} merge --method add_difference --model A --model B --model C --alpha 1 -o out.safetensors",
              f'{P} merge --method weighted_sum --model A --model B --blocks "IN*=0.3,M00=1,OUT*=0.7" -o out.safetensors',
              f"{P} merge --method ties --base sd15.safetensors --model m1 --model m2 --model m3 -o ties.safetensors",
              f"{P} merge --recipe AB.safetensors --models-dir models/ --dtype float32 -o again.safetensors",
              f'{P} merge --method weighted_sum --model A --model B --alpha 0.5 --elemental "OUT05:attn2:0.2" '
              f'--adjust "2,0,0,1" -o touched.safetensors'],
    "info": [f"{P} info merged.safetensors", f"{P} info merged.safetensors --json --no-hash > info.json"],
    "methods": [f"{P} methods", f"{P} methods --json"],
    "presets": [f"{P} presets --family sdxl"],
    "demo": [f"{P} demo --dir merge-lab-demo"],
    "ui": [f"{P} ui --models-dir models --output-dir outputs", f"{P} ui --port 7861 --cache-mb 8192"],
    "mask simple": [f"{P} mask simple --model A.safetensors --mode random --probability 0.3 -o rand30.safetensors"],
    "mask magnitude": [f"{P} mask magnitude --model A.safetensors --base sd15.safetensors --select below "
                       f"--threshold 0.9 -o protect.safetensors"],
    "mask quad": [f"{P} mask quad --model A.safetensors --seed 1 -o quad"],
    "mask op": [f"{P} mask op union rand30.safetensors protect.safetensors -o both.safetensors"],
    "mask edit": [f'{P} mask edit both.safetensors --layers "input_blocks.1, *.attn2.*" --op false -o edited.safetensors'],
    "weights blocks": [f'{P} weights blocks --model A.safetensors --blocks "GRAD_V, BASE=0" -o v.json'],
    "weights groups": [f"{P} weights groups --model A.safetensors --input-blocks 0.3 --middle-block 1 "
                       f"--output-blocks 0.7 --te 0 -o g.json"],
    "weights attention": [f"{P} weights attention --model A.safetensors --attn 1 --ff 0.5 -o attn.json"],
    "weights shell": [f"{P} weights shell --model A.safetensors --exterior 0.2 --interior 0.5 --core 0.9 -o onion.json"],
    "weights edit": [f'{P} weights edit onion.json --layers "middle_block" --op multiply --value 0.5 -o onion2.json'],
    "weights op": [f"{P} weights op onion2.json attn.json --op min --join inner -o mix.json"],
    "normalize": [f"{P} normalize --model A.safetensors --model B.safetensors --mode attn_only -o normalized.safetensors"],
    "noise": [f'{P} noise --model A.safetensors --layers "*.to_v*" --ratio 0.98 --seed 3 -o noisy.safetensors'],
    "report mask": [f"{P} report mask protect.safetensors --png protect.png"],
    "report weights": [f"{P} report weights g.json --summary"],
    "report layer": [f"{P} report layer A.safetensors --key model.diffusion_model.out.2.weight --png out2.png"],
    "lora info": [f"{P} lora info style.safetensors", f"{P} lora info style.safetensors --json"],
    "lora merge": [f"{P} lora merge --lora a.safetensors:0.7 --lora b.safetensors:0.5 -o ab.safetensors",
                   f"{P} lora merge --mode ties --density 0.2 --election sum --lora a.safetensors --lora b.safetensors "
                   f"-o ab_ties.safetensors"],
    "lora bake": [f"{P} lora bake --model sd15.safetensors --lora style.safetensors:0.8 --lbw OUTALL -o baked.safetensors"],
    "lora extract": [f"{P} lora extract --base sd15.safetensors --tuned tuned.safetensors --rank 64 -o extracted.safetensors"],
    "lora resize": [f"{P} lora resize big.safetensors --rank 16 -o small.safetensors",
                    f"{P} lora resize big.safetensors --dynamic sv_fro:0.9 --max-rank 64 -o small.safetensors"],
    "lora merge-svd": [f"{P} lora merge-svd --lora a.safetensors:0.8 --lora b.safetensors:0.5:0 --rank 32 -o ab.safetensors"],
    "lora report": [f"{P} lora report style.safetensors --png style.png"],
    "optimize run": [f"{P} optimize run run.yaml --models-dir models",
                     f"{P} optimize run run.yaml --models-dir models --workers 2"],
    "optimize resume": [f"{P} optimize resume outputs/autombw/20261202-101500-mine"],
    "optimize report": [f"{P} optimize report outputs/autombw/20261202-101500-mine"],
    "optimize list": [f"{P} optimize list --root outputs/autombw"],
}


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' lines; adds an option's default where its help does not say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        said = "default" in text.lower() or f"({default})" in text or f"({default};" in text
        unset = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if action.option_strings and not unset and not said:
            text += " (default: %(default)s)"
        return text


def finish(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Description, examples and the formatter on `parser` and every subcommand below it."""
    parser.formatter_class = Formatter
    examples = EXAMPLES.get(" ".join(path))
    if examples:
        parser.epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, sub in action.choices.items():
            if not sub.description:
                sub.description = helps.get(name)
            finish(sub, path + (name,))
