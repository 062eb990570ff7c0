"""Models without their class code: whole-model pickles, save_model/load_model, export."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GOLDEN, Net
from torch import nn

import torchkeep as tk


class TutorialCNN(nn.Module):
    """The tutorials' CNN: conv, batch norm, pooling, linear."""

    def __init__(self, classes: int = 10, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
        )
        self.fc = nn.Linear(width * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


@tk.record_init
class Recorded(nn.Module):
    def __init__(self, sizes: tuple[int, int], act: str = "relu", *, bias: bool = True) -> None:
        super().__init__()
        self.layer = nn.Linear(*sizes, bias=bias)
        self.act = act


class NeedsArgs(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layer = nn.Linear(n, n)


def same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ whole-model pickles


@pytest.fixture
def vanished_class_model(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], Path]:
    """A model pickled while its custom block's module existed; the module is then removed."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "custom_blocks.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Block(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.proj = nn.Linear(4, 4)
                    self.register_buffer("scale", torch.full((4,), 2.0))
                    self.register_buffer("cache", torch.zeros(4), persistent=False)

                def forward(self, x):
                    return self.proj(x) * self.scale

            class Model(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.block = Block()
                    self.head = nn.Sequential(nn.ReLU(), nn.Linear(4, 2))
            """
        )
    )
    marker = tmp_path / "imported"
    (package / "custom_blocks.py").write_text(
        (package / "custom_blocks.py").read_text() + f"\nopen({str(marker)!r}, 'w').close()\n"
    )
    sys.path.insert(0, str(package))
    try:
        module = importlib.import_module("custom_blocks")
        model = module.Model()
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        path = tmp_path / "whole.pt"
        torch.save(model, path)
    finally:
        sys.path.remove(str(package))
        sys.modules.pop("custom_blocks", None)
    (package / "custom_blocks.py").unlink()
    marker.unlink()
    return path, expected, marker


def test_whole_model_pickle_yields_its_weights_without_its_classes(vanished_class_model) -> None:
    path, expected, marker = vanished_class_model
    state = tk.load_state_dict(path)
    assert list(state) == list(expected)  # non-persistent buffer left out, order kept
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert not marker.exists() and "custom_blocks" not in sys.modules


def test_whole_model_pickle_loads_into_a_model_built_in_code(vanished_class_model) -> None:
    path, expected, _ = vanished_class_model

    class Rebuilt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Module()
            self.block.proj = nn.Linear(4, 4)
            self.block.register_buffer("scale", torch.ones(4))
            self.head = nn.Sequential(nn.ReLU(), nn.Linear(4, 2))

    model = Rebuilt()
    assert tk.load(model, path).ok
    assert torch.equal(model.block.scale, expected["block.scale"])


def test_inspect_shows_the_module_tree_of_missing_classes(vanished_class_model) -> None:
    path, _, _ = vanished_class_model
    info = tk.inspect(path)
    tree = {m.name: (m.type, m.params) for m in info.modules}
    assert tree[""] == ("custom_blocks.Model", 4 * 4 + 4 + 4 + 4 * 2 + 2)
    assert tree["block"] == ("custom_blocks.Block", 24)
    assert tree["head.1"] == ("torch.nn.modules.linear.Linear", 10)
    assert "custom_blocks.Block" in info.stubbed


def test_load_model_names_the_missing_classes(vanished_class_model) -> None:
    path, _, marker = vanished_class_model
    with pytest.raises(tk.UnsafeFileError, match="custom_blocks.Model") as info:
        tk.load_model(path)
    assert "load_state_dict" in str(info.value)
    with pytest.raises(tk.ModelRebuildError, match="load_state_dict"):
        tk.load_model(path, trust=True)
    assert not marker.exists()


def test_torch_nn_only_pickles_rebuild_into_working_modules(tmp_path: Path) -> None:
    source = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
    path = tmp_path / "seq.pt"
    torch.save(source, path)
    model = tk.load_model(path)
    assert isinstance(model, nn.Sequential) and isinstance(model[0], nn.Linear)
    assert not model.training
    x = torch.randn(3, 4)
    assert torch.equal(model(x), source.eval()(x))


def test_dataparallel_whole_model_pickle(tmp_path: Path) -> None:
    source = nn.DataParallel(nn.Sequential(nn.Linear(4, 2)))
    path = tmp_path / "dp.pt"
    torch.save(source, path)
    # Read back under canonical names, as torchkeep.save writes a wrapped model.
    assert list(tk.load_state_dict(path)) == ["0.weight", "0.bias"]
    assert list(tk.inspect(path).entries) == [""]
    plain = nn.Sequential(nn.Linear(4, 2))
    assert tk.load(plain, path).ok
    assert torch.equal(plain[0].weight, source.module[0].weight)


def test_user_class_pickle_rebuilds_only_when_trusted(tmp_path: Path) -> None:
    source = TutorialCNN()
    path = tmp_path / "cnn.pt"
    torch.save(source, path)
    with pytest.raises(tk.UnsafeFileError, match="TutorialCNN"):
        tk.load_model(path)
    model = tk.load_model(path, trust=True)
    assert type(model) is TutorialCNN and same(model, source)


