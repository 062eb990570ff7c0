"""The layouts people really have, each compared with what torch's own loading path gives.

Every test builds the file the way its users do (a real Lightning fit with omegaconf
hyper-parameters, the tutorials' checkpoint dict written by a script, ``torch.save`` of a
DataParallel model, ...), reads it with torchkeep without trust, and checks the same
parameters (``torch.equal``) and the same outputs on a fixed input as
``torch.load(weights_only=False)`` followed by ``load_state_dict``.
"""

from __future__ import annotations

import argparse
import enum
import os
import pickle
import subprocess
import sys
import textwrap
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.formats.manifest import read_manifest
from torchkeep.safety.stubs import StubObject, find_stubs
from torchkeep.safety.unpickle import safe_pickle_load, scan_file

# ---------------------------------------------------------------------------------- models


class ClassNet(nn.Module):
    """The tutorials' classifier: linear layers, batch norm and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


class Wide(nn.Module):
    """Keeps its constructor arguments as attributes of the same names."""

    def __init__(self, width: int = 4, classes: int = 2, act: str = "relu") -> None:
        super().__init__()
        self.width = width
        self.classes = classes
        self.act = act
        self.body = nn.Linear(6, width)
        self.head = nn.Linear(width, classes)
        self.nonlin = nn.GELU() if act == "gelu" else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.nonlin(self.body(x)))


class Hidden(nn.Module):
    """Does not keep its constructor argument anywhere."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.body = nn.Linear(6, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Scaled(nn.Module):
    """Has an attribute named like a parameter that does not hold the argument."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.dim = dim * 2
        self.body = nn.Linear(dim, dim)


class NeedsData(nn.Module):
    """A constructor that reads a tensor's value, which the meta device cannot give."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.width = width
        self.body = nn.Linear(6, int(torch.ones(width).sum().item()))


class Settings:
    """A user's config object pickled beside the weights."""

    def __init__(self) -> None:
        self.lr = 0.1


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@dataclass
class Inner:
    depth: int = 2


@dataclass
class TrainConfig:
    """A structured omegaconf config: typed fields, a union, an enum, nested dataclasses."""

    lr: float = 0.01
    layers: list[int] = field(default_factory=lambda: [8, 4])
    name: typing.Optional[str] = "run"  # noqa: UP045 - omegaconf reads typing's spelling
    size: typing.Union[int, str] = 3  # noqa: UP007 - pickled as operator.getitem(Union, ...)
    scales: dict[str, float] = field(default_factory=lambda: {"a": 1.0})
    color: Color = Color.BLUE
    inner: Inner = field(default_factory=Inner)


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))


def fresh(cls: type[nn.Module] = ClassNet, seed: int = 1, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kwargs)


def trained(seed: int = 0) -> ClassNet:
    """A ClassNet whose batch-norm statistics moved, so eval() and train() outputs differ."""
    model = fresh(seed=seed)
    assert isinstance(model, ClassNet)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 6))
    return model


def same_parameters(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def same_outputs(a: nn.Module, b: nn.Module) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(X), b(X))


def run_script(tmp_path: Path, body: str) -> None:
    """Run ``body`` as a script, so its classes live in ``__main__`` as in a tutorial."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, env=env, timeout=300)


# ------------------------------------------------------------ 1. allowlist: plain data


def test_typing_any_and_torch_version_are_plain_data(tmp_path: Path) -> None:
    version = torch.__version__
    assert type(version) is not str  # torch's TorchVersion, a str subclass
    path = tmp_path / "values.pt"
    torch.save({"torch_version": version, "ref_type": typing.Any, "w": torch.ones(2)}, path)
    expected = torch.load(path, weights_only=False)
    extra = tk.load_checkpoint(path)
    assert extra["torch_version"] == expected["torch_version"] == str(version)
    assert isinstance(extra["torch_version"], str)
    assert extra["torch_version"] >= "2.0"  # still compares as a version
    assert extra["ref_type"] is typing.Any is expected["ref_type"]
    assert torch.equal(tk.load_state_dict(path)["w"], expected["w"])
    assert scan_file(str(path)).verdict == "safe"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # _reconstructor (0, 1), NEWOBJ (2+)
        data = pickle.dumps({"v": version, "t": typing.Any}, protocol=protocol)
        value = safe_pickle_load(data, path=f"protocol {protocol}")
        assert value["v"] == version and isinstance(value["v"], str)
        assert value["t"] is typing.Any


class _Call:
    """Pickles as ``func(*args)``."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


