"""Training checkpoints read through the weights API: load, load_state_dict, inspect."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import Net, assert_same_state

import torchkeep as tk


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Net, Path]:
    model, ema = Net(), Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tk.save_checkpoint(
        tmp_path / "ckpt", model=model, ema=ema, optimizer=optimizer, epoch=4, tag="best"
    )
    return model, path


def test_weights_of_a_native_checkpoint_load_into_a_model(checkpoint) -> None:
    model, path = checkpoint
    fresh = Net()
    report = tk.load(fresh, path)
    assert report.ok and report.format == "torchkeep-checkpoint" and report.entry == "model"
    assert_same_state(fresh, model.state_dict())
    assert list(tk.load_state_dict(path)) == list(model.state_dict())
    assert set(tk.load_state_dict(path, entry="ema")) == set(model.state_dict())


def test_inspect_describes_the_other_entries(checkpoint) -> None:
    _, path = checkpoint
    info = tk.inspect(path)
    assert info.entries == {"model": 9, "ema": 9}
    assert info.extras["epoch"] == "4" and info.extras["tag"] == "best"  # plain, not quoted
    (optimizer,) = info.training.optimizers
    assert optimizer.type == "SGD" and optimizer.hyperparameters["momentum"] == "0.9"


def test_verify_names_a_damaged_tensor(checkpoint) -> None:
    _, path = checkpoint
    shard = sorted(path.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(tk.ChecksumError, match="is damaged"):
        tk.load(Net(), path, verify=True)


def test_a_manager_folder_points_at_its_steps(tmp_path: Path) -> None:
    manager = tk.CheckpointManager(tmp_path / "run")
    manager.save(7, model=Net())
    with pytest.raises(tk.CheckpointNotFoundError, match="step-00000007"):
        tk.load_state_dict(tmp_path / "run")
