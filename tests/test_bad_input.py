"""Hostile and wrong inputs, through the library and through the CLI.

Each case is checked twice: `engine.merge` must raise the exact MergeError subclass with a message that says
what is wrong, and `python -m lib_merge merge ...` must exit with status 2, print that message on stderr
and leave no output (nor a temp file) behind. The CLI runs are started together once per module (each
pays the torch import), and every CLI test looks up its own run.
"""
from __future__ import annotations

import gc
import json
import os
import pickletools
import shlex
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lib_merge.core import files as models
from lib_merge.core.errors import (ArchitectureMismatchError, CorruptFileError, DiskFullError, InputError,
                                   MergeError, NonFiniteError, OutputError, UnsafeFileError, UnsupportedModelError)
from lib_merge.core.weights import parse_blocks
from lib_merge.engine.merge import merge
from lib_merge.engine.recipe import ModelRef, Recipe
from lib_merge.engine.sinks import FileSink

ROOT = Path(__file__).resolve().parents[1]
HUGE_KEY = "model.diffusion_model.output_blocks.0.0.in_layers.2.weight"


@pytest.fixture
def collect_failed_opens(request):
    # Belt and braces for test_models_io::test_failed_open_does_not_close_other_files: collect objects of
    # failed opens right after the test, so a regression there cannot close a later test's files.
    yield
    case = getattr(request.node, "callspec", None) and request.node.callspec.params.get("case")
    if case is not None and issubclass(case.exc, CorruptFileError):
        gc.collect()


# ------------------------------------------------------------------------------------ hostile files

