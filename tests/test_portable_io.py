"""The positional-I/O fallbacks, forced on this machine: same files, same tensors, same errors.

Windows has neither ``os.preadv``/``os.pwritev`` nor ``os.pread``/``os.pwrite``; older macOS
lacks the vectored calls. Every save and load path runs here in each mode, and the files
written must be byte-identical to the fast path's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.io import positional
from torchkeep.io import read as io_read
from torchkeep.io import write as io_write


@pytest.fixture(params=positional.MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(positional, "MODE", request.param)
    # Threads on: the seek mode's per-file lock and the positional copies run concurrently.
    monkeypatch.setenv("TORCHKEEP_IO_THREADS", "4")
    monkeypatch.setattr(io_read, "SEQUENTIAL_BELOW", 0)
    monkeypatch.setattr(io_write, "SEQUENTIAL_BELOW", 0)
    # Tensors read in many os.pread pieces, one ending mid-tensor.
    monkeypatch.setattr(positional, "PREAD_PIECE", 1000)
    yield request.param


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10))
    model.register_buffer("steps", torch.arange(7))
    return model


def same(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The fast path's files."""
    folder = tmp_path_factory.mktemp("fast")
    tk.save(net(), folder / "net.safetensors")
    tk.save(net(), folder / "shards", max_shard_size="20KB")
    return {
        "net.safetensors": (folder / "net.safetensors").read_bytes(),
        **{p.name: p.read_bytes() for p in sorted((folder / "shards").iterdir())},
    }


def test_files_are_byte_identical_and_load_back(
    mode: str, tmp_path: Path, reference: dict[str, bytes]
) -> None:
    model = net()
    tk.save(model, tmp_path / "net.safetensors")
    tk.save(model, tmp_path / "shards", max_shard_size="20KB")
    assert (tmp_path / "net.safetensors").read_bytes() == reference["net.safetensors"]
    for shard in (tmp_path / "shards").iterdir():
        assert shard.read_bytes() == reference[shard.name], shard.name
    for path in (tmp_path / "net.safetensors", tmp_path / "shards"):
        other = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10))
        other.register_buffer("steps", torch.zeros(7, dtype=torch.int64))
        assert tk.load(other, path, verify=True).ok
        assert same(model, other)
        assert tk.verify(path).ok
    state = tk.load_state_dict(tmp_path / "net.safetensors")
    assert torch.equal(state["2.weight"], model.state_dict()["2.weight"])


def test_checkpoints_and_conversions(mode: str, tmp_path: Path) -> None:
    model = net()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 64)).sum().backward()
    optimizer.step()
    tk.save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, epoch=3)
    fresh = net()
    fresh_opt = torch.optim.Adam(fresh.parameters())
    assert tk.load_checkpoint(tmp_path / "ckpt", model=fresh, optimizer=fresh_opt, verify=True) == {
        "epoch": 3
    }
    assert same(model, fresh)
    result = tk.convert(tmp_path / "ckpt", tmp_path / "out.safetensors", dtype=torch.bfloat16)
    assert result.tensors == len(model.state_dict())
    assert tk.verify(tmp_path / "out.safetensors").ok


def test_a_truncated_file_is_refused_in_every_mode(mode: str, tmp_path: Path) -> None:
    path = tmp_path / "net.safetensors"
    tk.save(net(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(tk.CorruptFileError):
        tk.load_state_dict(path)
    assert not tk.verify(path).ok


def test_a_mode_is_chosen_or_refused() -> None:
    assert positional.choose() in positional.MODES
    assert positional.choose("seek") == "seek"
    with pytest.raises(tk.InvalidArgumentError, match="not a mode"):
        positional.choose("mmap")
