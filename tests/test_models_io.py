"""Checkpoint I/O: the lazy safetensors reader, the streaming writer, atomic saves, hashes, .ckpt, paths.

Every check reads real bytes back, with the reference `safetensors` package where it can, so a bug in our
reader cannot hide a bug in our writer (and the other way round).
"""
from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import struct
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lib_merge.core import files as models
from lib_merge.core.errors import CancelledError, DiskFullError, OutputError
from lib_merge.core.files import (SafetensorsFile, SafetensorsWriter, file_hashes, open_model, safe_output_path,
                                  save_state_dict)
from lib_merge.engine.merge import merge
from lib_merge.engine.recipe import ModelRef, Recipe
from lib_merge.engine.sinks import DictSink, FileSink

UNET_KEY = "model.diffusion_model.output_blocks.0.0.in_layers.2.weight"


# ------------------------------------------------------------------------------------------ helpers

def leftovers(folder: Path) -> list[str]:
    """Names in `folder` that look like unfinished writes (any temp/partial file)."""
    return sorted(n for n in os.listdir(folder) if "partial" in n or n.startswith("."))


def ref_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """A file written by the reference safetensors writer with four dtypes and metadata."""
    g = torch.Generator().manual_seed(5)
    state = {
        "f32": torch.randn(13, 7, generator=g),
        "f16": (torch.randn(9, 4, 3, generator=g) * 10).half(),
        "bf16": (torch.randn(11, 5, generator=g) * 1e3).to(torch.bfloat16),
        "i64": torch.randint(-2**62, 2**62, (6, 4), generator=g, dtype=torch.int64),
        "vec": torch.randn(17, generator=g),
    }
    meta = {"note": "hello", "json": json.dumps({"a": [1, 2]})}
    p = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(state, str(p), metadata=meta)
    return p, state, meta


def recipe_ab(tiny, alpha=0.3, a="sd1_a", b="sd1_b", method="weighted_sum"):
    return Recipe(method, [ModelRef(f"{a}.safetensors", str(tiny.path[a])),
                           ModelRef(f"{b}.safetensors", str(tiny.path[b]))], params={"alpha": alpha})


def fail_after(n_ok: int, err: int):
    """A replacement for os.pwrite that works `n_ok` times, then raises OSError(err)."""
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(err, os.strerror(err))
        return real(fd, data, offset)
    return pwrite, calls


# ----------------------------------------------------------------------------------------- reading

def test_header_is_parsed_without_reading_tensor_data(tmp_path, monkeypatch):
    p, state, meta = ref_file(tmp_path)
    (hlen,) = struct.unpack("<Q", p.read_bytes()[:8])
    read_bytes = {"n": 0}
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd, n, off):
        out = real_pread(fd, n, off)
        read_bytes["n"] += len(out)
        return out

    def preadv(fd, bufs, off):
        n = real_preadv(fd, bufs, off)
        read_bytes["n"] += n
        return n
    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)

    with SafetensorsFile(p) as f:
        assert set(f.keys()) == set(state)
        for k, v in state.items():
            assert f.info(k).shape == tuple(v.shape)
            assert f.info(k).dtype == v.dtype
            assert f.info(k).nbytes == v.numel() * v.element_size()
        assert f.metadata == meta
        # only the 8-byte length and the JSON header were read so far
        assert read_bytes["n"] <= 8 + hlen
        # the data is read on demand: change it on disk after opening, the reader sees the new bytes
        new = torch.full((17,), 42.0)
        start = f.info("vec").offset
        with open(p, "r+b") as fh:
            fh.seek(start)
            fh.write(new.numpy().tobytes())
        assert torch.equal(f.read("vec"), new)
        assert read_bytes["n"] >= 8 + hlen + 17 * 4


def test_read_matches_reference_loader_for_each_dtype(tmp_path):
    p, state, _ = ref_file(tmp_path)
    ref = safetensors.torch.load_file(str(p))
    with SafetensorsFile(p) as f:
        for k in state:
            t = f.read(k)
            assert t.dtype == ref[k].dtype and t.shape == ref[k].shape, k
            assert torch.equal(t, ref[k]), k
            assert torch.equal(t, state[k]), k


