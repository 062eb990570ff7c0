"""Exported artifacts take other batch sizes than the example's, and ONNX graphs load as modules.

Everything runs the real exporters and runtimes (torch.export, the dynamo ONNX exporter,
onnxruntime). ONNX export takes a second or two per model, so the exported files are shared
through module-scoped fixtures.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk

BATCHES = (1, 5, 7)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class FixedBatch(nn.Module):
    """Adds a buffer that has a batch dimension, so only the example's batch size works."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.arange(8.0).reshape(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + self.offset


class Branchy(nn.Module):
    """Branches on the batch size, so a program is right for a range of sizes only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] > 4 else x + 1


class Pooled(nn.Module):
    """Averages over a sequence dimension, which can be named dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(1))


def trained(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics, then eval mode."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


SHAPES = {"mlp": (6,), "cnn": (1, 8, 8)}
MODELS = {"mlp": MLP, "cnn": CNN}


def sample(kind: str, batch: int) -> torch.Tensor:
    return torch.randn(batch, *SHAPES[kind])


def eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(x)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    """Each model exported at batch 2 to .pt2 and .onnx: {(model, suffix): (model, result)}."""
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    found: dict[tuple[str, str], Any] = {}
    for name, cls in MODELS.items():
        model = trained(cls())
        for suffix in (".pt2", ".onnx"):
            with warnings.catch_warnings():
                warnings.simplefilter("error", tk.TorchkeepWarning)
                result = tk.export(model, (sample(name, 2),), folder / f"{name}{suffix}")
            found[name, suffix] = (model, result)
    return found


# ------------------------------------------------------------------------- .pt2 archives


@pytest.mark.parametrize("name", list(MODELS))
def test_pt2_runs_at_other_batch_sizes(exported: dict[Any, Any], name: str) -> None:
    model, result = exported[name, ".pt2"]
    assert result.ok and result.dynamic_batch and result.batch_sizes == (2, 5)
    program = torch.export.load(result.path).module()
    loaded = tk.load_for_inference(result.path, trust=True)
    for batch in BATCHES:
        x = sample(name, batch)
        torch.testing.assert_close(program(x), eager(model, x))
        torch.testing.assert_close(loaded(x), eager(model, x))


def test_result_names_both_batch_sizes(exported: dict[Any, Any]) -> None:
    for result in (exported["mlp", ".pt2"][1], exported["mlp", ".onnx"][1]):
        assert result.batch_sizes == (2, 5) and result.dynamic_batch
        assert "matches the eager model at batch 2 and 5" in str(result)


def test_static_option_keeps_the_example_batch(tmp_path: Path) -> None:
    model, x = trained(MLP()), torch.randn(2, 6)
    result = tk.export(model, (x,), tmp_path / "static.pt2", dynamic_batch=False)
    assert result.ok and not result.dynamic_batch and result.batch_sizes == (2,)
    assert "at batch 2 (static batch)" in str(result)
    program = torch.export.load(result.path).module()
    torch.testing.assert_close(program(x), eager(model, x))
    with pytest.raises(Exception, match=r"size\(\)\[0\] == 2"):
        program(torch.randn(5, 6))


def test_batch_one_example_still_gives_a_dynamic_program(tmp_path: Path) -> None:
    model = trained(CNN())
    result = tk.export(model, (sample("cnn", 1),), tmp_path / "one.pt2")
    assert result.ok and result.dynamic_batch and result.batch_sizes == (1, 4)
    assert "size 0 or 1" in result.note
    program = torch.export.load(result.path).module()
    for batch in BATCHES:
        x = sample("cnn", batch)
        torch.testing.assert_close(program(x), eager(model, x))


def test_a_model_that_fixes_the_batch_falls_back_to_static(tmp_path: Path) -> None:
    x = torch.randn(2, 4)
    with pytest.warns(tk.TorchkeepWarning, match="static batch"):
        result = tk.export(FixedBatch(), (x,), tmp_path / "fixed.pt2")
    assert result.ok and not result.dynamic_batch and result.batch_sizes == (2,)
    assert "takes batch 2 only" in result.note and "dynamic_batch=False" in result.note
    program = torch.export.load(result.path).module()
    torch.testing.assert_close(program(x), FixedBatch()(x))
    # The caller's example tensor is left unmarked: exporting it again works.
    torch.export.export(FixedBatch(), (x,))


def test_a_batch_range_is_reported_and_checked_inside_it(tmp_path: Path) -> None:
    result = tk.export(Branchy(), (torch.randn(2, 3),), tmp_path / "branchy.pt2")
    assert result.ok and result.dynamic_batch and result.batch_sizes == (2, 4)
    assert "batch sizes 2 to 4 only" in result.note


def test_the_check_fails_when_the_artifact_does_not_generalise(tmp_path: Path) -> None:
    class Unscriptable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = {"a": 2.0}.get("a", 1.0) if x.ndim == 2 else None
            rows = torch.arange(int(x.shape[0]), dtype=x.dtype)  # traced as a constant
            return x * scale + rows[:, None]  # type: ignore[operator]

    with pytest.warns(tk.TorchkeepWarning, match="DOES NOT MATCH"):
        result = tk.export(Unscriptable(), torch.randn(2, 3), tmp_path / "u.ts")
    assert result.method == "trace" and not result.ok
    assert result.batch_sizes == (2, 5) and result.dynamic_batch
    assert "at batch 5" in result.note and "frozen the batch size" in result.note


def test_named_dimensions(tmp_path: Path) -> None:
    model = trained(Pooled())
    result = tk.export(
        model, (torch.randn(2, 6, 4),), tmp_path / "seq.pt2", dynamic_dims={"x": {1: "seq"}}
    )
    assert result.ok and result.batch_sizes == (2, 5)
    program = torch.export.load(result.path).module()
    x = torch.randn(3, 9, 4)
    torch.testing.assert_close(program(x), eager(model, x))
    # By position, with a static batch: only the sequence varies.
    fixed = tk.export(
        model,
        torch.randn(2, 6, 4),
        tmp_path / "s.pt2",
        dynamic_batch=False,
        dynamic_dims={0: {-2: "seq"}},
    )
    program = torch.export.load(fixed.path).module()
    torch.testing.assert_close(program(torch.ones(2, 11, 4)), eager(model, torch.ones(2, 11, 4)))
    with pytest.raises(Exception, match="== 2"):
        program(torch.ones(3, 6, 4))


def test_named_dimension_errors(tmp_path: Path) -> None:
    x = torch.randn(2, 6, 4)
    with pytest.raises(tk.InvalidArgumentError, match="'x'"):
        tk.export(Pooled(), x, tmp_path / "a.pt2", dynamic_dims={"y": {1: "seq"}})
    with pytest.raises(tk.InvalidArgumentError, match="3 dimensions"):
        tk.export(Pooled(), x, tmp_path / "a.pt2", dynamic_dims={"x": {3: "seq"}})
    with pytest.raises(tk.InvalidArgumentError, match="identifier"):
        tk.export(Pooled(), x, tmp_path / "a.pt2", dynamic_dims={"x": {1: "seq len"}})
    # The last dimension feeds a Linear(4, 2), so the model fixes it: a clear error.
    with pytest.raises(tk.ExportError, match="dynamic_dims"):
        tk.export(Pooled(), x, tmp_path / "a.pt2", dynamic_dims={"x": {2: "features"}})
    assert not (tmp_path / "a.pt2").exists()


# --------------------------------------------------------------------------- ONNX graphs


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runs_at_other_batch_sizes(exported: dict[Any, Any], name: str) -> None:
    import onnxruntime

    model, result = exported[name, ".onnx"]
    assert result.ok and result.dynamic_batch and result.batch_sizes == (2, 5)
    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    loaded = tk.load_for_inference(result.path)
    assert not loaded.training and not list(loaded.parameters())
    for batch in BATCHES:
        x = sample(name, batch)
        (direct,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(direct), eager(model, x))
        out = loaded(x)
        assert isinstance(out, torch.Tensor) and not out.requires_grad
        torch.testing.assert_close(out, eager(model, x))


def test_onnx_is_one_file(exported: dict[Any, Any]) -> None:
    path = Path(exported["cnn", ".onnx"][1].path)
    assert sorted(p.name for p in path.parent.glob("cnn.onnx*")) == ["cnn.onnx"]
    assert not [p for p in path.parent.iterdir() if "tmp-torchkeep" in p.name]


def test_onnx_is_told_by_its_bytes_not_its_name(exported: dict[Any, Any], tmp_path: Path) -> None:
    model, result = exported["mlp", ".onnx"]
    renamed = tmp_path / "graph.bin"
    renamed.write_bytes(Path(result.path).read_bytes())
    x = sample("mlp", 3)
    torch.testing.assert_close(tk.load_model(renamed)(x), eager(model, x))
    impostor = tmp_path / "fake.onnx"
    impostor.write_bytes(b"\x08\x07this is not a protobuf model at all")
    with pytest.raises(tk.UnknownFormatError, match="not a format torchkeep reads"):
        tk.load_for_inference(impostor)
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(Path(result.path).read_bytes()[:-10])
    with pytest.raises(tk.UnknownFormatError):
        tk.load_for_inference(truncated)


def test_onnx_module_refuses_what_a_graph_cannot_do(exported: dict[Any, Any]) -> None:
    path = exported["mlp", ".onnx"][1].path
    with pytest.raises(tk.InvalidArgumentError, match="without cls="):
        tk.load_model(path, cls=MLP)
    with pytest.raises(tk.InvalidArgumentError, match="inference only"):
        tk.load_model(path, train=True)
    with pytest.raises(tk.InvalidArgumentError, match="float16"):
        tk.load_for_inference(path, dtype=torch.float16)
    graph = tk.load_for_inference(path)
    with pytest.raises(tk.InvalidStateError, match="inference only"):
        graph.train()
    with pytest.raises(tk.InvalidArgumentError, match=r"x: float\[batch, 6\]"):
        graph(torch.ones(2, 6), torch.ones(2, 6))
    with pytest.raises(tk.InvalidArgumentError, match="refused the inputs"):
        graph(torch.ones(2, 5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_onnx_on_missing_cuda_is_a_device_error(exported: dict[Any, Any]) -> None:
    with pytest.raises(tk.DeviceError, match="CUDA"):
        tk.load_for_inference(exported["mlp", ".onnx"][1].path, device="cuda")


def test_onnx_without_onnxruntime_names_the_extra(
    exported: dict[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(tk.MissingDependencyError, match=r"torchkeep\[onnx\]"):
        tk.load_for_inference(exported["mlp", ".onnx"][1].path)


def test_onnx_weights_outside_the_folder_need_trust(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    secret = tmp_path / "secret.bin"
    secret.write_bytes(torch.arange(4, dtype=torch.float32).numpy().tobytes())
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "../secret.bin", "offset": "0", "length": "16"}.items():
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[weight],
    )
    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / "evil.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(tk.UnsafeFileError, match="outside the model's folder"):
        tk.load_for_inference(path)


@pytest.mark.slow
def test_onnx_static_option_and_fallback(tmp_path: Path) -> None:
    model, x = trained(MLP()), torch.randn(2, 6)
    result = tk.export(model, (x,), tmp_path / "static.onnx", dynamic_batch=False)
    assert result.ok and not result.dynamic_batch and result.batch_sizes == (2,)
    graph = tk.load_for_inference(result.path)
    torch.testing.assert_close(graph(x), eager(model, x))
    with pytest.raises(tk.InvalidArgumentError, match="refused the inputs"):
        graph(torch.randn(5, 6))
    with pytest.warns(tk.TorchkeepWarning, match="static batch"):
        fixed = tk.export(FixedBatch(), torch.randn(2, 4), tmp_path / "fixed.onnx")
    assert fixed.ok and not fixed.dynamic_batch and fixed.batch_sizes == (2,)


@pytest.mark.slow
def test_onnx_named_dimensions_and_batch_one(tmp_path: Path) -> None:
    import onnx

    model = trained(Pooled())
    result = tk.export(
        model, torch.randn(1, 6, 4), tmp_path / "seq.onnx", dynamic_dims={"x": {1: "seq"}}
    )
    assert result.ok and result.batch_sizes == (1, 4)
    dims = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "seq", 4]
    x = torch.randn(5, 9, 4)
    torch.testing.assert_close(tk.load_for_inference(result.path)(x), eager(model, x))
