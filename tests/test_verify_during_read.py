"""verify=True: every recorded checksum is checked, from the page cache, before the model changes.

``check_spans`` hashes bytes where they are (read-only mappings of the file), in parallel;
the tests compare its hooks' bytes with the file's, check that a damaged tensor is reported
whichever path loads it and leaves the model as it was, and that a file which cannot be
mapped, or is shorter than its header says, is handled as the read path handles it.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.errors import ChecksumError, CorruptFileError
from torchkeep.io import read as io_read


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 64)
        self.body = nn.Linear(64, 256)
        self.norm = nn.LayerNorm(256)


def _model(seed: int) -> Small:
    torch.manual_seed(seed)
    return Small()


def _flip(file: Path, name: str) -> None:
    raw = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + length])[name]["data_offsets"]
    raw[8 + length + (begin + end) // 2] ^= 0xFF
    file.write_bytes(bytes(raw))


def _write(tmp_path: Path, layout: str) -> tuple[Path, Path, str]:
    """A saved model: (what to load, the file to damage, the stored name to damage)."""
    model = _model(0)
    if layout == "file":
        path = tmp_path / "model.safetensors"
        tk.save(model, path)
        return path, path, "body.weight"
    if layout == "sharded":
        path = tmp_path / "sharded"
        tk.save(model, path, max_shard_size=40_000)
        index = json.loads(next(path.glob("*.index.json")).read_text())
        return path, path / index["weight_map"]["body.weight"], "body.weight"
    path = Path(tk.save_checkpoint(tmp_path / "ckpt", model=model))
    manifest = json.loads((path / "checkpoint.json").read_text())
    return path, path / manifest["tensors"]["model.body.weight"]["file"], "model.body.weight"


@pytest.mark.parametrize("layout", ["file", "sharded", "checkpoint"])
def test_verified_loads_give_torchs_values(tmp_path: Path, layout: str) -> None:
    path, _, _ = _write(tmp_path, layout)
    model = _model(1)
    tk.load(model, path, verify=True)
    reference = _model(1)
    reference.load_state_dict(_model(0).state_dict())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    probe = torch.arange(5)
    assert torch.equal(model.body(model.emb(probe)), reference.body(reference.emb(probe)))


@pytest.mark.parametrize("layout", ["file", "sharded", "checkpoint"])
def test_a_damaged_tensor_leaves_the_model_untouched(tmp_path: Path, layout: str) -> None:
    path, file, name = _write(tmp_path, layout)
    _flip(file, name)
    model = _model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ChecksumError, match=name.replace(".", r"\.")):
        tk.load(model, path, verify=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    if layout == "checkpoint":
        with pytest.raises(ChecksumError, match=name.replace(".", r"\.")):
            tk.load_checkpoint(path, model=model, verify=True)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _spans(file: Path, fd: int, seen: dict[str, bytes]) -> list[io_read.Span]:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]

        def landed(data: memoryview, name: str = name) -> None:
            assert name not in seen  # once per span
            seen[name] = bytes(data)

        spans.append(io_read.Span(fd, 8 + length + begin, end - begin, str(file), name, landed))
    empty = io_read.Span(fd, 8, 0, str(file), "empty", lambda d: seen.setdefault("empty", bytes(d)))
    return [*spans, empty]


@pytest.mark.parametrize("batch", [1, 4096, 1 << 30])
@pytest.mark.parametrize("threads", [1, 3])
def test_check_spans_hands_every_hook_its_bytes_once(
    tmp_path: Path, batch: int, threads: int
) -> None:
    file = tmp_path / "model.safetensors"
    tk.save(_model(0), file)
    _check_every_span(file, threads=threads, batch=batch)


def _check_every_span(file: Path, **options: int) -> None:
    """``check_spans`` over every tensor of ``file`` hands each hook the file's bytes, once."""
    raw = file.read_bytes()
    seen: dict[str, bytes] = {}
    fd = os.open(file, os.O_RDONLY)
    try:
        spans = _spans(file, fd, seen)
        io_read.check_spans(spans, **options)
    finally:
        os.close(fd)
    assert seen.keys() == {s.name for s in spans}
    for span in spans:
        assert seen[span.name] == raw[span.offset : span.offset + span.nbytes], span.name


def test_a_file_that_cannot_be_mapped_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(19, "No such device")

    monkeypatch.setattr(io_read.mmap, "mmap", refuse)
    file = tmp_path / "model.safetensors"
    tk.save(_model(0), file)
    _check_every_span(file, threads=2)
    _flip(file, "norm.weight")
    with pytest.raises(ChecksumError, match=r"norm\.weight"):
        tk.load(_model(1), file, verify=True)


def test_a_short_file_is_refused_before_any_hook_runs(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    tk.save(_model(0), file)
    seen: dict[str, bytes] = {}
    fd = os.open(file, os.O_RDONLY)
    try:
        spans = _spans(file, fd, seen)
        os.truncate(file, file.stat().st_size - 10)
        with pytest.raises(CorruptFileError, match="is truncated"):
            io_read.check_spans(spans)
    finally:
        os.close(fd)
    assert seen == {}