def test_read_rows_equals_slice(tmp_path):
    p, state, _ = ref_file(tmp_path)
    with SafetensorsFile(p) as f:
        for k, v in state.items():
            n = v.shape[0]
            for r0, r1 in ((0, 1), (1, n - 1), (n - 2, n), (0, n), (3, 3)):
                got = f.read(k, rows=(r0, r1))
                assert got.shape == v[r0:r1].shape, (k, r0, r1)
                assert torch.equal(got, v[r0:r1]), (k, r0, r1)


def test_read_into_reused_buffer(tmp_path):
    p, state, _ = ref_file(tmp_path)
    buf = torch.empty(4096, dtype=torch.uint8)
    with SafetensorsFile(p) as f:
        t1 = f.read("f32", buffer=buf)
        assert t1.data_ptr() == buf.data_ptr()  # a view into the caller's buffer, no new allocation
        assert torch.equal(t1, state["f32"])
        t2 = f.read("bf16", buffer=buf)
        assert t2.data_ptr() == buf.data_ptr()
        assert torch.equal(t2, state["bf16"])
        t3 = f.read("i64", rows=(2, 5), buffer=buf)
        assert torch.equal(t3, state["i64"][2:5])
        t4 = f.read("f16", rows=(4, 9), buffer=buf)
        assert torch.equal(t4, state["f16"][4:9])


def test_read_tiny_fp16_fixture_matches_state(tiny):
    state = tiny.state["sd1_a"]
    with open_model(tiny.path["sd1_a_fp16"]) as f:
        assert set(f.keys()) == set(state)
        ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
        assert f.info(ids).dtype == torch.int64 and torch.equal(f.read(ids), state[ids])
        for k in (UNET_KEY, "first_stage_model.decoder.conv_in.weight"):
            want = state[k].half()
            assert f.info(k).dtype == torch.float16
            assert torch.equal(f.read(k), want)
            assert torch.equal(f.read(k, rows=(1, 3)), want[1:3])


def test_failed_open_does_not_close_other_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all" * 4)
    good, _, _ = ref_file(tmp_path)
    try:
        SafetensorsFile(bad)
    except models.CorruptFileError as e:
        err = e   # like any caller that keeps the exception (a UI showing it, pytest.raises)
    else:
        pytest.fail("a broken header must raise CorruptFileError")
    opened = [SafetensorsFile(good) for _ in range(8)]   # the lowest free fd numbers, the failed one among them
    del err
    gc.collect()
    try:
        for f in opened:
            assert torch.equal(f.read("vec"), safetensors.torch.load_file(str(good))["vec"])
    finally:
        for f in opened:
            try:
                f.close()
            except OSError:  # its fd was closed behind its back; forget the number so __del__ cannot reuse it
                f._fd = None


# ----------------------------------------------------------------------------------------- writing

def test_save_state_dict_round_trip_with_reference_reader(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {
        "w": torch.randn(5, 3, generator=g),
        "h": torch.randn(4, 2, 2, generator=g).half(),
        "b": torch.randn(3, 6, generator=g).to(torch.bfloat16),
        "ids": torch.arange(77, dtype=torch.int64).reshape(1, 77),
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 4),
    }
    meta = {"sd_merge_recipe": json.dumps({"x": 1}), "title": "round trip"}
    out = tmp_path / "rt.safetensors"
    assert save_state_dict(state, out, meta) == out
    assert os.listdir(tmp_path) == ["rt.safetensors"]

    loaded = safetensors.torch.load_file(str(out))
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
        assert torch.equal(loaded[k], v), k
    assert loaded["scalar"].dim() == 0 and loaded["scalar"].item() == 3.25
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == meta
        assert torch.equal(f.get_tensor("w"), state["w"])
    with SafetensorsFile(out) as f:  # and our own reader agrees
        assert f.metadata == meta
        assert torch.equal(f.read("scalar"), state["scalar"])
        assert f.read("empty").shape == (0, 4)