@pytest.mark.parametrize(
    "payload",
    [
        _Call(getattr, Settings(), "lr"),  # still dangerous
        _Call(torch.torch_version.TorchVersion, 12),  # not from text
        _Call(torch.torch_version.TorchVersion, "2." * 200),  # not a version's length
    ],
    ids=["getattr", "TorchVersion-int", "TorchVersion-long"],
)
def test_what_the_new_names_allow_stops_there(tmp_path: Path, payload: Any) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"w": torch.ones(1), "x": payload}, path)
    with pytest.raises(tk.UnsafeFileError):
        tk.load_checkpoint(path)
    with pytest.raises(tk.UnsafeFileError):
        tk.load_state_dict(path)


def test_operator_getitem_only_subscripts_stand_ins(tmp_path: Path) -> None:
    import operator

    refused = [
        _Call(operator.getitem, {"a": 1}, "a"),  # a real dict: that would really run
        _Call(operator.getitem, typing.Any, int),  # an allowlisted object, not a stand-in
    ]
    for payload in refused:
        path = tmp_path / "getitem.pt"
        torch.save({"w": torch.ones(1), "x": payload}, path)
        with pytest.raises(tk.UnsafeFileError, match="operator.getitem"):
            tk.load_checkpoint(path)
    path = tmp_path / "alias.pt"
    alias = typing.Union[int, Settings]  # noqa: UP007
    torch.save({"w": torch.ones(1), "hyper_parameters": {"t": alias}}, path)
    value = tk.load_checkpoint(path)["hyper_parameters"]["t"]
    assert isinstance(value, StubObject)
    assert value.stub_qualname == "typing.Union[]"


class _Chain:
    """Pickles as ``Settings()()()...``: a stand-in's result called again, ``depth`` times."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __call__(self) -> _Chain:  # pickle wants a callable; never called here
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        if self.depth == 0:
            return Settings, ()
        return _Chain(self.depth - 1), ()


def test_a_stand_in_called_again_and_again_keeps_a_short_name() -> None:
    value = safe_pickle_load(pickle.dumps(_Chain(300), protocol=2), path="chain", stubs=True)
    assert isinstance(value, StubObject)
    assert value.stub_qualname == f"{__name__}.Settings()"


# ------------------------------------------------------ 1. Lightning + omegaconf checkpoints


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A real Lightning fit of one step on CPU, hyper-parameters an omegaconf DictConfig."""
    lightning = pytest.importorskip("lightning")
    omegaconf = pytest.importorskip("omegaconf")

    class LitClassifier(lightning.LightningModule):
        def __init__(self, cfg: Any) -> None:
            super().__init__()
            self.save_hyperparameters(cfg)
            self.net = ClassNet()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    root = tmp_path_factory.mktemp("lightning")
    cfg = omegaconf.OmegaConf.create(
        {
            "train": omegaconf.OmegaConf.structured(TrainConfig),
            "run": {"seed": 0, "tags": ["a", "b"], "out": "${train.name}-out", "note": None},
        }
    )
    torch.manual_seed(0)
    model = LitClassifier(cfg)
    data = torch.utils.data.TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    trainer = lightning.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    path = root / "fit.ckpt"
    trainer.save_checkpoint(path)
    return path, model


