"""torchkeep.weights.module_info: describing a live module."""

from __future__ import annotations

import pytest
import torch
from conftest import Tied
from torch import nn

from torchkeep.weights.module_info import inspect_module


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_counts_tree_and_buffers() -> None:
    info = inspect_module(Net())
    assert info.type == "Net" and info.wrappers == ()
    assert info.num_params == 112 + 8 + 51
    assert info.trainable_params == info.num_params and info.frozen_params == 0
    assert [b.name for b in info.buffers] == [
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ]
    assert all(b.is_buffer and not b.trainable for b in info.buffers)
    assert [c.name for c in info.tree.children] == ["conv", "bn", "fc"]
    fc = info.tree.children[2]
    assert (fc.type, fc.num_params) == ("Linear", 51)
    assert fc.extra == "in_features=16, out_features=3, bias=True"
    assert info.devices == {"cpu": 9}
    assert info.dtypes == {"float32": 8, "int64": 1}
    assert info.nbytes == 171 * 4 + 8 * 4 + 8


def test_frozen_parameters_and_gradients() -> None:
    model = Net()
    model.conv.requires_grad_(False)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    info = inspect_module(model)
    assert info.frozen_params == 112
    assert info.tree.children[0].trainable_params == 0
    by_name = {p.name: p for p in info.parameters}
    assert not by_name["conv.weight"].has_grad and by_name["conv.weight"].grad_norm is None
    fc_grad = model.fc.weight.grad
    assert fc_grad is not None
    assert by_name["fc.weight"].grad_norm == pytest.approx(float(fc_grad.norm()))
    expected = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
    assert info.grad_norm == pytest.approx(float(expected))
    assert "112 frozen" in str(info) and "4/6 with gradients" in str(info)


def test_wrappers_are_looked_through_and_tied_weights_counted_once() -> None:
    info = inspect_module(nn.DataParallel(Tied()))
    assert info.wrappers == ("DataParallel",)
    assert info.type == "Tied"
    assert info.num_params == 40
    assert [p.name for p in info.parameters] == ["emb.weight"]
    assert str(info).startswith("DataParallel(Tied): 40 parameters")


def test_meta_device_and_eval_mode() -> None:
    with torch.device("meta"):
        model = nn.Linear(1000, 1000)
    info = inspect_module(model.eval())
    assert info.devices == {"meta": 2}
    assert info.num_params == 1_001_000
    assert not info.training and "eval mode" in info.summary()
