"""One spelling for one thing on every surface: output dtypes and the TIES sign election, with the old
spellings accepted as aliases (documented in README.md and docs/LORA.md)."""
from __future__ import annotations

import json

import pytest
import torch

from lib_merge.cli import make_parser
from lib_merge.core.errors import InputError
from lib_merge.core.files import output_dtype
from lib_merge.lora.merge import RECIPE_KEY, combine, recipe_metadata
from lib_merge.methods.common import election_name


def test_output_dtype_names_and_aliases():
    assert [output_dtype(n) for n in ("float16", "fp16", "half", "BF16", "bfloat16", "fp32", "float")] == [
        "float16", "float16", "float16", "bfloat16", "bfloat16", "float32", "float32"]
    with pytest.raises(InputError, match=r"Unknown output dtype 'float64'. Use float16, bfloat16, float32"):
        output_dtype("float64")


@pytest.mark.parametrize("argv", [
    ["lora", "extract", "--base", "a", "--tuned", "b", "--rank", "4", "-o", "x"],
    ["lora", "resize", "f", "--rank", "4", "-o", "x"],
    ["lora", "merge-svd", "--lora", "a", "--rank", "4", "-o", "x"],
    ["lora", "merge", "--lora", "a", "-o", "x"],
    ["lora", "bake", "--model", "m", "--lora", "a", "-o", "x"],
    ["merge", "--method", "weighted_sum", "--model", "a", "--model", "b", "-o", "x"],
])
def test_every_command_takes_the_same_dtype_spellings(argv, capsys):
    parser = make_parser()
    assert parser.parse_args(argv + ["--dtype", "bfloat16"]).dtype == "bfloat16"
    assert parser.parse_args(argv + ["--dtype", "fp32"]).dtype == "float32"   # the old spelling
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv + ["--dtype", "int8"])
    assert e.value.code == 2 and "Unknown output dtype 'int8'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["lora", "merge", "--lora", "a", "-o", "x"],
                                     ["lora", "merge-svd", "--lora", "a", "--rank", "4", "-o", "x"]])
def test_lora_election_is_spelled_as_for_checkpoints(command, capsys):
    parser = make_parser()
    assert parser.parse_args(command).election == "sum"
    assert parser.parse_args(command + ["--election", "count"]).election == "count"
    assert parser.parse_args(command + ["--majority", "frequency"]).election == "count"   # the old names
    assert parser.parse_args(command + ["--majority", "total"]).election == "sum"
    with pytest.raises(SystemExit):
        parser.parse_args(command + ["--election", "off"])   # LoRA factors have no "no election"
    assert "Unknown sign election 'off'. Use sum or count" in capsys.readouterr().err
    assert election_name("off", allow_off=True) == "off"


def test_lora_ties_elections_by_hand():
    # element 0: values 1, 2, -4: sum -1 -> the sign is -, only -4 agrees: -4; by count (+, +, -): + -> (1+2)/2
    # element 1: values -3, 1, 1: sum -1 -> -3; by count: + -> (1+1)/2
    tensors = [torch.tensor([1.0, -3.0]), torch.tensor([2.0, 1.0]), torch.tensor([-4.0, 1.0])]
    by_sum = combine(tensors, [1, 1, 1], "ties", density=1.0, majority="sum")
    by_count = combine(tensors, [1, 1, 1], "ties", density=1.0, majority="count")
    assert by_sum.tolist() == [-4.0, -3.0] and by_count.tolist() == [1.5, 1.0]
    assert torch.equal(combine(tensors, [1, 1, 1], "ties", majority="total"), by_sum)
    assert torch.equal(combine(tensors, [1, 1, 1], "ties", majority="frequency"), by_count)


def test_merged_lora_metadata_records_the_election_by_its_one_name():
    recipe = json.loads(recipe_metadata([], None, mode="ties", majority="frequency")[RECIPE_KEY])
    assert recipe["election"] == "count" and "majority" not in recipe


def test_ties_and_dare_defaults_are_the_papers_not_no_trimming():
    from lib_merge.lora.merge import DEFAULT_DENSITY
    from lib_merge.methods import METHODS
    defaults = {name: {p.name: p.default for p in METHODS[name].params} for name in ("ties", "dare_linear", "dare_ties")}
    assert defaults["ties"]["density"] == 0.2                       # TIES paper: top 20 % of each task vector
    assert defaults["dare_linear"]["drop"] == defaults["dare_ties"]["drop"] == 0.9   # DARE paper: p = 0.9
    assert DEFAULT_DENSITY == 0.2
    parser = make_parser()
    assert parser.parse_args(["lora", "merge", "--mode", "ties", "--lora", "a", "-o", "x"]).density == 0.2
    assert parser.parse_args(["lora", "merge-svd", "--lora", "a", "--rank", "4", "-o", "x"]).density == 0.2


def test_errors_name_the_real_problem(tmp_path, capsys):
    """A folder given as a model, FILE:abc as a LoRA: said as such (exit 2), not 'file not found'."""
    from lib_merge.cli import main
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["merge", "--method", "weighted_sum", "--model", str(folder), "--model", str(folder),
                 "-o", str(tmp_path / "x.safetensors")]) == 2
    assert f"'{folder}' is a folder, not a model file" in capsys.readouterr().err
    assert main(["lora", "merge", "--lora", "style.safetensors:abc", "-o", str(tmp_path / "y.safetensors")]) == 2
    assert ("'style.safetensors:abc': 'abc' is not a weight. Write FILE, FILE:W or FILE:W_UNET:W_TE with numbers"
            in capsys.readouterr().err)
    from lib_merge.lora.merge import parse_lora_arg
    assert parse_lora_arg("C:\\loras\\a.safetensors:0.5").w_unet == 0.5   # a drive letter is part of the path
    assert str(parse_lora_arg("dir:with:colons/a.safetensors").path) == "dir:with:colons/a.safetensors"
    assert not list(tmp_path.glob("*.safetensors"))