def test_lightning_omegaconf_checkpoint_loads_without_trust(lightning_ckpt) -> None:
    path, lit = lightning_ckpt
    # torch's own path, for comparison (it imports and runs omegaconf's classes).
    reference = fresh()
    raw = torch.load(path, weights_only=False)
    reference.load_state_dict({k.removeprefix("net."): v for k, v in raw["state_dict"].items()})

    scan = scan_file(str(path))
    assert scan.verdict == "unknown"  # stand-ins, nothing dangerous
    assert "omegaconf.dictconfig.DictConfig" in scan.globals
    assert "_operator.getitem" in scan.globals  # the Union field, subscripted on stand-ins

    state = tk.load_state_dict(path)
    assert all(torch.equal(state[k], v) for k, v in raw["state_dict"].items())
    model = fresh()
    tk.load(model, path)
    same_parameters(model, reference)
    same_outputs(model, reference)
    same_outputs(model, lit.net)

    info = tk.inspect(path)
    assert info.entry == "state_dict"
    assert "omegaconf.dictconfig.DictConfig" in info.stubbed

    target = fresh()
    extra = tk.load_checkpoint(path, model=target, rng=False)
    same_parameters(target, reference)
    same_outputs(target, reference)
    assert extra["epoch"] == raw["epoch"] and extra["global_step"] == raw["global_step"] == 1
    hyper = extra["hyper_parameters"]
    assert isinstance(hyper, StubObject)
    found = set(find_stubs(hyper))
    assert {"omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig"} <= found
    assert any(name.startswith("omegaconf.nodes.") for name in found)
    assert f"{__name__}.Color" in found  # the enum value, as a stand-in
    assert extra["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-2)


def test_lightning_checkpoint_with_a_payload_is_still_refused(lightning_ckpt, tmp_path) -> None:
    path, _ = lightning_ckpt
    raw = torch.load(path, weights_only=False)
    marker = tmp_path / "ran"
    raw["callbacks"] = {"evil": _Call(os.system, f"touch {marker}")}
    bad = tmp_path / "bad.ckpt"
    torch.save(raw, bad)
    for verb in (tk.load_checkpoint, tk.load_state_dict, tk.inspect):
        with pytest.raises(tk.UnsafeFileError, match="system"):
            verb(bad)
    assert not marker.exists()


def test_stand_ins_come_back_only_as_configuration(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"sched": Settings(), "model_state_dict": fresh().state_dict()}, path)
    # A user's object elsewhere would look like the real thing without its methods.
    with pytest.raises(tk.UnsafeFileError, match="trust=True") as refused:
        tk.load_checkpoint(path, rng=False)
    assert refused.value.globals == (f"{__name__}.Settings",)
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(fresh().parameters()), 1)
    with pytest.raises(tk.InvalidStateError, match="trust=True"):
        tk.load_checkpoint(path, sched=scheduler, rng=False)
    model = fresh(seed=7)
    with pytest.raises(tk.UnsafeFileError):
        tk.load_checkpoint(path, model=model, rng=False)
    assert tk.load_checkpoint(path, trust=True, rng=False)["sched"].lr == 0.1
    # Under Lightning's hyper-parameter entries they are data.
    torch.save({"hyper_parameters": {"opt": Settings()}, "state_dict": {}}, path)
    extra = tk.load_checkpoint(path, rng=False)
    assert isinstance(extra["hyper_parameters"]["opt"], StubObject)
    assert extra["hyper_parameters"]["opt"].lr == 0.1  # its state, as data


# --------------------------------------------------------------- 2. DataParallel pickles


@pytest.mark.parametrize("wrapped", [True, False], ids=["DataParallel", "plain"])
def test_whole_model_pickle_of_a_user_class(tmp_path: Path, wrapped: bool) -> None:
    model = trained()
    path = tmp_path / "whole.pt"
    torch.save(nn.DataParallel(model) if wrapped else model, path)
    with pytest.raises(tk.UnsafeFileError, match=r"trust=True.*cls=") as refused:
        tk.load_model(path)
    assert f"{__name__}.ClassNet" in refused.value.globals

    loaded = torch.load(path, weights_only=False)
    reference = loaded.module if wrapped else loaded
    for kwargs in ({"trust": True}, {"cls": ClassNet}):
        rebuilt = tk.load_model(path, **kwargs)
        assert type(rebuilt) is ClassNet
        assert not any(k.startswith("module.") for k in rebuilt.state_dict())
        same_parameters(rebuilt, reference)
        same_outputs(rebuilt, reference)
    # The weights need no class at all.
    state = tk.load_state_dict(path)
    assert {k.removeprefix("module."): v for k, v in state.items()}.keys() == (
        reference.state_dict().keys()
    )


