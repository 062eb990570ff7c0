"""Saving: formats, wrappers, tied and non-contiguous tensors, atomicity, classic mistakes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from unittest import mock

import pytest
import safetensors.torch
import torch
from conftest import Net, Tied
from torch import nn

import torchkeep as tk
from torchkeep.formats import registry
from torchkeep.formats.safetensors import SafetensorsFormat

SUFFIXES = [".safetensors", ".pt", ".pth", ".bin", ".pkl", ".ckpt"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_every_suffix(tmp_path: Path, suffix: str) -> None:
    model = Net()
    path = tk.save(model, tmp_path / f"net{suffix}")
    loaded = tk.load_state_dict(path)
    assert _same(loaded, model.state_dict())
    fresh = Net()
    assert tk.load(fresh, path).ok
    assert _same(fresh.state_dict(), model.state_dict())


def test_legacy_and_sharded_round_trips(tmp_path: Path) -> None:
    model = Net()
    legacy = tk.save(model, tmp_path / "legacy.pt", format="torch-legacy")
    assert registry.detect(legacy)[1].name == "torch-legacy"
    sharded = tk.save(model, tmp_path / "sharded", max_shard_size=200)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    for path in (legacy, sharded):
        assert _same(tk.load_state_dict(path), model.state_dict())


def test_our_files_load_in_the_reference_libraries(tmp_path: Path) -> None:
    model = Net()
    st = tk.save(model, tmp_path / "net.safetensors", metadata={"author": "me"})
    pt = tk.save(model, tmp_path / "net.pt")
    assert _same(
        {k: safetensors.torch.load_file(st)[k] for k in model.state_dict()}, model.state_dict()
    )
    with safetensors.safe_open(st, framework="pt") as f:
        assert f.metadata()["author"] == "me"
    assert _same(dict(torch.load(pt, weights_only=True)), model.state_dict())


def test_sharded_folder_loads_shard_by_shard_in_the_reference_library(tmp_path: Path) -> None:
    model = Net()
    folder = tk.save(model, tmp_path / "out", max_shard_size="0.0003MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        merged.update(safetensors.torch.load_file(folder / shard))
    assert _same({k: merged[k] for k in model.state_dict()}, model.state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: nn.DataParallel(m),
        lambda m: nn.DataParallel(nn.DataParallel(m)),
        lambda m: torch.compile(m),
    ],
    ids=["dataparallel", "nested-dataparallel", "compile"],
)
def test_wrapped_modules_save_under_canonical_names(tmp_path: Path, wrap) -> None:
    model = Net()
    path = tk.save(wrap(model), tmp_path / "net.safetensors")
    assert list(tk.load_state_dict(path)) == list(model.state_dict())


def test_compiled_submodule_names_are_canonical(tmp_path: Path) -> None:
    model = Net()
    model.fc = torch.compile(model.fc)
    assert "fc._orig_mod.weight" in model.state_dict()
    path = tk.save(model, tmp_path / "net.pt")
    assert "fc.weight" in tk.load_state_dict(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tied_weights_are_stored_once_and_load_tied(tmp_path: Path, suffix: str) -> None:
    model = Tied()
    path = tk.save(model, tmp_path / f"tied{suffix}")
    state = tk.load_state_dict(path)
    assert list(state) == ["emb.weight", "head.weight"]
    assert state["emb.weight"].data_ptr() == state["head.weight"].data_ptr()
    if suffix == ".safetensors":
        header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
        header = json.loads(path.read_bytes()[8 : 8 + header_len])
        assert "head.weight" not in header
        assert json.loads(header["__metadata__"]["torchkeep.aliases"]) == {
            "head.weight": "emb.weight"
        }
        assert path.stat().st_size < 10 * 4 * 4 + len(json.dumps(header)) + 100
    fresh = Tied()
    assert tk.load(fresh, path).ok
    assert fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, model.emb.weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_non_contiguous_and_view_tensors(tmp_path: Path, suffix: str) -> None:
    big = torch.arange(10_000, dtype=torch.float32).reshape(100, 100)
    state = {"t": big.t(), "slice": big[::7, 3:9], "row": big[5], "scalar": big[1, 1]}
    path = tk.save(state, tmp_path / f"views{suffix}")
    loaded = tk.load_state_dict(path)
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name
    # Views are written with their own bytes, not their whole 40 KB storage each.
    assert path.stat().st_size < 60_000


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.bool, torch.uint8]
)
def test_dtypes_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    value = (torch.randn(3, 5) * 10).to(dtype)
    path = tk.save(
        {"x": value, "empty": torch.zeros(0, 4, dtype=dtype)}, tmp_path / "d.safetensors"
    )
    loaded = tk.load_state_dict(path)
    assert loaded["x"].dtype == dtype and torch.equal(loaded["x"], value)
    assert loaded["empty"].shape == (0, 4)


def test_parameters_and_requires_grad_are_plain_tensors_on_disk(tmp_path: Path) -> None:
    path = tk.save({"p": nn.Parameter(torch.ones(2))}, tmp_path / "p.pt")
    loaded = torch.load(path, weights_only=True)
    assert type(loaded["p"]) is torch.Tensor


def test_passing_the_state_dict_method_is_named(tmp_path: Path) -> None:
    with pytest.raises(tk.InvalidStateError, match=r"model\.state_dict\(\)") as info:
        tk.save(Net().state_dict, tmp_path / "x.safetensors")
    assert isinstance(info.value, TypeError)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "obj, message",
    [
        (nn.ReLU(), "holds no tensors"),
        ({}, "holds no tensors"),
        ({"epoch": 3, "w": torch.ones(1)}, "int at 'epoch'"),
        (torch.ones(3), "single tensor"),
        (torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), "save_checkpoint"),
        ("model.pt", "cannot save a builtins.str"),
    ],
)
def test_objects_without_weights_are_refused(tmp_path: Path, obj, message: str) -> None:
    with pytest.raises(tk.InvalidStateError, match=message):
        tk.save(obj, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_tensors_are_explained(tmp_path: Path) -> None:
    with pytest.raises(tk.UnsupportedTensorError, match="to_dense"):
        tk.save({"s": torch.eye(3).to_sparse()}, tmp_path / "s.safetensors")
    with pytest.raises(tk.InvalidStateError, match="meta device"):
        tk.save({"m": torch.empty(3, device="meta")}, tmp_path / "m.pt")


def test_unknown_suffix_needs_a_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="suffix"):
        tk.save(Net(), tmp_path / "weights.data")
    path = tk.save(Net(), tmp_path / "weights.data", format="safetensors")
    assert registry.detect(path)[1].name == "safetensors"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_failed_save_leaves_the_previous_file_whole(tmp_path: Path, suffix: str) -> None:
    first = Net()
    path = tk.save(first, tmp_path / f"net{suffix}")
    before = path.read_bytes()
    fmt = registry.for_writing(path, None, sharded=False)

    def explode(request, target: Path) -> None:
        target.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with mock.patch.object(type(fmt), "write", side_effect=explode), pytest.raises(OSError):
        tk.save(Net(), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [path.name]
    assert _same(tk.load_state_dict(path), first.state_dict())


def test_a_failed_sharded_save_leaves_the_previous_folder(tmp_path: Path) -> None:
    first = Net()
    folder = tk.save(first, tmp_path / "out", max_shard_size=300)
    names = sorted(os.listdir(folder))
    with (
        mock.patch.object(
            SafetensorsFormat, "write", side_effect=OSError(28, "No space left on device")
        ),
        pytest.raises(OSError),
    ):
        tk.save(Net(), folder, max_shard_size=300)
    assert sorted(os.listdir(folder)) == names
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert _same(tk.load_state_dict(folder), first.state_dict())


def test_overwrite_replaces_the_file(tmp_path: Path) -> None:
    path = tk.save(Net(), tmp_path / "net.safetensors")
    second = Net()
    tk.save(second, path)
    assert _same(tk.load_state_dict(path), second.state_dict())