def test_devices_pipes_and_pickles_answer_in_sentences(tiny, tmp_path, capsys):
    """--device that cannot be used is exit 2 with a sentence and no file; a closed pipe is no traceback;
    a pickle that needs code is refused without torch's protocol warning before it."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from lib_merge.cli import main
    from lib_merge.core.devices import check_device
    out = tmp_path / "x.safetensors"
    base = ["merge", "--method", "weighted_sum", "--model", str(tiny.path["sd1_a"]), "--model",
            str(tiny.path["sd1_b"]), "-o", str(out)]
    for device, message in (("tpu", "Unknown device 'tpu': use cpu, cuda or cuda:N"),
                            ("cuda:x", "Unknown device 'cuda:x'")):
        assert main(base + ["--device", device]) == 2 and message in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base + ["--device", "cuda"]) == 2
        assert "The device 'cuda' is not available: torch sees no CUDA GPU on this machine." in capsys.readouterr().err
    assert not out.exists() and str(check_device("CPU")) == "cpu"

    root = Path(__file__).resolve().parents[1]
    piped = subprocess.run(f'"{sys.executable}" -m lib_merge methods | head -1', shell=True, cwd=root,
                           capture_output=True, text=True)
    assert piped.stdout.startswith("weighted_sum") and "Traceback" not in piped.stderr, piped.stderr

    import pickle

    class Code:
        def __reduce__(self):
            return (print, ("ran",))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": Code()}, protocol=4))
    p = subprocess.run([sys.executable, "-m", "lib_merge", "info", str(evil)], cwd=root, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: 'evil.pt' is a pickle that needs to run code"), p.stderr
    assert "ran" not in p.stdout


def test_every_command_has_a_description_help_on_every_option_and_examples():
    import argparse

    from lib_merge.cli.help import Formatter
    leaves = []

    def walk(p, path):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        assert p.description, f"{' '.join(path)} has no description"
        for a in p._actions:
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                assert a.help, f"{' '.join(path)}: {a.option_strings or a.dest} has no help"
        if not subs:
            leaves.append(" ".join(path))
            assert p.epilog and p.epilog.startswith("examples:\n  merge-lab " + " ".join(path)), " ".join(path)
            for a in p._actions:   # a default worth saying is said
                if (a.option_strings and isinstance(a.default, (int, float, str)) and a.default is not False
                        and a.default != argparse.SUPPRESS):
                    said = Formatter("x")._get_help_string(a)
                    assert "default" in said.lower() or f"({a.default}" in said, f"{' '.join(path)} {a.option_strings}"
        for s in subs:
            for name, sp in s.choices.items():
                walk(sp, path + [name])
    walk(make_parser(), [])
    assert len(leaves) >= 33 and "merge" in leaves and "optimize run" in leaves and "lora merge-svd" in leaves


def test_the_console_script_is_declared():
    import tomllib
    from pathlib import Path
    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["merge-lab"] == "lib_merge.cli:console"
    from lib_merge.cli import console
    assert callable(console)


def test_lora_block_weights_take_the_lbw_extensions_specials():
    import random

    from lib_merge.lora.lbw import parse_lbw
    text = "1,R,U,X,X+0.25,X-0.5,0,0,0,0,0,0,0,0,0,0,0"   # 17 values: BASE, IN01, IN02, IN04, IN05, IN07, ...
    w = parse_lbw(text, "sd1")
    draw = random.Random(0)
    r, u = round(draw.random(), 3), round(draw.uniform(-0.5, 1.5), 3)   # the fixed seed: the same text, the same weights
    assert (w["BASE"], w["IN01"], w["IN02"], w["IN04"], w["IN05"], w["IN07"]) == (1.0, r, u, 1.0, 1.25, 0.5)
    assert 0 <= r < 1 and -0.5 <= u < 1.5 and parse_lbw(text, "sd1") == w
    assert parse_lbw(text, "sd1", x=0.6)["IN05"] == pytest.approx(0.85)
    assert parse_lbw("lbw=" + text, "sd1") == w
    with pytest.raises(InputError, match=r"per-element LoRA block weights \(the LBW extension's lbwe"):
        parse_lbw("lbwe=OUT05:attn:0.5", "sd1")
    with pytest.raises(InputError, match="numbers, or the LBW extension's R, U and X"):
        parse_lbw("1,Q,1", "sd1")


def test_weight_groups_take_the_clis_and_the_keys_spellings(tiny):
    from lib_merge.core.files import open_model
    from lib_merge.core.weights import from_groups
    with open_model(tiny.path["sd1_a"]) as m:
        plain = from_groups(m, "sd1", {"input": 0.3, "middle": 1.0, "out": 0.2})
        spelled = from_groups(m, "sd1", {"input_blocks": 0.3, "middle-block": 1.0, "out_block": 0.2})
        assert plain == spelled and len(plain) > 0
        with pytest.raises(InputError, match="Unknown group part 'inputs'"):
            from_groups(m, "sd1", {"inputs": 0.3})