@pytest.mark.parametrize("wrapped", [True, False], ids=["DataParallel", "plain"])
def test_whole_model_pickle_of_torch_nn_layers_needs_no_trust(tmp_path: Path, wrapped) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    path = tmp_path / "seq.pt"
    torch.save(nn.DataParallel(model) if wrapped else model, path)
    loaded = torch.load(path, weights_only=False)
    reference = loaded.module if wrapped else loaded
    rebuilt = tk.load_model(path)
    assert type(rebuilt) is nn.Sequential
    same_parameters(rebuilt, reference)
    same_outputs(rebuilt, reference)


# ----------------------------------------------- 3. the tutorials' dict with a pickled model


@pytest.fixture(scope="module")
def tutorial_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tutorials' checkpoint, written by a script whose ClassNet lives in __main__."""
    root = tmp_path_factory.mktemp("tutorial")
    run_script(
        root,
        """
        import torch
        from torch import nn

        class ClassNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = nn.Linear(6, 8)
                self.bn = nn.BatchNorm1d(8)
                self.drop = nn.Dropout(0.5)
                self.fc2 = nn.Linear(8, 3)

            def forward(self, x):
                return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))

        torch.manual_seed(0)
        model = ClassNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(16, 6)).sum().backward()
            optimizer.step()
        torch.save({
            "epoch": 5,
            "model": model,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": 0.25,
        }, "tutorial.pt")
        torch.save({"model": model, "epoch": 5}, "model_only.pt")
        torch.save(model, "whole.pt")
        """,
    )
    return root


@pytest.fixture
def main_classnet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets torch.load(weights_only=False) find the script's class, for the comparisons."""
    monkeypatch.setattr(sys.modules["__main__"], "ClassNet", ClassNet, raising=False)


def test_tutorial_dict_with_a_pickled_model_restores_without_trust(
    tutorial_files: Path, main_classnet: None
) -> None:
    path = tutorial_files / "tutorial.pt"
    raw = torch.load(path, weights_only=False)
    reference = fresh()
    reference.load_state_dict(raw["model_state_dict"])
    reference_opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    reference_opt.load_state_dict(raw["optimizer_state_dict"])

    model = fresh(seed=7)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    extra = tk.load_checkpoint(path, model=model, optimizer=optimizer, rng=False)
    same_parameters(model, reference)
    same_outputs(model, reference)
    assert extra == {"epoch": 5, "loss": 0.25}  # the pickled module was not handed back
    ours, theirs = optimizer.state_dict(), reference_opt.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for index, slots in theirs["state"].items():
        for key, value in slots.items():
            assert torch.equal(ours["state"][index][key], value)


def test_a_pickled_model_that_is_the_only_source_gives_the_weights(
    tutorial_files: Path, main_classnet: None
) -> None:
    path = tutorial_files / "model_only.pt"
    reference = torch.load(path, weights_only=False)["model"]
    for trust in (False, True):
        model = fresh(seed=7)
        extra = tk.load_checkpoint(path, model=model, trust=trust, rng=False)
        same_parameters(model, reference)
        same_outputs(model, reference)
        assert extra == {"epoch": 5}


def test_a_script_class_is_unknown_not_dangerous(tutorial_files: Path, main_classnet) -> None:
    path = tutorial_files / "whole.pt"
    scan = scan_file(str(path))
    assert scan.globals["__main__.ClassNet"] == "unknown"
    with pytest.raises(tk.UnsafeFileError) as refused:
        tk.load_model(path)
    assert "DANGEROUS" not in str(refused.value) and "cls=" in str(refused.value)
    reference = torch.load(path, weights_only=False)
    model = tk.load_model(path, cls=ClassNet)
    same_parameters(model, reference)
    same_outputs(model, reference)


