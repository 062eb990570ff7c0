"""TorchScript and torch.export archives: weights read without running them, models only
with trust, and save_model records that never import on the file's say-so."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import torchkeep as tk
from torchkeep.cli import main

# ------------------------------------------------------------------------------ models


class LinearNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)[:, :6])


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class Nested(nn.Module):
    """Sequential, ModuleList, ModuleDict, a non-persistent buffer and a plain tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})
        self.register_buffer("scale", torch.full((2,), 0.5))
        self.register_buffer("offset", torch.arange(2.0), persistent=False)
        self.plain = torch.ones(2)  # an attribute, neither parameter nor buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x).mean((2, 3))
        for block in self.blocks:
            y = torch.relu(block(y))
        return self.heads["a"](y) * self.scale + self.heads["b"](y) + self.offset + self.plain


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.enc(x.flatten(1)[:, :4])))


MODELS: dict[str, type[nn.Module]] = {
    "linear": LinearNet,
    "convbn": ConvBN,
    "nested": Nested,
    "tied": Tied,
}
X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def trained(cls: type[nn.Module]) -> nn.Module:
    """A model whose batch-norm statistics moved away from their initial values."""
    torch.manual_seed(1)
    model = cls()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 6, 6))
    return model.eval()


def make(kind: str, model: nn.Module, path: Path) -> Path:
    if kind == "script":
        torch.jit.save(torch.jit.script(model), str(path))
    elif kind == "trace":
        torch.jit.save(torch.jit.trace(model, (X,)), str(path))
    else:
        torch.export.save(torch.export.export(model, (X,)), str(path))
    return path


def torch_state(kind: str, path: Path) -> dict[str, torch.Tensor]:
    """The weights as torch's own loaders give them (these run the file: test files only)."""
    if kind == "export":
        return torch.export.load(str(path)).module().state_dict()
    return torch.jit.load(str(path)).state_dict()


SUFFIX = {"script": ".ts", "trace": ".pt", "export": ".pt2"}
FORMAT = {"script": "torchscript", "trace": "torchscript", "export": "torch-export"}


@pytest.fixture(params=[(k, m) for k in ("script", "trace", "export") for m in MODELS])
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, nn.Module, Path]:
    kind, name = request.param
    model = trained(MODELS[name])
    return kind, name, model, make(kind, model, tmp_path / f"{name}{SUFFIX[kind]}")


# ------------------------------------------------------------------- weights, no trust


def test_weights_equal_torchs_own_loader(archive: tuple[str, str, nn.Module, Path]) -> None:
    kind, _, _, path = archive
    ours = tk.load_state_dict(path)
    reference = torch_state(kind, path)
    assert list(ours) == list(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


def test_load_into_a_fresh_model_gives_the_same_outputs(
    archive: tuple[str, str, nn.Module, Path],
) -> None:
    _, name, model, path = archive
    torch.manual_seed(123)
    fresh = MODELS[name]().eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(X), model(X))
    report = tk.load(fresh, path, strict=False)
    assert report.missing == () and report.mismatched == ()
    # TorchScript keeps non-persistent buffers in its state dict; the eager model does not.
    assert set(report.unexpected) <= {"offset"}
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
    if name == "tied":
        assert fresh.dec.weight is fresh.enc.weight


def test_inspect_lists_the_tensors(archive: tuple[str, str, nn.Module, Path]) -> None:
    kind, name, _, path = archive
    info = tk.inspect(path)
    reference = torch_state(kind, path)
    assert info.format == FORMAT[kind]
    assert [t.name for t in info.tensors] == list(reference)
    assert [t.shape for t in info.tensors] == [tuple(t.shape) for t in reference.values()]
    assert info.num_params == sum(t.numel() for t in reference.values())
    if kind != "export":  # TorchScript records each module's class
        layer, cls = {
            "linear": ("fc", "linear.Linear"),
            "convbn": ("conv", "conv.Conv2d"),
            "nested": ("body.1", "batchnorm.BatchNorm2d"),
            "tied": ("dec", "linear.Linear"),
        }[name]
        classes = {m.name: m.type for m in info.modules}
        assert classes[layer] == f"torch.nn.modules.{cls}"
        assert classes[""].endswith(MODELS[name].__name__)


