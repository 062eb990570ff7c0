"""save_checkpoint / load_checkpoint: what goes in comes back, in both layouts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import Tied
from torch import nn

import torchkeep as tk
from torchkeep.errors import (
    ChecksumError,
    CorruptFileError,
    KeyMismatchError,
    TorchkeepError,
    UnsafeFileError,
)
from torchkeep.training.checkpoint import (
    MANIFEST,
    UnsupportedValueError,
    load_checkpoint,
    save_checkpoint,
)
from torchkeep.weights.api import unwrap

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LAYOUTS = ["native", "pt"]


@dataclasses.dataclass
class Config:
    lr: float = 0.1
    layers: tuple[int, ...] = (2, 3)


class Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def where(tmp_path: Path, layout: str) -> Path:
    return tmp_path / ("ckpt.pt" if layout == "pt" else "ckpt")


def trained(seed: int = 0) -> tuple[Net, torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        sched.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, opt, sched, scaler


def fresh() -> tuple[Net, torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9)
    return model, opt, sched, torch.amp.GradScaler("cpu", init_scale=2.0)


def same_tree(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_tree, a, b))
    return bool(a == b)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_objects_are_restored_in_place(tmp_path: Path, layout: str) -> None:
    model, opt, sched, scaler = trained()
    gen = torch.Generator().manual_seed(123)
    gen.manual_seed(123)
    torch.randn(3, generator=gen)
    path = save_checkpoint(
        where(tmp_path, layout),
        model=model,
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        generator=gen,
        epoch=3,
    )

    model2, opt2, sched2, scaler2 = fresh()
    gen2 = torch.Generator()
    extra = load_checkpoint(
        path, model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2, generator=gen2
    )

    assert extra == {"epoch": 3}
    for name, value in model.state_dict().items():
        assert torch.equal(model2.state_dict()[name], value), name
    assert same_tree(opt2.state_dict(), opt.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 1e-2 * 0.25
    assert sched2.state_dict() == sched.state_dict()
    assert scaler2.get_scale() == 1024.0
    assert torch.equal(gen2.get_state(), gen.get_state())


def plain_values() -> dict[str, Any]:
    return {
        "epoch": 7,
        "loss": 0.125,
        "best": math.inf,
        "diverged": math.nan,
        "name": "run-1",
        "nothing": None,
        "flags": [True, False],
        "pair": (1, "two", (3.5,)),
        "by_index": {0: "a", 1: {"nested": [1, 2]}, (2, 3): "tuple key"},
        "args": argparse.Namespace(lr=0.5, tags=["x"]),
        "config": Config(lr=0.25),
        "table": np.arange(6, dtype=np.int16).reshape(2, 3),
        "noise": np.array([0.5, -1.25], dtype=">f8"),
        "count": np.int64(41),
        "blob": b"\x00\xffbytes",
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "tensor": torch.arange(5.0),
        "where": pathlib.Path("/data/train"),
        "labels": {"cat", "dog"},
        "z": 1 - 2j,
    }


def test_native_plain_values_come_back_exactly(tmp_path: Path) -> None:
    values = plain_values()
    save_checkpoint(tmp_path / "c", **values)
    out = load_checkpoint(tmp_path / "c")

    assert set(out) == set(values)
    assert math.isnan(out.pop("diverged"))
    assert out["config"] == {"lr": 0.25, "layers": (2, 3)}  # no target: fields only
    assert out["args"] == argparse.Namespace(lr=0.5, tags=["x"])
    assert out["table"].dtype == np.int16 and np.array_equal(out["table"], values["table"])
    assert out["noise"].dtype == np.dtype(">f8") and np.array_equal(out["noise"], values["noise"])
    assert type(out["count"]) is np.int64 and out["count"] == 41
    for name in (
        "epoch",
        "loss",
        "best",
        "name",
        "nothing",
        "flags",
        "pair",
        "by_index",
        "blob",
        "dtype",
        "device",
        "where",
        "labels",
        "z",
    ):
        assert out[name] == values[name] and type(out[name]) is type(values[name]), name
    assert torch.equal(out["tensor"], values["tensor"])


def test_dataclass_target_rebuilds_the_dataclass(tmp_path: Path) -> None:
    for path in (tmp_path / "c", tmp_path / "c.pt"):
        save_checkpoint(path, config=Config(lr=0.25, layers=(9,)), rng=False)
        assert load_checkpoint(path, config=Config())["config"] == Config(lr=0.25, layers=(9,))


def test_pt_file_is_the_tutorial_format(tmp_path: Path) -> None:
    model, opt, sched, _ = trained()
    args = argparse.Namespace(lr=0.1, epochs=3)
    path = save_checkpoint(
        tmp_path / "ckpt.pt",
        model=model,
        optimizer=opt,
        scheduler=sched,
        epoch=3,
        args=args,
        config=Config(),
        table=np.ones(3),
        flag=True,
    )

    plain = torch.load(path, weights_only=True)  # no torchkeep involved
    assert {"model", "optimizer", "scheduler", "epoch", "args", "config"} <= set(plain)
    assert plain["epoch"] == 3 and plain["flag"] is True
    assert plain["args"] == {"lr": 0.1, "epochs": 3}
    assert plain["config"] == {"lr": 0.1, "layers": (2, 3)}
    assert torch.equal(plain["table"], torch.ones(3, dtype=torch.float64))
    assert list(plain["model"]) == list(model.state_dict())
    assert plain["optimizer"]["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]
    rng = plain["__torchkeep__"]["rng"]
    assert torch.equal(rng["torch"], torch.get_rng_state())


def test_hand_written_tutorial_checkpoint_loads(tmp_path: Path) -> None:
    model, opt, _, _ = trained()
    torch.save(
        {
            "epoch": 5,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "loss": 0.3,
        },
        tmp_path / "t.pt",
    )
    model2, opt2, _, _ = fresh()
    extra = load_checkpoint(tmp_path / "t.pt", model=model2, optimizer=opt2)
    assert extra == {"epoch": 5, "loss": 0.3}
    assert torch.equal(model2.fc1.weight, model.fc1.weight)
    assert same_tree(opt2.state_dict()["state"], opt.state_dict()["state"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rng_states_are_restored(tmp_path: Path, layout: str) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    path = save_checkpoint(where(tmp_path, layout), epoch=1)
    expected = (random.random(), np.random.rand(), torch.rand(4))

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    load_checkpoint(path)
    got = (random.random(), np.random.rand(), torch.rand(4))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])

    torch.manual_seed(99)
    load_checkpoint(path, rng=False)
    assert not torch.equal(torch.rand(4), expected[2])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_wrapped_modules_are_saved_under_plain_names(tmp_path: Path, layout: str) -> None:
    model, _, _, _ = trained()
    path = save_checkpoint(where(tmp_path, layout), model=nn.DataParallel(model), rng=False)
    if layout == "native":
        manifest = json.loads((path / MANIFEST).read_text())
        names = list(manifest["state"]["model"]["value"])
    else:
        names = list(torch.load(path, weights_only=True)["model"])
    assert names == list(model.state_dict())

    for target in (Net(), torch.compile(Net()), nn.DataParallel(Net())):
        load_checkpoint(path, model=target)
        assert torch.equal(unwrap(target).state_dict()["fc2.weight"], model.fc2.weight)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unrepresentable_value_is_named_with_its_path(tmp_path: Path, layout: str) -> None:
    with pytest.raises(UnsupportedValueError) as caught:
        save_checkpoint(where(tmp_path, layout), epoch=1, extra={"callback": lambda x: x, "ok": 1})
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, TorchkeepError)
    message = str(caught.value)
    assert "'extra.callback'" in message and "function" in message
    assert "allow_pickle=True" in message and "trust=True" in message
    assert caught.value.path == "extra.callback"
    assert not tmp_path.joinpath("ckpt").exists() and not tmp_path.joinpath("ckpt.pt").exists()


class Callback:
    def __init__(self, factor: int) -> None:
        self.factor = factor


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pickled_objects_load_only_when_trusted(tmp_path: Path, layout: str) -> None:
    path = save_checkpoint(
        where(tmp_path, layout), epoch=2, extra={"cb": Callback(3)}, allow_pickle=True, rng=False
    )
    if layout == "native":
        assert (path / "objects.pkl").is_file()
    with pytest.raises(UnsafeFileError, match="trust=True"):
        load_checkpoint(path)
    out = load_checkpoint(path, trust=True)
    assert out["epoch"] == 2 and out["extra"]["cb"].factor == 3


def test_folder_without_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    model, _, _, _ = trained()
    path = save_checkpoint(tmp_path / "c", model=model)
    (path / MANIFEST).unlink()
    with pytest.raises(CorruptFileError, match="not a committed checkpoint"):
        load_checkpoint(path, model=Net())


def test_flipped_byte_is_reported_with_the_tensor_name(tmp_path: Path) -> None:
    model, _, _, _ = trained()
    path = save_checkpoint(tmp_path / "c", model=model, rng=False)
    manifest = json.loads((path / MANIFEST).read_text())
    info = manifest["tensors"]["model.fc2.weight"]
    shard = path / info["file"]
    data = bytearray(shard.read_bytes())
    with safetensors.safe_open(shard, "pt") as reader:
        assert "model.fc2.weight" in list(reader.keys())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    begin = 8 + header_len + header["model.fc2.weight"]["data_offsets"][0]
    data[begin + 1] ^= 0x40
    shard.write_bytes(bytes(data))

    load_checkpoint(path, model=Net())  # lengths and structure are fine: no hashing asked
    with pytest.raises(ChecksumError, match=r"'model\.fc2\.weight'"):
        load_checkpoint(path, model=Net(), verify=True)


def test_truncated_shard_is_refused_without_verify(tmp_path: Path) -> None:
    model, _, _, _ = trained()
    path = save_checkpoint(tmp_path / "c", model=model)
    shard = next(path.glob("tensors-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CorruptFileError, match="truncated"):
        load_checkpoint(path, model=Net())


def test_shards_are_bounded_and_readable_by_safetensors(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(10)}  # 400 bytes each
    path = save_checkpoint(tmp_path / "c", max_shard_size=1000, big=torch.zeros(600), **tensors)
    shards = sorted(path.glob("tensors-*.safetensors"))
    assert [s.name for s in shards][:2] == [
        "tensors-00000.safetensors",
        "tensors-00001.safetensors",
    ]
    assert len(shards) >= 6
    seen: dict[str, torch.Tensor] = {}
    for shard in shards:
        content = safetensors.torch.load_file(shard)
        data_bytes = sum(t.numel() * t.element_size() for t in content.values())
        assert data_bytes <= 1000 or len(content) == 1
        seen.update(content)
    for name, value in tensors.items():
        assert torch.equal(seen[name], value)
    out = load_checkpoint(path, verify=True)
    assert all(torch.equal(out[n], v) for n, v in tensors.items())


def test_manifest_is_strict_json_written_last(tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path / "c", loss=math.nan, metrics={"val": math.inf}, metadata={"note": "hi"}
    )

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    manifest = json.loads((path / MANIFEST).read_text(), parse_constant=refuse)
    assert manifest["format"] == "torchkeep-checkpoint" and manifest["version"] == 1
    assert manifest["torch_version"] == str(torch.__version__)
    assert manifest["metadata"] == {"note": "hi"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert mtimes[MANIFEST] == max(mtimes.values())


def test_tied_weights_are_stored_once_and_load_tied(tmp_path: Path) -> None:
    model = Tied()
    path = save_checkpoint(tmp_path / "c", model=model)
    manifest = json.loads((path / MANIFEST).read_text())
    assert [n for n in manifest["tensors"] if n.startswith("model.")] == ["model.emb.weight"]
    target = Tied()
    load_checkpoint(path, model=target)
    assert torch.equal(target.head.weight, model.emb.weight)
    assert target.head.weight is target.emb.weight


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mismatched_model_changes_nothing_unless_not_strict(tmp_path: Path, layout: str) -> None:
    model, opt, _, _ = trained()
    path = save_checkpoint(where(tmp_path, layout), model=model, optimizer=opt)
    wider, wider_opt, _, _ = fresh()
    wider = Net(width=5)
    wider_opt = torch.optim.Adam(wider.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(KeyMismatchError, match="shape mismatch"):
        load_checkpoint(path, model=wider, optimizer=wider_opt)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())
    assert wider_opt.param_groups[0]["lr"] == 1.0  # checked first, so untouched

    other = Net()
    del other.bn
    other.bn = nn.Identity()
    load_checkpoint(path, model=other, strict=False)
    assert torch.equal(other.fc1.weight, model.fc1.weight)


def test_unknown_target_and_tensor_targets(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c", ema=torch.arange(4.0), step=3)
    with pytest.raises(KeyMismatchError, match="'model'"):
        load_checkpoint(path, model=Net())
    ema = torch.zeros(4)
    assert load_checkpoint(path, ema=ema) == {"step": 3}
    assert torch.equal(ema, torch.arange(4.0))


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a torchkeep checkpoint"):
        save_checkpoint(tmp_path / "outputs", epoch=1)
    assert (tmp_path / "outputs" / "notes.txt").read_text() == "keep me"


def test_saving_again_replaces_a_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", epoch=1)
    save_checkpoint(tmp_path / "c", epoch=2)
    assert load_checkpoint(tmp_path / "c")["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_reserved_names_and_empty_state(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c", __rng__=1)
    with pytest.raises(TorchkeepError, match="nothing to save"):
        save_checkpoint(tmp_path / "c")


@needs_cuda
def test_cuda_state_loads_on_cpu_and_back(tmp_path: Path) -> None:
    model = Net().cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3, device="cuda")).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "c", model=model, optimizer=opt, t=torch.ones(2).cuda())
    cpu_model = Net()
    out = load_checkpoint(path, model=cpu_model)
    assert torch.equal(cpu_model.fc1.weight, model.fc1.weight.cpu())
    assert out["t"].device.type == "cpu"
    gpu_model = Net().cuda()
    gpu_opt = torch.optim.Adam(gpu_model.parameters())
    out = load_checkpoint(path, model=gpu_model, optimizer=gpu_opt, device="cuda")
    assert out["t"].device.type == "cuda"
    assert gpu_opt.state_dict()["state"][0]["exp_avg"].device.type == "cuda"


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl", ".ckpt", ".tar"])
def test_every_torch_suffix_is_a_pt_checkpoint_as_it_is_a_weights_file(
    tmp_path: Path, suffix: str
) -> None:
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / f"c{suffix}", model=model, epoch=1, rng=False)
    assert path.is_file()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["weight"], model.weight)
    assert load_checkpoint(path)["epoch"] == 1
    weights = tk.save(model, tmp_path / f"w{suffix}")
    assert torch.equal(tk.load_state_dict(weights)["weight"], model.weight)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_allow_globals_loads_named_classes_without_trust(tmp_path: Path, layout: str) -> None:
    path = save_checkpoint(
        where(tmp_path, layout), epoch=2, extra={"cb": Callback(3)}, allow_pickle=True, rng=False
    )
    name = f"{Callback.__module__}.{Callback.__qualname__}"
    loaded = load_checkpoint(path, allow_globals=[name])
    assert isinstance(loaded["extra"]["cb"], Callback) and loaded["extra"]["cb"].factor == 3
    # Another name does not let the class in.
    with pytest.raises(UnsafeFileError):
        load_checkpoint(path, allow_globals=["collections.Counter"])
    manager = tk.CheckpointManager(tmp_path / "run")
    manager.save(1, extra={"cb": Callback(4)}, allow_pickle=True, rng=False)
    manager.wait()
    restored = manager.restore(allow_globals=[name])
    assert restored is not None and restored["extra"]["cb"].factor == 4
    manager.close()