# --------------------------------------------------------------- 4. load_for_inference


def test_load_for_inference_into_a_given_model(tutorial_files: Path, main_classnet) -> None:
    path = tutorial_files / "tutorial.pt"
    reference = fresh()
    reference.load_state_dict(torch.load(path, weights_only=False)["model_state_dict"])
    reference.eval()

    model = fresh(seed=7)
    model.train()
    returned = tk.load_for_inference(model, path)
    assert returned is model
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    same_parameters(model, reference)
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))

    with pytest.raises(tk.KeyMismatchError):
        tk.load_for_inference(fresh(Wide, width=5), path)
    with pytest.raises(tk.InvalidStateError, match="swapped"):
        tk.load_for_inference(path, fresh())  # type: ignore[arg-type]
    with pytest.raises(tk.InvalidArgumentError, match="cls="):
        tk.load_for_inference(fresh(), path, cls=ClassNet)


def test_load_for_inference_keeps_its_other_forms(tmp_path: Path) -> None:
    model = trained()
    path = tmp_path / "net.safetensors"
    tk.save_model(model, path)
    rebuilt = tk.load_for_inference(path)
    assert type(rebuilt) is ClassNet and not rebuilt.training
    assert not any(p.requires_grad for p in rebuilt.parameters())
    same_outputs(rebuilt, model)
    same = tk.load_for_inference(model)
    assert same is model and not model.training
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------- 5. save_model records what rebuilds


def test_save_model_records_arguments_kept_as_attributes(tmp_path: Path) -> None:
    model = fresh(Wide, width=7, classes=5, act="gelu")
    path = tmp_path / "wide.safetensors"
    tk.save_model(model, path)
    rebuilt = tk.load_model(path)
    assert isinstance(rebuilt, Wide) and isinstance(rebuilt.nonlin, nn.GELU)
    assert (rebuilt.width, rebuilt.classes, rebuilt.act) == (7, 5, "gelu")
    same_parameters(rebuilt, model)
    same_outputs(rebuilt, model)
    # Defaults are not recorded.
    tk.save_model(fresh(Wide), tmp_path / "default.safetensors")
    record = tk.inspect(tmp_path / "default.safetensors").metadata["torchkeep.model"]
    assert '"init": {}' in record


def test_save_model_refuses_a_record_that_would_not_rebuild(tmp_path: Path) -> None:
    model = fresh(Hidden, hidden=9)
    path = tmp_path / "hidden.safetensors"
    with pytest.raises(tk.InvalidStateError, match=r"init=") as refused:
        tk.save_model(model, path)
    assert "body.weight is [4, 6], not [9, 6]" in str(refused.value)
    assert not path.exists()
    with pytest.raises(tk.InvalidStateError, match=r"init="):
        tk.save_model(model, path, init={"hidden": 8})  # wrong
    with pytest.raises(tk.InvalidStateError, match="raised TypeError"):
        tk.save_model(model, path, init={"size": 9})  # not a parameter
    assert not path.exists()
    tk.save_model(model, path, init={"hidden": 9})
    rebuilt = tk.load_model(path)
    same_parameters(rebuilt, model)
    same_outputs(rebuilt, model)


def test_save_model_checks_on_the_cpu_when_meta_cannot_build(tmp_path: Path) -> None:
    model = fresh(NeedsData, width=5)
    path = tmp_path / "data.safetensors"
    before = torch.get_rng_state()
    tk.save_model(model, path)
    assert torch.equal(torch.get_rng_state(), before)  # the check drew no random numbers
    rebuilt = tk.load_model(path)
    same_parameters(rebuilt, model)


def test_save_model_refuses_a_model_changed_after_it_was_built(tmp_path: Path) -> None:
    model = fresh(Wide)
    model.head = nn.Linear(4, 9)  # a new head
    with pytest.raises(tk.InvalidStateError, match=r"torchkeep\.save\(model, path\)"):
        tk.save_model(model, tmp_path / "changed.safetensors")
    model = fresh(Wide)
    model.nonlin = nn.Tanh()  # same shapes, another layer
    with pytest.raises(tk.InvalidStateError, match="layer nonlin is a ReLU, not a Tanh"):
        tk.save_model(model, tmp_path / "changed.safetensors")


