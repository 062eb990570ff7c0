"""Loading into models: strictness, partial loads, reports, dtypes, devices, entries."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import xxhash
from conftest import Backbone, Net, assert_same_state, needs_cuda
from torch import nn

import torchkeep as tk


@pytest.fixture(params=[".safetensors", ".pt"])
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Backbone, Path]:
    model = Backbone(classes=10)
    return model, tk.save(model, tmp_path / f"backbone{request.param}")


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_strict_mismatch_raises_a_table_and_loads_nothing(saved) -> None:
    _, path = saved
    model = Backbone(classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tk.KeyMismatchError) as info:
        tk.load(model, path)
    message = str(info.value)
    assert "head.weight" in message and "file [10, 16] vs model [5, 16]" in message
    assert "strict=False" in message
    assert isinstance(info.value, KeyError)
    assert info.value.report.mismatched and not info.value.report.loaded
    assert _unchanged(model, before)


def test_non_strict_loads_what_fits_and_never_raises_on_size(saved) -> None:
    source, path = saved
    model = Backbone(classes=5)
    head_before = model.head.weight.clone()
    report = tk.load(model, path, strict=False)
    assert not report.ok
    assert {m.name for m in report.mismatched} == {"head.weight", "head.bias"}
    mismatch = next(m for m in report.mismatched if m.name == "head.weight")
    assert (mismatch.source_shape, mismatch.dest_shape) == ((10, 16), (5, 16))
    assert torch.equal(model.head.weight, head_before)
    for name in ("backbone.0.weight", "backbone.2.bias"):
        assert torch.equal(model.state_dict()[name], source.state_dict()[name])
    assert "shape" in str(report) and "head.weight" in str(report)


def test_exclude_a_new_head_keeps_strictness_for_the_rest(saved) -> None:
    source, path = saved
    model = Backbone(classes=5)
    report = tk.load(model, path, exclude="head")
    assert report.ok
    assert set(report.skipped) == {"head.weight", "head.bias"}
    assert torch.equal(model.backbone[0].weight, source.backbone[0].weight)


def test_include_only_the_backbone(saved) -> None:
    source, path = saved
    model = Backbone(classes=5)
    report = tk.load(model, path, include="backbone.*")
    assert report.ok and len(report.loaded) == 4
    assert torch.equal(model.backbone[2].weight, source.backbone[2].weight)


def test_backbone_into_a_bigger_model_under_a_new_name(saved) -> None:
    source, path = saved

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
            self.box = nn.Linear(16, 4)

    model = Detector()
    report = tk.load(model, path, rename={r"^backbone\.": "encoder."}, strict=False)
    assert report.missing == ("box.weight", "box.bias")
    assert set(report.unexpected) == {"head.weight", "head.bias"}
    assert ("backbone.0.weight", "encoder.0.weight") in report.renamed
    assert torch.equal(model.encoder[0].weight, source.backbone[0].weight)


def test_missing_and_unexpected_keys_raise_when_strict(tmp_path: Path) -> None:
    path = tk.save({"fc.weight": torch.zeros(3, 16), "extra": torch.ones(1)}, tmp_path / "x.pt")
    with pytest.raises(tk.KeyMismatchError) as info:
        tk.load(Net(), path)
    assert "missing" in str(info.value) and "unexpected" in str(info.value)
    assert "extra" in str(info.value) and "conv.weight" in str(info.value)


def test_dtype_is_cast_to_the_model_and_reported(tmp_path: Path) -> None:
    source = Net()
    path = tk.save(source.half(), tmp_path / "half.safetensors")
    model = Net()
    report = tk.load(model, path)
    assert model.fc.weight.dtype == torch.float32
    assert ("fc.weight", "float16", "float32") in report.cast
    assert "bn.num_batches_tracked" not in {c[0] for c in report.cast}
    assert torch.equal(model.fc.weight, source.fc.weight.float())


def test_loading_into_a_dataparallel_model_and_back(tmp_path: Path) -> None:
    source = Net()
    wrapped = nn.DataParallel(Net())
    tk.load(wrapped, tk.save(source, tmp_path / "plain.safetensors"))
    assert_same_state(wrapped.module, source.state_dict())
    plain = Net()
    report = tk.load(plain, tk.save(wrapped.state_dict(), tmp_path / "dp.pt"))
    assert report.ok and len(report.renamed) == len(source.state_dict())
    assert_same_state(plain, source.state_dict())


def test_compiled_model_loads_plain_weights(tmp_path: Path) -> None:
    source = Net()
    compiled = torch.compile(Net())
    report = tk.load(compiled, tk.save(source, tmp_path / "plain.pt"))
    assert report.ok
    assert all(dst.startswith("_orig_mod.") for _, dst in report.renamed)
    assert_same_state(compiled._orig_mod, source.state_dict())


def test_the_best_matching_entry_of_a_checkpoint_dict_is_used(tmp_path: Path) -> None:
    model, ema = Net(), Net()
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "epoch": 7,
            "teacher": {"w": torch.ones(2)},
            "ema": ema.state_dict(),
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
        },
        path,
    )
    fresh = Net()
    report = tk.load(fresh, path)
    assert report.entry == "ema"
    assert_same_state(fresh, ema.state_dict())
    with pytest.raises(KeyError, match="'teacher', 'ema'"):
        tk.load(fresh, path, entry="nope")


def _filled(model: nn.Module, value: float) -> dict[str, torch.Tensor]:
    """``model``'s state with every floating-point tensor set to ``value``."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(value)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_state_dict_picks_the_conventional_entry(tmp_path: Path) -> None:
    # Two entries of the same rank: the conventional name ("model") must win although the
    # other comes first in the file and is larger.
    model, ema = _filled(Net(), 1.0), _filled(Net(), 2.0)
    ema["extra.weight"] = torch.full((4, 4), 2.0)
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": ema, "model": model, "step": 3}, path)
    state = tk.load_state_dict(path)
    assert list(state) == list(model)
    for name, value in model.items():
        assert torch.equal(state[name], value), name
    explicit = tk.load_state_dict(path, entry="ema")
    assert list(explicit) == list(ema)
    for name, value in ema.items():
        assert torch.equal(explicit[name], value), name


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=needs_cuda)])
def test_load_moves_the_model_when_given_a_device(tmp_path: Path, device: str) -> None:
    # Off the CPU, so a load that ignored device= would leave the model where it was.
    source = Net()
    path = tk.save(source, tmp_path / "net.safetensors")
    model = Net()
    report = tk.load(model, path, device=device)
    assert report.ok and sorted(report.loaded) == sorted(source.state_dict())
    assert {t.device.type for t in model.state_dict().values()} == {device}
    if device != "meta":  # meta tensors hold no values to compare
        assert_same_state(model, source.state_dict())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_assign_builds_a_meta_model_on_the_given_device(tmp_path: Path, device: str) -> None:
    source = Net()
    path = tk.save(source, tmp_path / "net.safetensors")
    with torch.device("meta"):
        model = Net()
    assert tk.load(model, path, device=device, assign=True).ok
    assert {t.device.type for t in model.state_dict().values()} == {device}
    assert_same_state(model, source.state_dict())