def test_golden_whole_model_reads_without_make_golden() -> None:
    assert "make_golden" not in sys.modules
    info = tk.inspect(GOLDEN / "whole_model.pt")
    assert info.modules[0].type == "make_golden.Net"
    model = Net()
    assert tk.load(model, GOLDEN / "whole_model.pt").ok
    assert "make_golden" not in sys.modules


def test_a_dangerous_global_is_refused_even_inside_a_model(tmp_path: Path) -> None:
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    model = nn.Linear(2, 2)
    model.hook = Evil()  # type: ignore[assignment]
    path = tmp_path / "evil_model.pt"
    torch.save(model, path)
    with pytest.raises(tk.UnsafeFileError, match="DANGEROUS"):
        tk.load_state_dict(path)
    with pytest.raises(tk.UnsafeFileError):
        tk.load_model(path)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------ save_model / load_model


def test_save_model_round_trip_with_explicit_init(tmp_path: Path) -> None:
    source = TutorialCNN(classes=3, width=6)
    path = tk.save_model(source, tmp_path / "cnn.safetensors", init={"classes": 3, "width": 6})
    model = tk.load_model(path)
    assert type(model) is TutorialCNN and same(model, source)
    assert model.fc.out_features == 3 and not model.training
    assert tk.load_model(path, train=True).training


def test_record_init_captures_arguments(tmp_path: Path) -> None:
    source = Recorded((3, 5), "gelu", bias=False)
    path = tk.save_model(source, tmp_path / "rec.safetensors")
    model = tk.load_model(path)
    assert isinstance(model, Recorded)
    assert model.act == "gelu" and model.layer.bias is None and model.layer.out_features == 5
    assert same(model, source)


def test_sharded_save_model(tmp_path: Path) -> None:
    source = TutorialCNN()
    folder = tk.save_model(source, tmp_path / "cnn", max_shard_size=300)
    assert same(tk.load_model(folder), source)


def test_save_model_without_init_args_is_explained(tmp_path: Path) -> None:
    with pytest.raises(tk.InvalidStateError, match="record_init"):
        tk.save_model(NeedsArgs(3), tmp_path / "x.safetensors")
    with pytest.raises(tk.InvalidStateError, match="cannot be stored as JSON"):
        tk.save_model(NeedsArgs(3), tmp_path / "x.safetensors", init={"n": object()})

    class Local(nn.Module):
        pass

    with pytest.raises(tk.InvalidStateError, match="inside a function"):
        tk.save_model(Local(), tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_load_model_checks_the_class_before_calling_it(tmp_path: Path) -> None:
    import json
    import struct

    path = tk.save_model(NeedsArgs(2), tmp_path / "m.safetensors", init={"n": 2})
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    cases = (
        ("os:system", False, tk.UnsafeFileError, "not an nn.Module"),
        ("nowhere.mod:Net", False, tk.UnsafeFileError, "not imported"),
        ("nowhere.mod:Net", True, tk.ModelRebuildError, "cannot import"),
    )
    for target, trust, kind, error in cases:
        record = json.loads(header["__metadata__"]["torchkeep.model"])
        record["class"] = target
        header["__metadata__"]["torchkeep.model"] = json.dumps(record)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])
        with pytest.raises(kind, match=error):
            tk.load_model(path, trust=trust)


def test_class_moved_is_recoverable_with_cls(tmp_path: Path) -> None:
    path = tk.save_model(NeedsArgs(2), tmp_path / "m.safetensors", init={"n": 2})
    model = tk.load_model(path, cls=NeedsArgs)
    assert model.layer.in_features == 2