def test_writer_out_of_order_row_chunks_and_threads(tmp_path):
    g = torch.Generator().manual_seed(2)
    state = {
        "a": torch.randn(10, 3, generator=g),
        "b": torch.randn(7, generator=g).half(),
        "c": torch.randn(6, 2, 2, generator=g).to(torch.bfloat16),
        "s": torch.tensor(-1.5),
        "d": torch.arange(40, dtype=torch.int64).reshape(8, 5),
    }
    out = tmp_path / "chunks.safetensors"
    w = SafetensorsWriter(out, [(k, v.dtype, tuple(v.shape)) for k, v in state.items()])
    writes = [("d", state["d"][6:8], 6), ("s", state["s"], 0), ("c", state["c"][4:6], 4),
              ("a", state["a"][7:10], 7), ("c", state["c"][0:4], 0), ("b", state["b"], 0),
              ("a", state["a"][0:3], 0), ("d", state["d"][0:6], 0), ("a", state["a"][3:7], 3)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda kt: w.write(kt[0], kt[1], kt[2]), writes))
    assert not out.exists(), "the final name must appear only on commit"
    assert len(leftovers(tmp_path)) == 1
    w.commit({"k": "v"})
    assert os.listdir(tmp_path) == ["chunks.safetensors"]
    loaded = safetensors.torch.load_file(str(out))
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"k": "v"}


# ------------------------------------------------------------------------------------ atomic saves

