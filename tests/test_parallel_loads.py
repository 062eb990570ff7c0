"""The batch reads behind load_state_dict, load_checkpoint and restore, and hashing as bytes land.

Every case runs with one reading thread and with several on tiny files (the threaded path,
tensors cut between threads), and compares with the saved values; ``verify`` must catch a
flipped byte whether or not the load reads that tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Net
from torch import nn

import torchkeep as tk
from torchkeep.errors import ChecksumError, CorruptFileError
from torchkeep.io import positional
from torchkeep.io import read as io_read


class Wide(nn.Module):
    """A few tensors large enough to be cut between threads, one tied pair, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 64)
        self.body = nn.Linear(64, 256)
        self.norm = nn.BatchNorm1d(256)
        self.head = nn.Linear(64, 300, bias=False)
        self.head.weight = self.emb.weight


@pytest.fixture(params=[("1", None), ("4", 0), ("2", 0)], ids=["1-thread", "4-threads", "2"])
def reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    threads, below = request.param
    monkeypatch.setenv("TORCHKEEP_IO_THREADS", threads)
    if below is not None:
        monkeypatch.setattr(io_read, "SEQUENTIAL_BELOW", below)


def _model() -> Wide:
    torch.manual_seed(0)
    model = Wide()
    model.norm.running_mean.uniform_()
    model.norm.num_batches_tracked.fill_(7)
    return model