def test_verify_catches_a_flipped_byte_in_our_safetensors(tmp_path: Path) -> None:
    model = Net()
    path = tk.save(model, tmp_path / "net.safetensors")
    data = bytearray(path.read_bytes())
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_size])
    recorded = json.loads(header.pop("__metadata__")["torchkeep.xxh3"])
    start = 8 + header_size
    # The tensor whose data ends the file holds the flipped byte.
    name, (begin, end) = next(
        (name, spec["data_offsets"])
        for name, spec in header.items()
        if start + spec["data_offsets"][1] == len(data)
    )
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    tk.load_state_dict(path)  # lengths and structure still fine: no hashing by default
    with pytest.raises(tk.ChecksumError) as info:
        tk.load(Net(), path, verify=True)
    assert isinstance(info.value, ValueError)
    actual = xxhash.xxh3_64(bytes(data[start + begin : start + end])).hexdigest()
    assert str(info.value) == (
        f"tensor {name!r} in {str(path)!r} is damaged: its bytes hash to {actual}, but "
        f"{recorded[name]} was recorded when it was saved (data bytes {start + begin} to "
        f"{start + end})"
    )


def test_verify_catches_a_flipped_byte_in_a_torch_zip(tmp_path: Path) -> None:
    path = tk.save(Net(), tmp_path / "net.pt")
    data = bytearray(path.read_bytes())
    offset = data.find(b"data/0") + 200  # well inside the first storage record
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(tk.ChecksumError, match="CRC-32"):
        tk.load_state_dict(path, verify=True)


def test_arguments_in_the_wrong_order_are_named(tmp_path: Path) -> None:
    path = tk.save(Net(), tmp_path / "net.pt")
    with pytest.raises(tk.InvalidStateError, match="swapped"):
        tk.load(str(path), Net())  # type: ignore[arg-type]
    with pytest.raises(tk.InvalidStateError, match="load_state_dict"):
        tk.load({"a": 1}, path)  # type: ignore[arg-type]