def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    pwrite, calls = fail_after(1, errno.EIO)
    monkeypatch.setattr(os, "pwrite", pwrite)
    state = {"a": torch.ones(4), "b": torch.zeros(3), "c": torch.ones(2)}
    with pytest.raises(OutputError) as e:
        save_state_dict(state, tmp_path / "x.safetensors")
    assert type(e.value) is OutputError
    assert "x.safetensors" in str(e.value) and "failed" in str(e.value)
    assert calls["n"] == 2
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_failed_merge_write_keeps_existing_target(tiny, tmp_path, monkeypatch, threads):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous result")
    pwrite, calls = fail_after(3, errno.EIO)
    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OutputError) as e:
        merge(recipe_ab(tiny), FileSink(out, overwrite=True), threads=threads, hashes=False)
    assert type(e.value) is OutputError and "failed" in str(e.value)
    assert calls["n"] > 3
    assert out.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_exception_in_progress_callback_aborts_the_file(tiny, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    seen = []

    def progress(p):
        seen.append(p.key)
        if len(seen) == 5:
            raise RuntimeError("boom in progress")
    with pytest.raises(RuntimeError, match="boom in progress"):
        merge(recipe_ab(tiny), FileSink(out, overwrite=True), threads=2, progress=progress, hashes=False)
    assert out.read_bytes() == b"keep me"
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_failure_while_finishing_keeps_existing_target(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")

    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputError) as e:
        merge(recipe_ab(tiny), FileSink(out, overwrite=True), threads=1, hashes=False)
    assert type(e.value) is OutputError and "out.safetensors" in str(e.value)
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_successful_overwrite_replaces_target(tiny, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    r = merge(recipe_ab(tiny, alpha=1.0), FileSink(out, overwrite=True), threads=1, hashes=False)
    assert r.output == out
    assert os.listdir(tmp_path) == ["out.safetensors"]
    loaded = safetensors.torch.load_file(str(out))
    assert torch.equal(loaded[UNET_KEY], tiny.state["sd1_b"][UNET_KEY].half())


# -------------------------------------------------------------------------------------- full disk

def test_too_little_free_space_fails_before_creating_a_file(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_free_bytes", lambda folder: 10_000)
    with pytest.raises(DiskFullError) as e:
        save_state_dict({"a": torch.ones(10)}, tmp_path / "s.safetensors")
    assert "free space" in str(e.value)
    assert os.listdir(tmp_path) == []
    with pytest.raises(DiskFullError) as e:
        merge(recipe_ab(tiny), FileSink(tmp_path / "m.safetensors"), hashes=False)
    assert "free space" in str(e.value) and "9.77 KiB is free" in str(e.value)   # sizes in the unit that suits them
    assert os.listdir(tmp_path) == []


def test_disk_filling_up_during_write(tiny, tmp_path, monkeypatch):
    pwrite, _ = fail_after(2, errno.ENOSPC)
    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(DiskFullError) as e:
        merge(recipe_ab(tiny), FileSink(tmp_path / "m.safetensors"), threads=2, hashes=False)
    assert "filled up" in str(e.value) and "m.safetensors" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_reservation_failing_with_enospc(tmp_path, monkeypatch):
    def fallocate(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(DiskFullError) as e:
        save_state_dict({"a": torch.ones(10)}, tmp_path / "s.safetensors")
    assert "free space" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_filesystem_without_preallocation_falls_back(tmp_path, monkeypatch):
    def fallocate(fd, off, n):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    state = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(2, 2).half()}
    save_state_dict(state, tmp_path / "s.safetensors")
    loaded = safetensors.torch.load_file(str(tmp_path / "s.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert os.listdir(tmp_path) == ["s.safetensors"]


# ----------------------------------------------------------------------------------- cancellation

@pytest.mark.parametrize("threads", [1, 2])
def test_cancel_at_once_leaves_nothing(tiny, tmp_path, threads):
    out = tmp_path / "c.safetensors"
    with pytest.raises(CancelledError) as e:
        merge(recipe_ab(tiny), FileSink(out), threads=threads, cancel=lambda: True, hashes=False)
    assert "nothing was written" in str(e.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_cancel_midway_removes_partial_and_keeps_target(tiny, tmp_path, threads):
    out = tmp_path / "c.safetensors"
    out.write_bytes(b"earlier merge")
    polls = {"n": 0}
    written = []

    class Watch(FileSink):
        def write(self, key, tensor, row0=0):
            written.append(key)
            super().write(key, tensor, row0)

    def cancel():
        polls["n"] += 1
        return polls["n"] > 50
    with pytest.raises(CancelledError):
        merge(recipe_ab(tiny), Watch(out, overwrite=True), threads=threads, cancel=cancel, hashes=False)
    assert len(written) >= 40  # the partial file had real data in it before the cancel
    assert out.read_bytes() == b"earlier merge"
    assert os.listdir(tmp_path) == ["c.safetensors"]


# ----------------------------------------------------------------------------------------- hashes

def _expected_hashes(data: bytes) -> dict[str, str]:
    sha = hashlib.sha256(data).hexdigest()
    return {"sha256": sha, "short_hash": sha[:10],
            "legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def test_file_hashes_values(tmp_path):
    data = torch.randint(0, 256, (0x130000,), generator=torch.Generator().manual_seed(3),
                         dtype=torch.uint8).numpy().tobytes()
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    h = file_hashes(p, use_cache=False)
    assert h == _expected_hashes(data)
    assert len(h["short_hash"]) == 10 and len(h["legacy_hash"]) == 8
    # the legacy hash covers only 64 KiB at 1 MiB: bytes outside it do not change it
    p.write_bytes(data[:0x100000 - 1] + b"\0" + data[0x100000:])
    h2 = file_hashes(p, use_cache=False)
    assert h2["legacy_hash"] == h["legacy_hash"] and h2["sha256"] != h["sha256"]
    # a file smaller than 1 MiB: the WebUI hashes an empty read
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")
    assert file_hashes(small, use_cache=False) == {
        "sha256": hashlib.sha256(b"abc").hexdigest(), "short_hash": hashlib.sha256(b"abc").hexdigest()[:10],
        "legacy_hash": hashlib.sha256(b"").hexdigest()[:8]}


def test_file_hashes_cache_hit_and_invalidation(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("MERGE_LAB_CACHE", str(cache_dir))
    data = bytes(range(256)) * (0x120000 // 256)
    p = tmp_path / "m.safetensors"
    p.write_bytes(data)
    first = file_hashes(p)
    assert first == _expected_hashes(data)
    cache = json.loads((cache_dir / "hashes.json").read_text())
    assert cache[str(p.resolve())]["sha256"] == first["sha256"]

    # a second call is answered from the cache: hashing is not even possible now
    def no_hashing(*a, **k):
        raise AssertionError("hashed again instead of using the cache")
    monkeypatch.setattr(models, "hashlib", types.SimpleNamespace(sha256=no_hashing))
    assert file_hashes(p) == first
    monkeypatch.setattr(models, "hashlib", hashlib)

    # same size, different content and mtime -> recomputed
    changed = b"\x01" + data[1:0x100000] + b"\x02" + data[0x100001:]
    st = p.stat()
    p.write_bytes(changed)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = file_hashes(p)
    assert second == _expected_hashes(changed) and second != first
    # different size -> recomputed
    with open(p, "ab") as f:
        f.write(b"tail")
    third = file_hashes(p)
    assert third == _expected_hashes(changed + b"tail")
    assert json.loads((cache_dir / "hashes.json").read_text())[str(p.resolve())]["sha256"] == third["sha256"]


# ------------------------------------------------------------------------------------------- .ckpt

def test_ckpt_state_dict_is_unwrapped_and_merges(tiny, tmp_path):
    a, b = tiny.state["sd1_a"], tiny.state["sd1_b"]
    pa, pb = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    torch.save({"state_dict": a, "global_step": 1234, "epoch": 3}, pa)
    torch.save({"state_dict": b}, pb, _use_new_zipfile_serialization=False)  # old (non-zip) format too

    with open_model(pa) as m:
        assert set(m.keys()) == set(a)
        assert torch.equal(m.read(UNET_KEY), a[UNET_KEY])
        assert torch.equal(m.read(UNET_KEY, rows=(2, 5)), a[UNET_KEY][2:5])

    rec = Recipe("weighted_sum", [ModelRef("a.ckpt", str(pa)), ModelRef("b.ckpt", str(pb))], params={"alpha": 0.3})
    from_ckpt = merge(rec, DictSink(), threads=1, hashes=False).output
    from_st = merge(recipe_ab(tiny), DictSink(), threads=1, hashes=False).output
    assert set(from_ckpt) == set(from_st) == set(a)
    for k in from_st:
        assert torch.equal(from_ckpt[k], from_st[k]), k
    assert torch.allclose(from_ckpt[UNET_KEY].float(), torch.lerp(a[UNET_KEY], b[UNET_KEY], 0.3), atol=1e-3)
    assert not torch.equal(from_ckpt[UNET_KEY], a[UNET_KEY].half())

    out = tmp_path / "from_ckpt.safetensors"
    merge(rec, FileSink(out), threads=1, hashes=False)
    assert torch.equal(safetensors.torch.load_file(str(out))[UNET_KEY], from_st[UNET_KEY])


# -------------------------------------------------------------------------------------- out paths

def test_safe_output_path_accepts_plain_names(tmp_path):
    assert safe_output_path(tmp_path, "name") == tmp_path.resolve() / "name.safetensors"
    assert safe_output_path(tmp_path, "my merge.safetensors") == tmp_path.resolve() / "my merge.safetensors"
    assert safe_output_path(tmp_path, "  v1.5-mix  ") == tmp_path.resolve() / "v1.5-mix.safetensors"


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "..", "", "   ", "a\\b", "..\\x", "x\nname", "C:evil", "."])
def test_safe_output_path_rejects(tmp_path, name):
    with pytest.raises(OutputError) as e:
        safe_output_path(tmp_path, name)
    assert type(e.value) is OutputError
    msg = str(e.value)
    assert "file name" in msg or "outside" in msg
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------ determinism

def test_threads_and_chunks_give_identical_bytes(tiny, tmp_path):
    rows_split = []

    class Watch(FileSink):
        def write(self, key, tensor, row0=0):
            if row0:
                rows_split.append(key)
            super().write(key, tensor, row0)

    outs = []
    for i, (threads, chunk) in enumerate(((1, 1000), (2, 1000), (2, 1 << 21), (1, 1 << 21))):
        out = tmp_path / f"o{i}.safetensors"
        merge(recipe_ab(tiny, alpha=0.37), Watch(out), threads=threads, chunk_elems=chunk)
        outs.append(out.read_bytes())
    assert rows_split, "chunk_elems=1000 should have split some tensors into row chunks"
    assert all(o == outs[0] for o in outs[1:])
    loaded = safetensors.torch.load_file(str(tmp_path / "o1.safetensors"))
    k = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"  # 1544 x 24: chunked
    want = torch.lerp(tiny.state["sd1_a"][k], tiny.state["sd1_b"][k], 0.37).half()
    assert torch.equal(loaded[k], want)


def test_a_host_that_replaced_torch_load_does_not_stop_reading_a_ckpt(tiny, tmp_path, monkeypatch):
    """The WebUI's modules.safe swaps torch.load for a checker that returns None on files written by recent
    torch, keeping the original as unsafe_torch_load; we read through the original (still weights_only)."""
    import sys
    import types

    from lib_merge.core.files import torch_load_weights
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": tiny.state["sd1_a"]}, path)
    safe = types.ModuleType("modules.safe")
    safe.unsafe_torch_load = torch.load
    monkeypatch.setitem(sys.modules, "modules.safe", safe)
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)   # what the WebUI's check gives such a file
    with open_model(path) as m:
        assert torch.equal(m.read(UNET_KEY), tiny.state["sd1_a"][UNET_KEY])
    # still torch's restricted unpickler: a pickle that needs code to load is refused
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "f": types.SimpleNamespace(x=1)}, evil)
    import pickle
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed|Unsupported global"):
        torch_load_weights(evil)