def st_bytes(keys: list[str], shape=(2, 2)) -> bytes:
    """A well-formed safetensors file written by hand: float32 zero tensors under `keys`."""
    n = 4 * shape[0] * shape[1]
    header = {k: {"dtype": "F32", "shape": list(shape), "data_offsets": [i * n, (i + 1) * n]}
              for i, k in enumerate(keys)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"\0" * (n * len(keys))


class CustomConfig:
    """A custom class: torch.save pickles it by reference, so loading it needs to import and run code."""

    def __init__(self):
        self.lr = 1e-4


def _os_system_pickle(command: str) -> bytes:
    """A hand-written protocol-2 pickle: GLOBAL os.system, a string argument, REDUCE."""
    arg = command.encode()
    return (b"\x80\x02" + b"cos\nsystem\n" + b"X" + struct.pack("<I", len(arg)) + arg + b"\x85" + b"R" + b".")


class Files:
    def __init__(self, folder: Path, tiny):
        self.folder = folder
        self.marker = folder / "PWNED"
        self.p: dict[str, Path] = {name: Path(p) for name, p in tiny.path.items()}
        f = folder

        self.p["missing"] = f / "missing.safetensors"
        self.p["text"] = f / "x.safetensors"
        self.p["text"].write_text("This is a text file, not a model.\n" * 20)
        whole = self.p["sd1_b"].read_bytes()
        self.p["truncated"] = f / "truncated.safetensors"
        self.p["truncated"].write_bytes(whole[: len(whole) // 2])
        self.p["header_past_eof"] = f / "short_header.safetensors"
        self.p["header_past_eof"].write_bytes(struct.pack("<Q", 5000) + b'{"__metadata__": {}}' + b" " * 100)
        self.p["header_2_60"] = f / "huge_header.safetensors"
        self.p["header_2_60"].write_bytes(struct.pack("<Q", 2 ** 60) + b"{}" + b" " * 62)
        self.p["bad_json"] = f / "bad_json.safetensors"
        bad = b'{"model.diffusion_model.x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # no }
        self.p["bad_json"].write_bytes(struct.pack("<Q", len(bad)) + bad + b"\0" * 8)

        self.p["sd3"] = f / "sd3_medium.safetensors"
        self.p["sd3"].write_bytes(st_bytes([
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight",
            "model.diffusion_model.x_embedder.proj.weight"]))
        self.p["flux"] = f / "flux1_dev.safetensors"
        self.p["flux"].write_bytes(st_bytes([
            "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.weight",
            "single_blocks.0.linear1.weight"]))
        self.p["lora"] = f / "style_lora.safetensors"
        self.p["lora"].write_bytes(st_bytes([
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]))

        # pickles that need code to load; if any of them ever ran, `marker` would appear
        touch = f"touch {shlex.quote(str(self.marker))}"
        self.p["pickle_custom_class"] = f / "custom.ckpt"
        torch.save({"state_dict": {"w": torch.zeros(2)}, "config": CustomConfig()}, self.p["pickle_custom_class"])
        self.p["pickle_os_system"] = f / "system.ckpt"
        benign = f / "benign.ckpt"
        torch.save({"state_dict": {"w": torch.zeros(2)}}, benign)
        self.payload = _os_system_pickle(touch)
        with zipfile.ZipFile(benign) as zin, zipfile.ZipFile(self.p["pickle_os_system"], "w") as zout:
            names = zin.namelist()
            assert any(n.endswith("/data.pkl") for n in names)
            for n in names:
                zout.writestr(n, self.payload if n.endswith("/data.pkl") else zin.read(n))
        benign.unlink()

        class Evil:
            def __reduce__(self):
                return (os.system, (touch,))
        self.p["pickle_reduce"] = f / "reduce.ckpt"
        torch.save({"state_dict": {"w": torch.zeros(2), "x": Evil()}}, self.p["pickle_reduce"])
        self.p["pickle_raw"] = f / "raw.ckpt"
        self.p["pickle_raw"].write_bytes(self.payload)

        # B with one value that overflows float16 in A + (B - C)
        b = dict(tiny.state["sd1_b"])
        t = b[HUGE_KEY].clone()
        t.view(-1)[0] = 1e38
        b[HUGE_KEY] = t
        self.p["sd1_b_huge"] = f / "sd1_b_huge.safetensors"
        safetensors.torch.save_file(b, str(self.p["sd1_b_huge"]))


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("bad_inputs"), tiny)


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def test_hostile_files_are_what_they_claim(files):
    """The fixtures themselves: the pickles really carry code, the others really are broken."""
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(files.payload)]
    assert ("GLOBAL", "os system") in ops and ("REDUCE", None) in ops
    with zipfile.ZipFile(files.p["pickle_os_system"]) as z:
        assert any(n.endswith("data.pkl") and z.read(n) == files.payload for n in z.namelist())
    assert b"system" in _data_pkl(files.p["pickle_reduce"])
    assert b"CustomConfig" in _data_pkl(files.p["pickle_custom_class"])
    full = files.p["sd1_b"].stat().st_size
    assert files.p["truncated"].stat().st_size == full // 2
    assert safetensors.torch.load_file(str(files.p["sd1_b_huge"]))[HUGE_KEY].max().item() == pytest.approx(1e38)
    assert not files.marker.exists()


# ---------------------------------------------------------------------------------------------- cases

@dataclass
class Case:
    name: str
    exc: type
    words: list[str]
    models: list[str]
    method: str = "weighted_sum"
    params: dict = field(default_factory=dict)
    cli_args: list[str] = field(default_factory=list)
    nonfinite: str = "warn"
    out: str | None = None          # None: a fresh path; "A": the first input; "exists": an existing file
    overwrite: bool = False


CASES = [
    Case("missing_model", InputError, ["not found", "missing.safetensors"], ["sd1_a", "missing"]),
    Case("text_file", CorruptFileError, ["x.safetensors", "not a valid safetensors"], ["text", "sd1_b"]),
    Case("truncated", CorruptFileError, ["truncated.safetensors", "truncated"], ["sd1_a", "truncated"]),
    Case("header_past_eof", CorruptFileError, ["short_header.safetensors", "truncated", "5000"],
         ["sd1_a", "header_past_eof"]),
    Case("header_2_60", CorruptFileError, ["huge_header.safetensors", "not a valid safetensors", str(2 ** 60)],
         ["header_2_60", "sd1_b"]),
    Case("bad_json", CorruptFileError, ["bad_json.safetensors", "not JSON"], ["sd1_a", "bad_json"]),
    Case("sd1_with_sdxl", ArchitectureMismatchError, ["SD1", "SDXL", "sd1_a.safetensors", "sdxl_b.safetensors"],
         ["sd1_a", "sdxl_b"]),
    Case("sd3", UnsupportedModelError, ["sd3_medium.safetensors", "Stable Diffusion 3"], ["sd1_a", "sd3"]),
    Case("flux", UnsupportedModelError, ["flux1_dev.safetensors", "Flux"], ["flux", "sd1_b"]),
    Case("lora", UnsupportedModelError, ["style_lora.safetensors", "LoRA"], ["sd1_a", "lora"]),
    Case("pickle_custom_class", UnsafeFileError, ["custom.ckpt", "safetensors"], ["sd1_a", "pickle_custom_class"]),
    Case("pickle_os_system", UnsafeFileError, ["system.ckpt", "safetensors"], ["pickle_os_system", "sd1_b"]),
    Case("output_is_input", OutputError, ["input", "a_copy.safetensors"], ["a_copy", "sd1_b"], out="A",
         overwrite=True),
    Case("output_exists", OutputError, ["already exists", "out.safetensors"], ["sd1_a", "sd1_b"], out="exists"),
    Case("unknown_method", InputError, ["Unknown merge method", "no_such_method"], ["sd1_a", "sd1_b"],
         method="no_such_method"),
    Case("alpha_out_of_range", InputError, ["alpha", "5.0", "outside its range"], ["sd1_a", "sd1_b"],
         params={"alpha": 5.0}, cli_args=["--alpha", "5"]),
    Case("blocks_count", InputError, ["26", "block weights", "got 3"], ["sd1_a", "sd1_b"],
         cli_args=["--blocks", "0.1,0.2,0.3"]),
    Case("blocks_unknown_name", InputError, ["XX99", "matches no"], ["sd1_a", "sd1_b"],
         cli_args=["--blocks", "IN01=0.5,XX99=1"]),
    Case("nonfinite_error", NonFiniteError, [HUGE_KEY, "NaN/Inf"], ["sd1_a", "sd1_b_huge", "sd1_c"],
         method="add_difference", nonfinite="error", cli_args=["--nonfinite", "error"]),
]
CASE_BY_NAME = {c.name: c for c in CASES}
PICKLE_ONLY_LIBRARY = ["pickle_reduce", "pickle_raw"]


def prepare(case: Case, files: Files, folder: Path) -> tuple[list[Path], Path, bytes | None]:
    """Inputs and output path for one run in `folder`; returns the bytes an existing output must keep."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for m in case.models:
        if m == "a_copy":
            p = folder / "a_copy.safetensors"
            shutil.copyfile(files.p["sd1_a"], p)
            paths.append(p)
        else:
            paths.append(files.p[m])
    keep = None
    if case.out == "A":
        out = paths[0]
        keep = out.read_bytes()
    else:
        out = folder / "out.safetensors"
        if case.out == "exists":
            keep = b"an earlier merge the user wants to keep"
            out.write_bytes(keep)
    return paths, out, keep


def assert_no_output(folder: Path, out: Path, keep: bytes | None) -> None:
    if keep is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == keep
    stray = [n for n in os.listdir(folder) if "partial" in n or n.startswith(".")]
    assert stray == []


def check_message(text: str, words: list[str]) -> None:
    for w in words:
        assert w in text, f"{w!r} not in message: {text!r}"


# ------------------------------------------------------------------------------------------ library

def library_call(case: Case, paths: list[Path], out: Path):
    if case.name == "blocks_count":  # the text form is parsed by weights.parse_blocks (CLI and UI alike)
        return parse_blocks("0.1,0.2,0.3", "sd1", 0.5)
    if case.name == "blocks_unknown_name":
        return parse_blocks("IN01=0.5,XX99=1", "sd1", 0.5)
    recipe = Recipe(case.method, [ModelRef(p.name, str(p)) for p in paths], params=dict(case.params),
                    nonfinite=case.nonfinite)
    return merge(recipe, FileSink(out, overwrite=case.overwrite), threads=2)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_library(case, files, tmp_path, collect_failed_opens):
    paths, out, keep = prepare(case, files, tmp_path)
    with pytest.raises(MergeError) as e:
        library_call(case, paths, out)
    assert type(e.value) is case.exc, f"{type(e.value).__name__}: {e.value}"
    check_message(str(e.value), case.words)
    assert_no_output(tmp_path, out, keep)
    assert not files.marker.exists()


@pytest.mark.parametrize("which", ["pickle_custom_class", "pickle_os_system"] + PICKLE_ONLY_LIBRARY)
def test_library_pickles_never_run_code(which, files, tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(UnsafeFileError) as e:
        merge(Recipe("weighted_sum", [ModelRef("a", str(files.p[which])), ModelRef("b", str(files.p["sd1_b"]))]),
              FileSink(out))
    check_message(str(e.value), [files.p[which].name, "safetensors", "pickle"])
    with pytest.raises(UnsafeFileError):
        models.open_model(files.p[which])
    assert not files.marker.exists()
    assert os.listdir(tmp_path) == []


def test_library_output_through_symlink_to_input(files, tmp_path):
    a = tmp_path / "a.safetensors"
    shutil.copyfile(files.p["sd1_a"], a)
    before = a.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(a)
    with pytest.raises(OutputError) as e:
        merge(Recipe("weighted_sum", [ModelRef("a", str(a)), ModelRef("b", str(files.p["sd1_b"]))]),
              FileSink(link, overwrite=True))
    check_message(str(e.value), ["input"])
    assert a.read_bytes() == before and link.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "link.safetensors"]


def test_library_disk_too_small(files, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_free_bytes", lambda folder: 1 << 20)
    out = tmp_path / "out.safetensors"
    with pytest.raises(DiskFullError) as e:
        merge(Recipe("weighted_sum", [ModelRef("a", str(files.p["sd1_a"])), ModelRef("b", str(files.p["sd1_b"]))]),
              FileSink(out))
    check_message(str(e.value), ["free space", str(tmp_path)])
    assert os.listdir(tmp_path) == []


def test_library_nonfinite_warn_names_the_key(files, tmp_path):
    out = tmp_path / "out.safetensors"
    recipe = Recipe("add_difference", [ModelRef(n, str(files.p[n])) for n in ("sd1_a", "sd1_b_huge", "sd1_c")],
                    nonfinite="warn")
    result = merge(recipe, FileSink(out), threads=2)
    assert result.nonfinite_keys == [HUGE_KEY]
    assert any(HUGE_KEY in w and "NaN/Inf" in w and "1 key" in w for w in result.warnings), result.warnings
    saved = safetensors.torch.load_file(str(out))[HUGE_KEY]
    assert saved.dtype == torch.float16 and torch.isinf(saved.view(-1)[0])
    assert int((~torch.isfinite(saved)).sum()) == 1


def test_library_nonfinite_key_listed_once_when_chunked(files, tmp_path, tiny):
    b = dict(tiny.state["sd1_b"])
    t = b[HUGE_KEY].clone()
    t[0].view(-1)[0] = 1e38
    t[-1].view(-1)[0] = 1e38   # two different row chunks with chunk_elems=1000
    b[HUGE_KEY] = t
    pb = tmp_path / "b2.safetensors"
    safetensors.torch.save_file(b, str(pb))
    recipe = Recipe("add_difference", [ModelRef("a", str(files.p["sd1_a"])), ModelRef("b", str(pb)),
                                       ModelRef("c", str(files.p["sd1_c"]))])
    result = merge(recipe, FileSink(tmp_path / "o.safetensors"), threads=1, chunk_elems=1000)
    assert result.nonfinite_keys == [HUGE_KEY]
    assert any("1 key(s)" in w for w in result.warnings), result.warnings


@pytest.mark.parametrize("n", [3, 30])
def test_library_recipe_with_wrong_block_count(files, tmp_path, n):
    out = tmp_path / "out.safetensors"
    recipe = Recipe("weighted_sum", [ModelRef("a", str(files.p["sd1_a"])), ModelRef("b", str(files.p["sd1_b"]))],
                    blocks={"alpha": [0.5] * n})
    with pytest.raises(InputError) as e:
        merge(recipe, FileSink(out))
    check_message(str(e.value), ["26", str(n)])
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- CLI
#
# A `python -m lib_merge` process spends ~1.8 s importing torch; 20 of them on a small machine would blow the
# time budget. So every CLI case runs in its own process forked from one runner that paid the imports once and
# then does exactly what `python -m lib_merge ARGS` does (runpy of lib_merge.__main__ as __main__, real
# stdout/stderr file descriptors, real exit status). A few cases also run as plain
# `[sys.executable, "-m", "lib_merge", ...]` processes, to cover the real entry point end to end.

FORK_RUNNER = r"""
import json, os, runpy, sys, traceback
import torch, lib_merge.cli, lib_merge.engine.merge, lib_merge.core.files  # the slow imports, paid once
jobs = json.load(open(sys.argv[1]))
children = {}
for name, job in jobs.items():
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = ["lib_merge"] + job["argv"]
            try:
                runpy.run_module("lib_merge", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    children[pid] = name
status = {}
while children:
    pid, st = os.wait()
    status[children.pop(pid)] = os.waitstatus_to_exitcode(st)
json.dump(status, open(sys.argv[2], "w"))
"""

REAL_PROCESS_CASES = ["missing_model", "pickle_os_system", "output_exists", "nonfinite_error"]


@dataclass
class CliRun:
    rc: int
    stdout: str
    stderr: str
    folder: Path
    out: Path
    keep: bytes | None


def _cli_argv(case: Case, paths: list[Path], out: Path) -> list[str]:
    argv = ["merge", "--method", case.method]
    for p in paths:
        argv += ["--model", str(p)]
    argv += case.cli_args + ["-o", str(out)]
    if case.overwrite:
        argv.append("--overwrite")
    return argv


def _cli_jobs(files: Files, base: Path) -> dict[str, tuple[list[str], Path, Path, bytes | None]]:
    jobs = {}
    for case in CASES:
        folder = base / case.name
        paths, out, keep = prepare(case, files, folder)
        jobs[case.name] = (_cli_argv(case, paths, out), folder, out, keep)
    # runs that are not failure cases of the table
    folder = base / "nonfinite_warn"
    folder.mkdir()
    jobs["nonfinite_warn"] = (["merge", "--method", "add_difference", "--model", str(files.p["sd1_a"]),
                               "--model", str(files.p["sd1_b_huge"]), "--model", str(files.p["sd1_c"]),
                               "-o", str(folder / "out.safetensors")], folder, folder / "out.safetensors", None)
    folder = base / "recipe_blocks"
    folder.mkdir()
    recipe = {"format": "merge-lab-recipe", "version": 1, "method": "weighted_sum",
              "models": [{"name": "sd1_a.safetensors", "path": str(files.p["sd1_a"])},
                         {"name": "sd1_b.safetensors", "path": str(files.p["sd1_b"])}],
              "blocks": {"alpha": [0.5, 0.5, 0.5]}}
    (folder / "recipe.json").write_text(json.dumps(recipe))
    jobs["recipe_blocks"] = (["merge", "--recipe", str(folder / "recipe.json"), "-o", str(folder / "out.safetensors")],
                             folder, folder / "out.safetensors", None)
    return jobs


@pytest.fixture(scope="module")
def cli(files, tmp_path_factory) -> dict[str, CliRun]:
    """Every CLI job: name -> CliRun, plus 'real:NAME' for the REAL_PROCESS_CASES run as `python -m`."""
    base = tmp_path_factory.mktemp("cli_runs")
    env = dict(os.environ, MERGE_LAB_CACHE=str(base / "cache"), PYTHONDONTWRITEBYTECODE="1")
    forked = _cli_jobs(files, base / "forked")
    real = _cli_jobs(files, base / "real")
    real = {k: real[k] for k in REAL_PROCESS_CASES}

    logs = base / "logs"
    logs.mkdir()
    spec = {name: {"argv": argv, "stdout": str(logs / f"{name}.out"), "stderr": str(logs / f"{name}.err")}
            for name, (argv, *_rest) in forked.items()}
    (logs / "jobs.json").write_text(json.dumps(spec))

    def start(argv):
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    runner = start(["-c", FORK_RUNNER, str(logs / "jobs.json"), str(logs / "status.json")])
    procs = {name: start(["-m", "lib_merge", *argv]) for name, (argv, *_rest) in real.items()}
    results: dict[str, CliRun] = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=180)
        _, folder, path, keep = real[name]
        results[f"real:{name}"] = CliRun(p.returncode, out, err, folder, path, keep)
    r_out, r_err = runner.communicate(timeout=180)
    assert runner.returncode == 0, f"fork runner failed:\n{r_out}\n{r_err}"
    status = json.loads((logs / "status.json").read_text())
    for name, (_argv, folder, path, keep) in forked.items():
        results[name] = CliRun(status[name], Path(spec[name]["stdout"]).read_text(),
                               Path(spec[name]["stderr"]).read_text(), folder, path, keep)
    return results


def check_cli_failure(r: CliRun, case: Case, files: Files) -> None:
    assert r.rc == 2, f"exit {r.rc}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert r.stderr.startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    check_message(r.stderr, case.words)
    assert r.stdout == ""
    assert_no_output(r.folder, r.out, r.keep)
    assert not files.marker.exists()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli(case, cli, files):
    check_cli_failure(cli[case.name], case, files)


@pytest.mark.parametrize("name", REAL_PROCESS_CASES)
def test_cli_real_process(name, cli, files):
    check_cli_failure(cli[f"real:{name}"], CASE_BY_NAME[name], files)


def test_cli_nonfinite_warn_saves_and_names_the_key(cli):
    r = cli["nonfinite_warn"]
    assert r.rc == 0, r.stderr
    assert f"warning: NaN/Inf values in 1 key(s): {HUGE_KEY}" in r.stderr
    assert "Merged add_difference" in r.stdout
    saved = safetensors.torch.load_file(str(r.out))[HUGE_KEY]
    assert torch.isinf(saved.view(-1)[0])
    assert os.listdir(r.folder) == ["out.safetensors"]


def test_cli_recipe_with_wrong_block_count(cli):
    r = cli["recipe_blocks"]
    assert r.rc == 2, r.stderr[-2000:]
    check_message(r.stderr, ["26", "block weights"])
    assert not r.out.exists()