def test_save_model_falls_back_to_defaults_when_attributes_mislead(tmp_path: Path) -> None:
    model = fresh(Scaled)  # dim=4, but self.dim holds 8
    path = tmp_path / "scaled.safetensors"
    with pytest.warns(tk.TorchkeepWarning, match="default arguments"):
        tk.save_model(model, path)
    rebuilt = tk.load_model(path)
    same_parameters(rebuilt, model)


# --------------------------------------------- 6. state dicts as entries of the native format


def test_native_checkpoint_holds_a_state_dict_entry_as_tensors(tmp_path: Path) -> None:
    model = trained()
    folder = tmp_path / "ckpt"
    tk.save_checkpoint(folder, model=model.state_dict(), epoch=3, rng=False)
    manifest = read_manifest(folder)
    assert manifest["objects"] is None  # no pickle
    assert set(manifest["tensors"]) == {f"model.{k}" for k in model.state_dict()}

    reference = fresh()
    reference.load_state_dict(model.state_dict())
    extra = tk.load_checkpoint(folder, rng=False)
    assert list(extra["model"]) == list(model.state_dict())
    assert all(torch.equal(extra["model"][k], v) for k, v in model.state_dict().items())

    target = fresh(seed=7)
    assert tk.load_checkpoint(folder, model=target, rng=False) == {"epoch": 3}
    same_parameters(target, reference)
    same_outputs(target, reference)
    # As a weights source too.
    state = tk.load_state_dict(folder)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    into = fresh(seed=8)
    assert tk.load(into, folder).entry == "model"
    same_outputs(into, reference)
    assert tk.inspect(folder).entry == "model"


def test_module_entries_and_state_dict_entries_restore_alike(tmp_path: Path) -> None:
    model = trained()
    for name, value in (("module", model), ("state", model.state_dict())):
        for where in (tmp_path / f"{name}-native", tmp_path / f"{name}.pt"):
            tk.save_checkpoint(where, model=value)
            target = fresh(seed=7)
            tk.load_checkpoint(where, model=target, rng=False)
            same_parameters(target, model)
            same_outputs(target, model)
    manager = tk.CheckpointManager(tmp_path / "run")
    manager.save(1, model=model.state_dict(), epoch=1)
    target = fresh(seed=7)
    assert manager.restore(model=target, rng=False) == {"epoch": 1}
    same_outputs(target, model)


# ------------------------------------------------------------- 7. Namespaces in .pt files


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_namespace_comes_back_from_pt_as_from_native(tmp_path: Path, suffix: str) -> None:
    args = argparse.Namespace(lr=0.1, layers=[8, 4], nested=argparse.Namespace(seed=3))
    extra = {"runs": [argparse.Namespace(id=1), (argparse.Namespace(id=2), 5)], "k": {1: "x"}}
    model = trained()
    results = {}
    for where in (tmp_path / "native", tmp_path / f"ckpt{suffix}"):
        tk.save_checkpoint(where, model=model, args=args, extra=extra, epoch=2)
        target = fresh(seed=7)
        results[where.suffix] = tk.load_checkpoint(where, model=target, rng=False)
        same_outputs(target, model)
    native, pt = results[""], results[suffix]
    assert pt == native
    assert pt["args"] == args and isinstance(pt["args"].nested, argparse.Namespace)
    assert isinstance(pt["extra"]["runs"][1][0], argparse.Namespace)
    # Still a file torch.load(weights_only=True) reads: the fields as a dict.
    plain = torch.load(tmp_path / f"ckpt{suffix}", weights_only=True)
    assert plain["args"] == {"lr": 0.1, "layers": [8, 4], "nested": {"seed": 3}}
    # A target shapes it either way.
    again = tk.load_checkpoint(tmp_path / f"ckpt{suffix}", args=argparse.Namespace(), rng=False)
    assert again["args"] == args
