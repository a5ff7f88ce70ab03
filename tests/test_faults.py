"""Faults during a save: kill -9 mid-write and a disk that fills up.

A save writes `.NAME.PID.THREAD.partial` beside the output and renames it only when complete, so a killed save
leaves no file under the final name, nothing that is listed as a model, and a leftover that the next start
removes (Host.remove_stale_partials, called by the standalone app and the WebUI script at start).
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib_merge.core.errors import DiskFullError
from lib_merge.core.files import STALE_PARTIAL_AGE_S, remove_stale_partials, save_state_dict
from lib_merge.host.standalone import StandaloneHost

ROOT = Path(__file__).resolve().parents[1]

# Runs a CLI command in a child whose writer stops after its first tensor (marker file), so the parent can
# kill it at a known point in the middle of a save.
KILLABLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lib_merge.core import files
    from lib_merge.cli import main

    marker = Path(sys.argv[1])
    write = files.SafetensorsWriter.write
    def write_then_hang(self, *a, **k):
        write(self, *a, **k)
        marker.write_text(str(self.tmp_path))
        time.sleep(600)
    files.SafetensorsWriter.write = write_then_hang
    sys.exit(main(sys.argv[2:]))
""")


def kill_mid_save(tmp_path: Path, args: list[str]) -> Path:
    """Start `args` (CLI), kill -9 it after it wrote its first tensor; the path of the temporary file."""
    marker = tmp_path / "wrote-one-tensor"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(marker), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() or not marker.read_text():
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    return Path(marker.read_text())


@pytest.mark.parametrize("what", ["checkpoint", "lora"])
def test_kill_9_during_a_save_leaves_no_final_file_and_the_leftover_goes_at_start(tiny, tmp_path, what):
    models, out = tmp_path / "models", tmp_path / "out"
    models.mkdir()
    out.mkdir()
    final = out / ("merged.safetensors" if what == "checkpoint" else "Lora" / Path("extracted.safetensors"))
    final.parent.mkdir(exist_ok=True)
    if what == "checkpoint":
        args = ["merge", "--method", "weighted_sum", "--model", str(tiny.path["sd1_a"]),
                "--model", str(tiny.path["sd1_b"]), "--alpha", "0.3", "-o", str(final)]
    else:
        args = ["lora", "extract", "--base", str(tiny.path["sd1_a"]), "--tuned", str(tiny.path["sd1_b"]),
                "--rank", "2", "-o", str(final)]
    partial = kill_mid_save(tmp_path, args)

    assert not final.exists()
    assert partial.parent == final.parent and partial.is_file()
    assert partial.name.startswith(f".{final.name}.") and partial.name.endswith(".partial")
    host = StandaloneHost(models_dir=models, output_dir=out, generate=False)
    host.lora_dir = out / "Lora"
    assert host.list_checkpoints(refresh=True) == [] and host.list_loras(refresh=True) == []
    assert host.remove_stale_partials() == [partial]
    assert not partial.exists() and sorted(p.name for p in final.parent.iterdir()) == []


def test_a_save_still_running_is_not_removed(tmp_path):
    """A partial file of a live process (this one) that is being written is left alone; one of a dead
    process goes; one of a live pid untouched for a day goes too (the pid was reused)."""
    live = tmp_path / f".a.safetensors.{os.getpid()}.1.partial"
    old = tmp_path / f".b.safetensors.{os.getpid()}.partial"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()   # exited: its pid is free (reuse within ms is unlikely)
    dead = tmp_path / f".c.safetensors.{dead_pid}.7.partial"
    unrelated = [tmp_path / ".notes.partial", tmp_path / "c.safetensors.1.partial", tmp_path / "keep.safetensors"]
    for p in (live, old, dead, *unrelated):
        p.write_bytes(b"x")
    day_ago = time.time() - STALE_PARTIAL_AGE_S - 60
    os.utime(old, (day_ago, day_ago))
    assert sorted(remove_stale_partials(tmp_path)) == sorted([old, dead])
    assert live.exists() and all(p.exists() for p in unrelated)


# ------------------------------------------------------------------------------------------------ disk full
def _small_tmpfs(tmp_path: Path, size: str) -> Path:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    return mnt