def _same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def _tensor_bytes(file: Path, name: str) -> tuple[int, int]:
    """Where ``name``'s bytes are in a safetensors file."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + length])[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def _flip(file: Path, name: str) -> None:
    begin, end = _tensor_bytes(file, name)
    data = bytearray(file.read_bytes())
    data[(begin + end) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _shard_of(folder: Path, name: str) -> Path:
    manifest = json.loads((folder / "checkpoint.json").read_text())
    return folder / manifest["tensors"][name]["file"]


# ------------------------------------------------------------------------ load_state_dict


@pytest.mark.usefixtures("reading")
@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_load_state_dict_reads_what_was_saved(tmp_path: Path, layout: str) -> None:
    model = _model()
    expected = model.state_dict()
    path = tmp_path / ("model.safetensors" if layout == "file" else "sharded")
    tk.save(model, path, **({"max_shard_size": 40_000} if layout == "sharded" else {}))
    if layout == "sharded":
        assert len(list(path.glob("*.safetensors"))) > 1
    got = tk.load_state_dict(path, verify=True)
    _same(got, expected)
    assert got["head.weight"] is got["emb.weight"]  # tied names share one tensor
    fresh = Wide()
    fresh.load_state_dict(got)
    _same(fresh.state_dict(), expected)


def test_load_state_dict_of_a_torch_file_keeps_module_versions(tmp_path: Path) -> None:
    model = _model()
    expected = model.state_dict()
    path = tmp_path / "model.pt"
    torch.save(expected, path)
    got = tk.load_state_dict(path, verify=True, dtype=torch.float64)
    assert got._metadata == expected._metadata  # type: ignore[attr-defined]
    assert got["body.weight"].dtype == torch.float64


@pytest.mark.usefixtures("reading")
def test_load_state_dict_casts_after_the_read(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "model.safetensors"
    tk.save(model, path)
    got = tk.load_state_dict(path, dtype=torch.float16, device="cpu")
    assert got["body.weight"].dtype == torch.float16
    assert torch.equal(got["body.weight"], model.body.weight.detach().half())
    assert got["norm.num_batches_tracked"].dtype == torch.int64  # integers keep theirs
    assert got["head.weight"] is got["emb.weight"]


@pytest.mark.usefixtures("reading")
def test_load_state_dict_of_a_training_checkpoint(tmp_path: Path) -> None:
    model, ema = _model(), Net()
    optimizer = torch.optim.Adam(model.parameters())
    model.body(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    folder = tk.save_checkpoint(tmp_path / "ckpt", model=model, ema=ema, optimizer=optimizer)
    _same(tk.load_state_dict(folder, verify=True), model.state_dict())
    _same(tk.load_state_dict(folder, entry="ema"), ema.state_dict())


# ------------------------------------------------------------------ load_checkpoint/restore


def _training_state() -> dict[str, Any]:
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.body(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    extra = {
        "history": [torch.arange(5), torch.ones(2, 3)],
        "nested": {"a": {"b": (torch.full((3,), 2.5), 4)}, "empty": torch.empty(0)},
        "step": 11,
    }
    return {"model": model, "optimizer": optimizer, "extra": extra}


def _check_restored(state: dict[str, Any], left: dict[str, Any], model: Wide, opt: Any) -> None:
    _same(model.state_dict(), state["model"].state_dict())
    assert model.head.weight is model.emb.weight
    saved = state["optimizer"].state_dict()["state"]
    for key, values in opt.state_dict()["state"].items():
        for name, value in values.items():
            assert torch.equal(value, saved[key][name]), (key, name)
    extra = left["extra"]
    assert all(
        torch.equal(a, b) for a, b in zip(extra["history"], state["extra"]["history"], strict=True)
    )
    assert torch.equal(extra["nested"]["a"]["b"][0], state["extra"]["nested"]["a"]["b"][0])
    assert extra["nested"]["empty"].shape == (0,) and extra["step"] == 11


@pytest.mark.usefixtures("reading")
@pytest.mark.parametrize("verify", [False, True])
def test_load_checkpoint_restores_every_value(tmp_path: Path, verify: bool) -> None:
    state = _training_state()
    folder = tk.save_checkpoint(tmp_path / "ckpt", max_shard_size=30_000, **state)
    assert len(list(Path(folder).glob("*.safetensors"))) > 1
    model = Wide()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    left = tk.load_checkpoint(folder, model=model, optimizer=optimizer, verify=verify)
    _check_restored(state, left, model, optimizer)


@pytest.mark.usefixtures("reading")
def test_manager_restore_reads_in_one_batch(tmp_path: Path) -> None:
    state = _training_state()
    manager = tk.CheckpointManager(tmp_path / "runs")
    manager.save(3, **state)
    model = Wide()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    left = manager.restore(model=model, optimizer=optimizer, verify=True)
    _check_restored(state, left, model, optimizer)


@pytest.mark.parametrize("mode", positional.MODES)
def test_every_io_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    if mode not in positional._available():
        pytest.skip(f"this platform has no {mode} reads")
    monkeypatch.setattr(positional, "MODE", mode)
    monkeypatch.setattr(io_read, "SEQUENTIAL_BELOW", 0)
    monkeypatch.setenv("TORCHKEEP_IO_THREADS", "3")
    state = _training_state()
    folder = tk.save_checkpoint(tmp_path / "ckpt", **state)
    model = Wide()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    left = tk.load_checkpoint(folder, model=model, optimizer=optimizer, verify=True)
    _check_restored(state, left, model, optimizer)
    path = tmp_path / "model.safetensors"
    tk.save(state["model"], path)
    _same(tk.load_state_dict(path, verify=True), state["model"].state_dict())


# ------------------------------------------------------------------------------ damage


@pytest.mark.usefixtures("reading")
def test_verify_catches_a_flipped_byte_in_a_tensor_read(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tk.save(_model(), path)
    _flip(path, "body.weight")
    tk.load_state_dict(path)  # unverified: the damage goes unseen
    with pytest.raises(ChecksumError, match=r"'body\.weight'.*data bytes \d+ to \d+"):
        tk.load_state_dict(path, verify=True)


@pytest.mark.usefixtures("reading")
def test_verify_catches_a_flipped_byte_in_a_sharded_folder(tmp_path: Path) -> None:
    path = tmp_path / "sharded"
    tk.save(_model(), path, max_shard_size=40_000)
    index = json.loads(next(path.glob("*.index.json")).read_text())
    _flip(path / index["weight_map"]["norm.running_mean"], "norm.running_mean")
    with pytest.raises(ChecksumError, match="norm.running_mean"):
        tk.load_state_dict(path, verify=True)


@pytest.mark.usefixtures("reading")
def test_verify_checks_tensors_the_load_does_not_read(tmp_path: Path) -> None:
    state = _training_state()
    folder = Path(tk.save_checkpoint(tmp_path / "ckpt", **state))
    # The optimizer's moment: not part of the weights load_state_dict returns.
    name = next(
        n
        for n in json.loads((folder / "checkpoint.json").read_text())["tensors"]
        if n.startswith("optimizer.") and n.endswith("exp_avg")
    )
    _flip(_shard_of(folder, name), name)
    tk.load_state_dict(folder)
    with pytest.raises(ChecksumError, match=name.replace(".", r"\.")):
        tk.load_state_dict(folder, verify=True)
    # Restoring the model alone reads no optimizer tensor, yet verify checks it.
    model = Wide()
    with pytest.raises(ChecksumError, match="Load an earlier checkpoint"):
        tk.load_checkpoint(folder, model=model, verify=True, strict=False)


@pytest.mark.usefixtures("reading")
def test_verify_catches_a_flipped_byte_in_a_restored_tensor(tmp_path: Path) -> None:
    state = _training_state()
    folder = Path(tk.save_checkpoint(tmp_path / "ckpt", **state))
    _flip(_shard_of(folder, "model.body.weight"), "model.body.weight")
    model = Wide()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    tk.load_checkpoint(folder, model=model, optimizer=optimizer)  # unverified
    with pytest.raises(ChecksumError, match=r"'model\.body\.weight'"):
        tk.load_checkpoint(folder, model=Wide(), optimizer=optimizer, verify=True)


@pytest.mark.usefixtures("reading")
def test_truncated_files_are_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tk.save(_model(), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptFileError):
        tk.load_state_dict(path)
    folder = Path(tk.save_checkpoint(tmp_path / "ckpt", **_training_state()))
    shard = _shard_of(folder, "model.body.weight")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptFileError):
        tk.load_checkpoint(folder, model=Wide())


def test_a_cut_tensor_is_hashed_once_all_its_pieces_are_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(io_read, "SEQUENTIAL_BELOW", 0)
    file = tmp_path / "data.bin"
    payload = bytes(range(256)) * 1000
    file.write_bytes(payload)
    seen: list[bytes] = []
    dest = bytearray(len(payload))
    with open(file, "rb") as f:
        extent = io_read.ReadExtent(
            f.fileno(), 0, memoryview(dest), str(file), "t", lambda v: seen.append(bytes(v))
        )
        io_read.read_extents([extent], threads=4)
    assert seen == [payload]