def test_torchscript_keeps_non_persistent_buffers_but_not_plain_tensors(tmp_path: Path) -> None:
    path = make("script", trained(Nested), tmp_path / "n.ts")
    names = list(tk.load_state_dict(path))
    assert "offset" in names and "plain" not in names
    exported = make("export", trained(Nested), tmp_path / "n.pt2")
    names = list(tk.load_state_dict(exported))
    assert "offset" not in names and "scale" in names


# ----------------------------------------------------------------------- trust gates


@pytest.mark.parametrize("kind", ["script", "export"])
def test_models_from_archives_need_trust(kind: str, tmp_path: Path) -> None:
    model = trained(ConvBN)
    path = make(kind, model, tmp_path / f"m{SUFFIX[kind]}")
    what = "TorchScript" if kind == "script" else "torch.export"
    for load in (tk.load_model, tk.load_for_inference):
        with pytest.raises(tk.UnsafeFileError) as caught:
            load(path)
        message = str(caught.value)
        assert what in message and "runs" in message
        assert "trust=True" in message and "load_state_dict" in message
    for ready in (tk.load_model(path, trust=True), tk.load_for_inference(path, trust=True)):
        with torch.no_grad():
            assert torch.allclose(ready(X), model(X), atol=1e-6)
    rebuilt = tk.load_model(path, cls=ConvBN)  # weights into a class the caller chose
    assert isinstance(rebuilt, ConvBN) and not rebuilt.training
    with torch.no_grad():
        assert torch.equal(rebuilt(X), model(X))