@pytest.fixture
def tiny_disk(tmp_path):
    """1 MiB: smaller than any save plus the 16 MiB the writer keeps free."""
    mnt = _small_tmpfs(tmp_path, "1m")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """24 MiB: a 2 MiB save passes the free-space check."""
    mnt = _small_tmpfs(tmp_path, "24m")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def fill(path: Path) -> None:
    """Write zeros to `path` until the disk is full (unbuffered, so ENOSPC comes from our own write)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def two_mib_state() -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((256, 256), float(i)) for i in range(8)}   # 8 x 256 KiB


def test_disk_full_before_the_save_says_so_and_leaves_nothing(tiny, tiny_disk, capsys):
    """The tiny SD1 merge does not fit the 1 MiB disk: refused up front from the free space, with a
    sentence, nothing left on the disk and the source untouched."""
    from lib_merge.cli import main
    before = tiny.path["sd1_a"].read_bytes()
    code = main(["merge", "--method", "weighted_sum", "--model", str(tiny.path["sd1_a"]), "--model",
                 str(tiny.path["sd1_b"]), "--alpha", "0.5", "--dtype", "float32", "-o",
                 str(tiny_disk / "m.safetensors")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: Not enough free space in '{tiny_disk}': the output needs ") and "Traceback" not in err
    assert list(tiny_disk.iterdir()) == []
    assert tiny.path["sd1_a"].read_bytes() == before


def test_disk_filling_up_during_the_write_says_so_and_leaves_nothing(small_disk, monkeypatch):
    """The free-space check passes (another writer fills the disk meanwhile): ENOSPC from a real write is a
    DiskFullError with a sentence, and the temporary file is gone."""
    from lib_merge.core import files
    state = two_mib_state()
    hog = small_disk / "hog"
    real_write = files.SafetensorsWriter.write

    def write_while_another_fills_the_disk(self, key, tensor, row0=0):
        if key == "t2" and not hog.exists():
            fill(hog)   # take what is left, as another program would
        return real_write(self, key, tensor, row0)

    monkeypatch.setattr(files.SafetensorsWriter, "write", write_while_another_fills_the_disk)
    # fallocate reserves the blocks up front on tmpfs, so the hog takes only what was never reserved; turn
    # the reservation off to reach the write path that a filesystem without fallocate has
    monkeypatch.delattr(os, "posix_fallocate")
    with pytest.raises(DiskFullError, match=r"^The disk filled up while writing 'm.safetensors'\.$"):
        save_state_dict(state, small_disk / "m.safetensors")
    assert sorted(p.name for p in small_disk.iterdir()) == ["hog"]


def test_fallocate_reserves_the_space_so_a_filling_disk_cannot_cut_the_save(small_disk, monkeypatch):
    """With fallocate (Linux file systems that have it), the blocks are reserved before the first write: the
    other program gets ENOSPC, the save completes and reads back exactly."""
    from lib_merge.core import files
    state = two_mib_state()
    hog = small_disk / "hog"
    real_write = files.SafetensorsWriter.write

    def write_while_another_fills_the_disk(self, key, tensor, row0=0):
        if key == "t2" and not hog.exists():
            fill(hog)
        return real_write(self, key, tensor, row0)

    monkeypatch.setattr(files.SafetensorsWriter, "write", write_while_another_fills_the_disk)
    path = save_state_dict(state, small_disk / "m.safetensors")
    back = load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in state.items()) and set(back) == set(state)


# ------------------------------------------------------------------------------------------ sources untouched
def test_merges_and_lora_jobs_leave_their_sources_byte_for_byte(tiny, tmp_path):
    """A merge, an overwrite of an earlier output, a LoRA extract and a bake read their inputs only: the bytes
    and the modification times of every source are what they were."""
    from lib_merge.cli import main
    sources = [tiny.path[n] for n in ("sd1_a", "sd1_b", "sd1_c")]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sources}
    out, lora = tmp_path / "m.safetensors", tmp_path / "l.safetensors"
    a, b, c = (str(p) for p in sources)
    for argv in (["merge", "--method", "add_difference", "--model", a, "--model", b, "--model", c, "--alpha",
                  "0.7", "--merge-vae", "-o", str(out)],
                 ["merge", "--method", "ties", "--base", a, "--model", b, "--model", c, "--overwrite", "-o",
                  str(out)],
                 ["lora", "extract", "--base", a, "--tuned", b, "--rank", "2", "-o", str(lora)],
                 ["lora", "bake", "--model", a, "--lora", f"{lora}:0.5", "-o", str(tmp_path / "baked.safetensors")]):
        assert main(argv) == 0, argv
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sources} == before
