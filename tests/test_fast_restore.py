"""load_checkpoint and restore read a module's tensors straight into its own tensors.

Every restore is compared with torch's own path, ``model.load_state_dict`` of the decoded
tensors: same parameters, same buffers, same outputs on a fixed input. The checks that come
before any byte lands (names, shapes, checksums) and the report of a read that fails midway
are tested by making them happen.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.errors import CheckpointReadError, ChecksumError, KeyMismatchError
from torchkeep.formats.native import NativeCheckpoint
from torchkeep.io import read as io_read


class Scaled(nn.Module):
    """Keeps a non-tensor in its extra state: loaded by its own ``set_extra_state``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8))
        self.factor = 1.0

    def get_extra_state(self) -> Any:
        return {"factor": self.factor}

    def set_extra_state(self, state: Any) -> None:
        self.factor = state["factor"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight * self.factor


class Model(nn.Module):
    """Plain layers, a BatchNorm (its own ``_load_from_state_dict``), tied weights, a
    buffer, and extra state."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.body = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.scaled = Scaled()
        self.head = nn.Linear(8, 50, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("offset", torch.zeros(8))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.body(self.emb(tokens)) + self.offset)
        return self.head(self.scaled(hidden))


def _trained(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    model = Model()
    with torch.no_grad():
        model.offset.uniform_()
        model.norm.running_mean.uniform_()
        model.norm.num_batches_tracked.fill_(5)
    model.scaled.factor = 2.5
    return model


def _fresh(seed: int = 1) -> Model:
    torch.manual_seed(seed)
    return Model()


TOKENS = torch.arange(12) % 50


def _torch_reference(folder: Path) -> Model:
    """The same restore by torch's own path: load_state_dict of the decoded entry."""
    reference = _fresh()
    reference.load_state_dict(tk.load_checkpoint(folder)["model"])
    return reference


def _assert_same_model(got: nn.Module, expected: nn.Module) -> None:
    ours, theirs = got.state_dict(), expected.state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        if isinstance(tensor, torch.Tensor):
            assert ours[name].dtype == tensor.dtype, name
            assert torch.equal(ours[name], tensor), name
        else:
            assert ours[name] == tensor, name
    got.eval()
    expected.eval()
    with torch.no_grad():
        assert torch.equal(got(TOKENS), expected(TOKENS))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return all(torch.equal(now[k], v) for k, v in before.items())


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return Path(tk.save_checkpoint(tmp_path / "ckpt", model=_trained(), step=3))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Which stored tensors were read into new tensors, and which into existing ones."""
    seen: dict[str, list[str]] = {"new": [], "into": []}
    read, read_into = NativeCheckpoint.read, NativeCheckpoint.read_into

    def spy_read(self: NativeCheckpoint, names: Any, **kwargs: Any) -> Any:
        names = list(names)
        seen["new"] += names
        return read(self, names, **kwargs)

    def spy_read_into(self: NativeCheckpoint, pairs: Any, **kwargs: Any) -> None:
        seen["into"] += [name for name, _ in pairs]
        read_into(self, pairs, **kwargs)

    monkeypatch.setattr(NativeCheckpoint, "read", spy_read)
    monkeypatch.setattr(NativeCheckpoint, "read_into", spy_read_into)
    return seen


@pytest.mark.parametrize("verify", [False, True])
def test_restore_matches_torchs_own_path(
    folder: Path, reads: dict[str, list[str]], verify: bool
) -> None:
    model = _fresh()
    pointers = {k: v.data_ptr() for k, v in _snapshot(model).items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items() if k in pointers}
    left = tk.load_checkpoint(folder, model=model, verify=verify)
    seen = {kind: list(names) for kind, names in reads.items()}
    assert left["step"] == 3
    _assert_same_model(model, _torch_reference(folder))
    assert model.head.weight is model.emb.weight
    assert model.scaled.factor == 2.5  # set_extra_state ran
    # Read in place: the model keeps its tensors, and its plain ones are never read into
    # new tensors first.
    assert {k: model.state_dict()[k].data_ptr() for k in pointers} == pointers
    assert {"model.body.weight", "model.emb.weight", "model.offset"} <= set(seen["into"])
    assert not {"model.body.weight", "model.emb.weight", "model.offset"} & set(seen["new"])
    # BatchNorm loads itself (version fix-ups): its tensors go through load_state_dict.
    assert "model.norm.running_mean" in seen["new"]
    assert seen["into"].count("model.emb.weight") == 1  # tied: read once


@pytest.mark.parametrize("wrap", ["plain", "module.", "_orig_mod."])
def test_wrapped_models_and_the_manager(tmp_path: Path, wrap: str) -> None:
    source = _trained()
    saved: nn.Module = source
    if wrap == "module.":
        saved = nn.DataParallel(source)
    elif wrap == "_orig_mod.":
        saved = torch.compile(source)
    manager = tk.CheckpointManager(tmp_path / "runs")
    manager.save(1, model=saved)
    inner = _fresh()
    target: nn.Module = nn.DataParallel(inner) if wrap != "module." else inner
    manager.restore(model=target)
    _assert_same_model(inner, source)


def test_a_model_of_another_dtype_is_cast_as_torch_does(folder: Path) -> None:
    model = _fresh().double()
    tk.load_checkpoint(folder, model=model)
    reference = _fresh().double()
    reference.load_state_dict(tk.load_checkpoint(folder)["model"])
    _assert_same_model(model, reference)
    assert model.body.weight.dtype == torch.float64


def test_non_strict_loads_what_fits_as_torch_does(folder: Path) -> None:
    model = _fresh()
    model.body = nn.Linear(8, 9)  # a new shape: left out
    model.norm = nn.BatchNorm1d(9)
    model.extra = nn.Linear(2, 2)  # not in the checkpoint
    before = _snapshot(model)
    tk.load_checkpoint(folder, model=model, strict=False)
    saved = tk.load_checkpoint(folder)["model"]
    for name, tensor in before.items():
        fits = name in saved and saved[name].shape == tensor.shape
        assert torch.equal(model.state_dict()[name], saved[name] if fits else tensor), name
    assert torch.equal(model.emb.weight, saved["emb.weight"])


def test_a_mismatch_is_refused_before_any_byte_lands(
    folder: Path, reads: dict[str, list[str]]
) -> None:
    model = _fresh()
    model.body = nn.Linear(8, 9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = _snapshot(model)
    with pytest.raises(KeyMismatchError, match=r"body\.weight"):
        tk.load_checkpoint(folder, model=model)
    assert _unchanged(model, before)
    assert reads["into"] == []
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_a_damaged_tensor_leaves_every_target_untouched(tmp_path: Path) -> None:
    model = _trained()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(TOKENS).sum().backward()
    optimizer.step()
    folder = Path(tk.save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer))
    manifest = json.loads((folder / "checkpoint.json").read_text())
    info = manifest["tensors"]["model.body.weight"]
    shard = folder / info["file"]
    raw = bytearray(shard.read_bytes())
    (length,) = (int.from_bytes(raw[:8], "little"),)
    begin, end = json.loads(raw[8 : 8 + length])["model.body.weight"]["data_offsets"]
    raw[8 + length + (begin + end) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    target = _fresh()
    target_opt = torch.optim.Adam(target.parameters(), lr=0.5)
    before = _snapshot(target)
    with pytest.raises(ChecksumError, match=r"'model\.body\.weight'"):
        tk.load_checkpoint(folder, model=target, optimizer=target_opt, verify=True)
    assert _unchanged(target, before)
    assert target_opt.param_groups[0]["lr"] == 0.5 and not target_opt.state


def test_a_read_failing_midway_says_what_was_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = _trained()
    folder = tmp_path / "ckpt"
    tk.save_checkpoint(folder, model=saved, optimizer=torch.optim.SGD(saved.parameters(), lr=0.1))
    monkeypatch.setattr(io_read, "SEQUENTIAL_BELOW", 1 << 40)  # one thread: a known order
    calls = {"into": False, "n": 0}
    readv, read_into = io_read.readv, NativeCheckpoint.read_into

    def failing(fd: int, views: Any, offset: int) -> int:
        if calls["into"]:  # reading into the model: one tensor, then the disk fails
            calls["n"] += 1
            if calls["n"] > 1:
                raise OSError(errno.EIO, "Input/output error")
            views = views[:1]
        return readv(fd, views, offset)

    def into(self: NativeCheckpoint, pairs: Any, **kwargs: Any) -> None:
        calls["into"] = True
        read_into(self, pairs, **kwargs)

    monkeypatch.setattr(io_read, "readv", failing)
    monkeypatch.setattr(NativeCheckpoint, "read_into", into)
    model = _fresh()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = _snapshot(model)
    with pytest.raises(CheckpointReadError, match="partly overwritten") as caught:
        tk.load_checkpoint(folder, model=model, optimizer=optimizer)
    message = str(caught.value)
    assert "no other target was restored" in message
    named = message.split("checkpoint (")[1].split(")")[0].split(", ")
    changed = [k for k in before if not torch.equal(model.state_dict()[k], before[k])]
    assert changed and set(changed) <= set(named)  # every changed tensor is named
    assert set(named) < set(before)  # and not the whole model
    assert optimizer.param_groups[0]["lr"] == 0.5