class Restoring(nn.Module):
    """A module whose scripted __setstate__ creates a file (torch.from_file, shared=True)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.marker = state[1]
        self.training = torch.from_file(self.marker, True, 4).numel() == 4 and state[2]


class Host(nn.Module):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.inner = Restoring(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.fc(x))


def test_hostile_torchscript_setstate_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "hostile.pt"
    torch.jit.save(torch.jit.script(Host(str(marker))), str(path))
    assert not marker.exists()
    with pytest.raises(tk.UnsafeFileError, match="__setstate__"):
        tk.load_state_dict(path)
    with pytest.raises(tk.UnsafeFileError, match="__setstate__"):
        tk.inspect(path)
    with pytest.raises(tk.UnsafeFileError, match="trust=True"):
        tk.load_model(path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2 and "__setstate__" in result.output
    assert not marker.exists()
    tk.load_model(path, trust=True)  # torch's loader runs the file's code...
    assert marker.exists()  # ...which is what every refusal above kept from happening


# ------------------------------------------------------------- save_model class records


def _recorded(tmp_path: Path, spec: str) -> Path:
    record = json.dumps({"class": spec, "init": {}, "version": 1})
    return tk.save(LinearNet(), tmp_path / "m.safetensors", metadata={"torchkeep.model": record})


def test_record_naming_an_unimported_module_never_imports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    module = "tk_records_marker_mod"
    (tmp_path / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from torch import nn\n\nclass Net(nn.Module):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _recorded(tmp_path, f"{module}:Net")
    for load in (tk.load_model, tk.load_for_inference):
        with pytest.raises(tk.UnsafeFileError) as caught:
            load(path)
        message = str(caught.value)
        assert module in message and "trust=True" in message and "cls=" in message
    assert module not in sys.modules and not marker.exists()
    rebuilt = tk.load_model(path, cls=LinearNet)
    assert isinstance(rebuilt, LinearNet) and module not in sys.modules
    try:
        with pytest.raises(tk.KeyMismatchError):  # imported now, as trusted; an empty Net
            tk.load_model(path, trust=True)
        assert marker.exists()
    finally:
        sys.modules.pop(module, None)


def test_record_lookup_in_an_imported_module_runs_no_hooks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "hooked"

    def hook(name: str) -> type[nn.Module]:
        marker.write_text(name)
        return LinearNet

    lazy = types.ModuleType("tk_records_lazy_mod")
    lazy.__getattr__ = hook  # type: ignore[method-assign]
    lazy.NotAModule = print  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tk_records_lazy_mod", lazy)
    with pytest.raises(tk.ModelRebuildError, match="has no"):
        tk.load_model(_recorded(tmp_path, "tk_records_lazy_mod:Net"))
    assert not marker.exists()
    with pytest.raises(tk.UnsafeFileError, match="not an nn.Module"):
        tk.load_model(_recorded(tmp_path, "tk_records_lazy_mod:NotAModule"))
    lazy.Net = LinearNet  # type: ignore[attr-defined]
    assert isinstance(tk.load_model(_recorded(tmp_path, "tk_records_lazy_mod:Net")), LinearNet)
    assert not marker.exists()


# --------------------------------------------------------------------- hostile .pt2


def rewrite(src: Path, dst: Path, change: Callable[[str, bytes], tuple[str, bytes] | None]) -> Path:
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for name in old.namelist():
            changed = change(name, old.read(name))
            if changed is not None:
                new.writestr(changed[0], changed[1])
    return dst


@pytest.fixture
def pt2(tmp_path: Path) -> Path:
    return make("export", trained(ConvBN), tmp_path / "good.pt2")


def test_pt2_member_differing_in_case_is_refused(pt2: Path, tmp_path: Path) -> None:
    bad = rewrite(
        pt2,
        tmp_path / "case.pt2",
        lambda n, d: (n.replace("weights/weight_0", "weights/WEIGHT_0"), d),
    )
    with pytest.raises(tk.UnsafeFileError, match="case"):
        tk.load_state_dict(bad)


def _edit_config(edit: Callable[[dict], None]) -> Callable[[str, bytes], tuple[str, bytes]]:
    def change(name: str, data: bytes) -> tuple[str, bytes]:
        if name.endswith("weights/model_weights_config.json"):
            config = json.loads(data)
            edit(config["config"]["conv.weight"])
            data = json.dumps(config).encode()
        return name, data

    return change


@pytest.mark.parametrize(
    "edit, error",
    [
        (lambda m: m["tensor_meta"]["sizes"][0].update(as_int=400), "reaches element"),
        (lambda m: m["tensor_meta"]["storage_offset"].update(as_int=1), "reaches element"),
        (lambda m: m["tensor_meta"].update(dtype=5), "whole number|reaches element"),
        (lambda m: m["tensor_meta"].update(dtype=99), "dtype code"),
        (lambda m: m["tensor_meta"]["sizes"][0].update(as_int=True), "integer"),
        (lambda m: m.update(path_name="../../etc"), "record name"),
        (lambda m: m.update(path_name="weight_77"), "lacks"),
        (lambda m: m["tensor_meta"].update(layout=1), "strided"),
    ],
)
def test_pt2_weights_config_is_validated(
    pt2: Path, tmp_path: Path, edit: Callable[[dict], None], error: str
) -> None:
    bad = rewrite(pt2, tmp_path / "bad.pt2", _edit_config(edit))
    with pytest.raises(tk.CorruptFileError, match=error):
        tk.load_state_dict(bad)


def test_pt2_from_earlier_torch_layout(tmp_path: Path) -> None:
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch._export.serde.serialize import serialize

    model = trained(ConvBN)
    artifact = serialize(torch.export.export(model, (X,)))
    path = tmp_path / "old.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("serialized_exported_program.json", artifact.exported_program)
        archive.writestr("serialized_state_dict.pt", artifact.state_dict)
        archive.writestr("serialized_constants.pt", artifact.constants)
        archive.writestr("serialized_example_inputs.pt", artifact.example_inputs)
        archive.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
    ours = tk.load_state_dict(path)
    reference = torch_state("export", path)
    assert list(ours) == list(reference)
    assert all(torch.equal(ours[k], v) for k, v in reference.items())
    with pytest.raises(tk.UnsafeFileError, match="trust=True"):
        tk.load_model(path)


# ------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_reads_archives(tmp_path: Path) -> None:
    model = trained(ConvBN)
    ts = make("script", model, tmp_path / "m.ts")
    pt2 = make("export", model, tmp_path / "m.pt2")
    runner = CliRunner()
    out = tmp_path / "m.safetensors"
    assert runner.invoke(main, ["convert", str(ts), str(out)]).exit_code == 0
    converted = tk.load_state_dict(out)
    assert all(torch.equal(converted[k], v) for k, v in torch_state("script", ts).items())
    result = runner.invoke(main, ["diff", str(ts), str(pt2)])
    assert result.exit_code == 0, result.output
    for path in (ts, pt2):
        result = runner.invoke(main, ["verify", str(path)])
        assert result.exit_code == 0, result.output
    # The real command, once.
    run = subprocess.run(
        [sys.executable, "-m", "torchkeep", "inspect", "--json", str(pt2)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    shown = json.dumps(json.loads(run.stdout))
    assert "torch-export" in shown and "bn.running_var" in shown and "conv.weight" in shown
