"""Low-memory loading (meta device + assign) and dtype casting on load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import Tied
from torch import nn

import torchkeep as tk

ROOT = Path(__file__).parent.parent


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("scale", torch.arange(4.0), persistent=False)


def test_meta_model_loads_by_assignment(tmp_path: Path) -> None:
    source = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    source[1].running_mean.fill_(0.5)
    path = tmp_path / "m.safetensors"
    tk.save(source, path)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    report = tk.load(model, path, assign=True)
    assert report.ok and len(report.loaded) == 9
    for name, value in source.state_dict().items():
        assert model.state_dict()[name].device.type == "cpu"
        assert torch.equal(model.state_dict()[name], value), name
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.requires_grad
    model(torch.randn(3, 4)).sum().backward()  # a working model
    assert model[0].weight.grad is not None


def test_assign_keeps_tied_weights_tied(tmp_path: Path) -> None:
    path = tmp_path / "tied.pt"
    tk.save(Tied(), path)
    with torch.device("meta"):
        model = Tied()
    assert tk.load(model, path, assign=True).ok
    assert model.head.weight is model.emb.weight and model.emb.weight.device.type == "cpu"


def test_assign_with_dtype_and_a_strict_refusal(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tk.save(nn.Linear(4, 3), path)
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    tk.load(model, path, assign=True, dtype=torch.bfloat16)
    assert model.weight.dtype == torch.bfloat16 and model.weight.device.type == "cpu"
    with torch.device("meta"):
        wrong = nn.Linear(4, 5)
    with pytest.raises(tk.KeyMismatchError):
        tk.load(wrong, path, assign=True)
    assert wrong.weight.device.type == "meta"  # nothing was assigned


def test_meta_leftovers_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tk.save(WithBuffer(), path)
    with torch.device("meta"):
        model = WithBuffer()
    with pytest.warns(tk.TorchkeepWarning, match="scale"):
        tk.load(model, path, assign=True)


def test_dtype_casts_floating_tensors_only(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    tk.save(nn.BatchNorm1d(3), path)
    state = tk.load_state_dict(path, dtype=torch.float16)
    assert state["weight"].dtype == torch.float16
    assert state["num_batches_tracked"].dtype == torch.int64
    model = nn.BatchNorm1d(3)
    report = tk.load(model, path, dtype=torch.bfloat16)
    assert report.ok and model.weight.dtype == torch.bfloat16
    assert model.num_batches_tracked.dtype == torch.int64
    with pytest.raises(ValueError, match="floating"):
        tk.load_state_dict(path, dtype=torch.int32)


@pytest.mark.slow
def test_peak_memory_stays_near_one_copy_of_the_weights() -> None:
    """Real processes, real ru_maxrss: torch's recipe peaks at two copies, assign at one."""
    spec = importlib.util.spec_from_file_location("rss", ROOT / "benchmarks" / "rss.py")
    assert spec is not None and spec.loader is not None
    rss = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rss)
    layers = 6  # 96 MB of weights
    size = rss.weights_mb(layers)
    results = rss.measure(layers, ("torch", "torchkeep-assign"))
    assert results["torch"]["growth_mb"] > 1.7 * size, results
    assert results["torchkeep-assign"]["growth_mb"] < 1.25 * size, results