def test_plain_weights_need_a_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = TutorialCNN()
    path = tk.save(source, tmp_path / "w.safetensors")
    built: list[type] = []
    real_init = nn.Module.__init__

    def counting_init(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        built.append(type(self))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", counting_init)
    with pytest.raises(tk.ModelRebuildError) as info:
        tk.load_model(path)
    assert built == []  # no module of any kind was built before the refusal
    assert isinstance(info.value, ImportError)
    message = str(info.value)
    assert message.startswith(f"{str(path)!r} holds weights only"), message
    assert "pass cls=YourModel" in message and "torchkeep.load(model, path)" in message

    model = tk.load_model(path, cls=TutorialCNN)
    assert type(model) is TutorialCNN and built[0] is TutorialCNN
    expected = source.state_dict()
    assert list(model.state_dict()) == list(expected)
    for name, value in expected.items():
        assert torch.equal(model.state_dict()[name], value), name


# ------------------------------------------------------------------------------ export


@pytest.mark.parametrize("suffix, fmt", [(".pt2", "export"), (".ts", "torchscript")])
def test_export_round_trip_and_load_model(tmp_path: Path, suffix: str, fmt: str) -> None:
    model = TutorialCNN().eval()
    x = torch.randn(2, 1, 8, 8)
    result = tk.export(model, (x,), tmp_path / f"cnn{suffix}")
    assert result.ok and result.format == fmt and result.max_abs_diff <= 1e-5
    with pytest.raises(tk.UnsafeFileError, match="trust=True"):
        tk.load_model(result.path)
    loaded = tk.load_model(result.path, trust=True)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


@pytest.mark.slow
def test_export_onnx_with_equivalence_check(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = TutorialCNN().eval()
    result = tk.export(model, torch.randn(2, 1, 8, 8), tmp_path / "cnn.onnx")
    assert result.ok and result.method == "onnx"
    assert (tmp_path / "cnn.onnx").stat().st_size > 1000


def test_torchscript_falls_back_to_tracing_and_says_so(tmp_path: Path) -> None:
    class Unscriptable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = {"a": 2.0}.get("a", 1.0) if x.ndim == 2 else None
            return self.fc(x) * scale  # type: ignore[operator]

    result = tk.export(Unscriptable(), torch.randn(3, 4), tmp_path / "u.ts")
    assert result.method == "trace" and "scripting failed" in result.note
    assert result.ok


def test_export_reports_a_mismatch(tmp_path: Path) -> None:
    class Noisy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand_like(x)  # every run differs, so no artifact can match

    with pytest.warns(tk.TorchkeepWarning, match="DOES NOT MATCH"):
        result = tk.export(Noisy(), torch.zeros(64), tmp_path / "noisy.pt2")
    assert not result.ok and result.max_abs_diff > 1e-3


def test_compare_handles_structure_and_shape_differences() -> None:
    from torchkeep.models.export import compare

    assert compare(torch.ones(3), torch.ones(3) * 1.5, 1e-5, 1e-4) == (0.5, False)
    assert compare({"a": torch.ones(2)}, {"a": torch.ones(2)}, 1e-5, 1e-4) == (0.0, True)
    assert compare((torch.ones(2),), (torch.ones(3),), 1e-5, 1e-4)[1] is False
    assert compare((torch.ones(2),), (torch.ones(2), torch.ones(2)), 1e-5, 1e-4)[1] is False


def test_export_warns_about_training_mode_and_restores_it(tmp_path: Path) -> None:
    model = TutorialCNN()
    assert model.training
    with pytest.warns(tk.TorchkeepWarning, match="training mode"):
        result = tk.export(model, torch.randn(2, 1, 8, 8), tmp_path / "cnn.pt2")
    assert result.ok and model.training


def test_export_format_from_suffix_or_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=".pt2"):
        tk.export(TutorialCNN().eval(), torch.randn(1, 1, 8, 8), tmp_path / "cnn.bin")


# ------------------------------------------------------------------- load_for_inference


def test_load_for_inference_from_a_path_and_a_module(tmp_path: Path) -> None:
    source = TutorialCNN(classes=3)
    path = tk.save_model(source, tmp_path / "cnn.safetensors", init={"classes": 3})
    for model in (tk.load_for_inference(path), tk.load_for_inference(TutorialCNN(classes=3))):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert all(not m.training for m in model.modules())
    half = tk.load_for_inference(path, dtype=torch.float64)
    assert half.fc.weight.dtype == torch.float64


def test_load_for_inference_from_export_archives(tmp_path: Path) -> None:
    model = TutorialCNN().eval()
    x = torch.randn(2, 1, 8, 8)
    for name in ("a.pt2", "a.ts"):
        result = tk.export(model, (x,), tmp_path / name)
        with pytest.raises(tk.UnsafeFileError, match="runs"):
            tk.load_for_inference(result.path)
        ready = tk.load_for_inference(result.path, trust=True)
        assert not any(p.requires_grad for p in ready.parameters())
        with torch.no_grad():
            assert torch.allclose(ready(x), model(x), atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_load_for_inference_on_missing_cuda_is_clear() -> None:
    with pytest.raises(tk.DeviceError, match="CUDA"):
        tk.load_for_inference(TutorialCNN(), device="cuda")


def test_export_archive_with_a_pickled_payload_is_read_safely(tmp_path: Path) -> None:
    import json
    import os
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    good = tk.export(nn.Linear(4, 2).eval(), torch.randn(1, 4), tmp_path / "good.pt2").path
    payload = tmp_path / "payload.pt"
    torch.save(Evil(), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("weights/model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                data = json.dumps(config).encode()
                target = name.rpartition("/")[0] + "/" + first["path_name"]
                dst.writestr(target, payload.read_bytes())
            if name.endswith("/" + "weight_0"):
                continue
            dst.writestr(name, data)
    with pytest.raises(tk.UnsafeFileError, match="trust=True"):
        tk.load_model(evil)
    with pytest.raises(tk.UnsafeFileError, match="system"):
        tk.load_state_dict(evil)
    assert not (tmp_path / "pwned").exists()


def test_cli_inspect_names_the_classes_of_a_pickled_model(vanished_class_model) -> None:
    from click.testing import CliRunner

    from torchkeep.cli import main

    path, _, marker = vanished_class_model
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "pickled model  custom_blocks.Model" in result.output
    assert "block (Block)" in result.output and "proj (Linear)" in result.output
    assert not marker.exists()
