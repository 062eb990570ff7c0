"""The Lightning plugin: real Trainer and Fabric runs on the CPU, compared with plain Lightning.

One module-scoped set of runs (tests/helpers/lightning_worker.py: a tiny model, four epochs,
``ModelCheckpoint(monitor="val_loss", save_top_k=2, save_last=True)``) is shared: with the
synchronous plugin, the asynchronous one, and Lightning's own ``TorchCheckpointIO``. Resume
and crash tests train in separate processes and compare every loss and the final parameters
with the uninterrupted run, exactly.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

L = pytest.importorskip("lightning")

import torchkeep as tk  # noqa: E402
from torchkeep.integrations.lightning import CheckpointIO, load_from_checkpoint  # noqa: E402

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import lightning_worker as worker  # noqa: E402

EPOCHS = 4
STEPS = EPOCHS * worker.BATCHES_PER_EPOCH
SRC = str(Path(__file__).parents[1] / "src")


@dataclass
class Runs:
    sync: worker.Run
    asynchronous: worker.Run
    plain: worker.Run
    plain_half: worker.Run  # plain Lightning, stopped after two epochs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("lightning")
    return Runs(
        sync=worker.train(root / "sync", EPOCHS, CheckpointIO()),
        asynchronous=worker.train(root / "async", EPOCHS, CheckpointIO(async_save=True)),
        plain=worker.train(root / "plain", EPOCHS),
        plain_half=worker.train(root / "plain-half", EPOCHS // 2),
    )


def same(a: Any, b: Any, where: str = "") -> None:
    """``a`` equals ``b`` exactly: tensors bit for bit (dtype and shape too), containers deep."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for key in a:
            same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), (where, a, b)


def same_run(run: worker.Run, expected: worker.Run, *, first_step: int = 1) -> None:
    assert run.losses == {s: v for s, v in expected.losses.items() if s >= first_step}
    same(run.params, expected.params)


def worker_process(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(HELPERS / "lightning_worker.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


def worker_run(output: Path, folder: Path) -> worker.Run:
    saved = torch.load(output, weights_only=True)
    return worker.Run(saved["losses"], saved["params"], folder)


# ---------------------------------------------------------------- what the plugin writes


def test_checkpoints_are_native_folders_that_torchkeep_reads(runs: Runs) -> None:
    names = sorted(os.listdir(runs.sync.folder))
    assert names and all(name.endswith(".ckpt") for name in names)
    for name in names:
        folder = runs.sync.folder / name
        assert folder.is_dir() and (folder / "checkpoint.json").is_file()
        files = {p.name for p in folder.iterdir()}
        assert all(f.endswith(".safetensors") for f in files - {"checkpoint.json"}), files
    last = runs.sync.folder / "last.ckpt"

    model = worker.Model()
    report = tk.load(model, last)
    assert not report.missing and not report.unexpected
    same(model.state_dict(), runs.sync.params)
    values = tk.load_checkpoint(last, verify=True)
    assert values["global_step"] == STEPS and values["epoch"] == EPOCHS - 1
    same(dict(values["state_dict"]), runs.sync.params)


def test_the_plugin_reads_back_what_lightning_saved(runs: Runs) -> None:
    """Every entry equals what plain Lightning wrote for the same run, but the paths in it."""
    ours = CheckpointIO().load_checkpoint(runs.sync.folder / "last.ckpt")
    theirs = torch.load(runs.plain.folder / "last.ckpt", weights_only=True)
    assert list(ours) == list(theirs)
    for key in ours:
        if key != "callbacks":
            same(ours[key], theirs[key], key)
    assert ours["state_dict"]._metadata == theirs["state_dict"]._metadata
    (ours_cb,) = ours["callbacks"].values()
    (theirs_cb,) = theirs["callbacks"].values()
    for key in ("best_model_score", "current_score", "kth_value", "monitor"):
        same(ours_cb[key], theirs_cb[key], key)
    assert [Path(p).name for p in ours_cb["best_k_models"]] == [
        Path(p).name for p in theirs_cb["best_k_models"]
    ]


def test_training_with_the_plugin_equals_plain_lightning(runs: Runs) -> None:
    same_run(runs.sync, runs.plain)


def test_retention_leaves_what_plain_lightning_leaves(runs: Runs) -> None:
    """save_top_k=2 over four epochs: older checkpoints were removed, the same ones."""
    plain = sorted(os.listdir(runs.plain.folder))
    assert len(plain) == worker.TOP_K + 1 and "last.ckpt" in plain
    assert sorted(os.listdir(runs.sync.folder)) == plain
    assert sorted(os.listdir(runs.asynchronous.folder)) == plain


def test_async_saves_equal_sync_saves(runs: Runs) -> None:
    same_run(runs.asynchronous, runs.sync)
    reader = CheckpointIO()
    for name in os.listdir(runs.sync.folder):
        ours = reader.load_checkpoint(runs.asynchronous.folder / name)
        sync = reader.load_checkpoint(runs.sync.folder / name)
        for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step"):
            same(ours[key], sync[key], f"{name}:{key}")


# ------------------------------------------------------------------------------ resume


def test_resume_from_a_plain_lightning_file(runs: Runs, tmp_path: Path) -> None:
    """A .ckpt written by plain Lightning, read by the checking unpickler, resumes exactly."""
    source = runs.plain_half.folder / "last.ckpt"
    assert source.is_file()
    resumed = worker.train(tmp_path, EPOCHS, CheckpointIO(), resume=str(source))
    same_run(resumed, runs.plain, first_step=2 * worker.BATCHES_PER_EPOCH + 1)


@pytest.mark.slow
def test_resume_last_in_a_new_process(runs: Runs, tmp_path: Path) -> None:
    half = worker.train(tmp_path, EPOCHS // 2, CheckpointIO())
    assert half.losses == {s: v for s, v in runs.sync.losses.items() if s <= len(half.losses)}
    output = tmp_path / "out.pt"
    worker_process(str(output), str(tmp_path), str(EPOCHS), "--resume", "last")
    same_run(worker_run(output, half.folder), runs.sync, first_step=len(half.losses) + 1)
    assert sorted(os.listdir(half.folder)) == sorted(os.listdir(runs.sync.folder))


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(runs: Runs, tmp_path: Path) -> None:
    """Killed while the third last.ckpt is written: the second stays, and training resumes."""
    output = tmp_path / "out.pt"
    crashed = worker_process(str(output), str(tmp_path), str(EPOCHS), "--kill-at", "3", check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    folder = tmp_path / "checkpoints"
    last = folder / "last.ckpt"
    values = tk.load_checkpoint(last, verify=True)
    assert values["global_step"] == 2 * worker.BATCHES_PER_EPOCH  # the previous one
    # What the kill interrupted is hidden and uncommitted.
    torn = [p for p in folder.iterdir() if p.name.startswith(".")]
    assert torn and all(not (p / "checkpoint.json").exists() for p in torn)

    # This process is a new one for the run: the trainer resumes from the surviving last.ckpt.
    resumed = worker.train(tmp_path, EPOCHS, CheckpointIO(), resume="last")
    same_run(resumed, runs.sync, first_step=2 * worker.BATCHES_PER_EPOCH + 1)
    # The next save of last.ckpt removed the leftovers; every name is a committed checkpoint
    # (the top-k one the crashed run committed at step 12 is kept, and the resumed run saved
    # its step 12 beside it as "-v1", as Lightning does for a name that exists).
    names = sorted(os.listdir(folder))
    assert "last.ckpt" in names and not [n for n in names if n.startswith(".")]
    assert all((folder / n / "checkpoint.json").is_file() for n in names)
    assert tk.load_checkpoint(last)["global_step"] == STEPS


# --------------------------------------------------------------------- loading a model


def test_load_from_checkpoint(runs: Runs) -> None:
    for path in (runs.sync.folder / "last.ckpt", runs.plain.folder / "last.ckpt"):
        model = load_from_checkpoint(worker.Model, path)
        assert isinstance(model, worker.Model)
        same(model.state_dict(), runs.sync.params)
        assert dict(model.hparams) == {"width": 8, "lr": 0.05}
    changed = tk.lightning.load_from_checkpoint(worker.Model, path, lr=0.5)
    assert changed.hparams.lr == 0.5


def test_lightning_own_load_from_checkpoint_cannot_open_a_folder(runs: Runs) -> None:
    """Why load_from_checkpoint exists: Lightning's method hands the path to torch.load."""
    with pytest.raises(IsADirectoryError):
        worker.Model.load_from_checkpoint(runs.sync.folder / "last.ckpt")


# ------------------------------------------------------------------------------ Fabric


@pytest.mark.parametrize("async_save", [False, True])
def test_fabric_save_and_load(tmp_path: Path, async_save: bool) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[CheckpointIO(async_save=async_save)])
    torch.manual_seed(0)
    model, optimizer = fabric.setup(*_model_and_optimizer())
    loss = model(torch.randn(4, 8)).square().mean()
    fabric.backward(loss)
    optimizer.step()
    path = tmp_path / "fabric.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 7, "note": "x"})

    torch.manual_seed(1)
    model2, optimizer2 = fabric.setup(*_model_and_optimizer())
    state = {"model": model2, "optimizer": optimizer2, "step": 0}
    rest = fabric.load(path, state)
    assert (path / "checkpoint.json").is_file()
    assert state["step"] == 7 and rest == {"note": "x"}
    same(model2.state_dict(), model.state_dict())
    same(optimizer2.state_dict(), optimizer.state_dict())


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(8, 2)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


# --------------------------------------------------------------------- values and errors


def _checkpoint(**extra: Any) -> dict[str, Any]:
    return {"state_dict": {"w": torch.arange(4.0)}, "epoch": 1, **extra}


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value


def test_hyper_parameters_keep_their_types(tmp_path: Path) -> None:
    import argparse

    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create({"lr": 0.1, "layers": [1, 2], "name": "${lr}"})
    plugin = CheckpointIO()
    plugin.save_checkpoint(
        _checkpoint(
            hyper_parameters=config,
            hparams_type=omegaconf.DictConfig,
            datamodule_hyper_parameters={"args": argparse.Namespace(batch=4)},
        ),
        tmp_path / "a.ckpt",
    )
    out = plugin.load_checkpoint(tmp_path / "a.ckpt")
    assert isinstance(out["hyper_parameters"], omegaconf.DictConfig)
    assert out["hyper_parameters"] == config and out["hyper_parameters"].name == 0.1
    assert out["hparams_type"] is omegaconf.DictConfig
    assert out["datamodule_hyper_parameters"] == {"args": argparse.Namespace(batch=4)}


def test_objects_need_allow_pickle_to_save_and_trust_to_load(tmp_path: Path) -> None:
    state = _checkpoint(hyper_parameters={"thing": Opaque(3)})
    with pytest.raises(tk.UnsupportedValueError, match=r"save_hyperparameters\(ignore=\['thing'\]"):
        CheckpointIO().save_checkpoint(state, tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()

    CheckpointIO(allow_pickle=True).save_checkpoint(state, tmp_path / "a.ckpt")
    with pytest.raises(tk.UnsafeFileError):
        CheckpointIO().load_checkpoint(tmp_path / "a.ckpt")
    out = CheckpointIO(trust=True).load_checkpoint(tmp_path / "a.ckpt")
    assert isinstance(out["hyper_parameters"]["thing"], Opaque)
    assert out["hyper_parameters"]["thing"].value == 3


def test_remove_checkpoint(tmp_path: Path) -> None:
    plugin = CheckpointIO()
    plugin.save_checkpoint(_checkpoint(), tmp_path / "a.ckpt")
    os.symlink("a.ckpt", tmp_path / "link.ckpt")
    (tmp_path / "plain.ckpt").write_bytes(b"x")
    plugin.remove_checkpoint(tmp_path / "link.ckpt")  # the link goes, not what it points to
    assert (tmp_path / "a.ckpt" / "checkpoint.json").is_file()
    plugin.remove_checkpoint(tmp_path / "a.ckpt")
    plugin.remove_checkpoint(tmp_path / "plain.ckpt")
    plugin.remove_checkpoint(tmp_path / "missing.ckpt")
    assert os.listdir(tmp_path) == []


def test_a_failed_async_save_commits_nothing_and_raises_at_teardown(tmp_path: Path) -> None:
    plugin = CheckpointIO(async_save=True)
    plugin.save_checkpoint(_checkpoint(epoch=1), tmp_path / "a.ckpt")
    plugin.wait()
    real_open = os.open

    def full(path: Any, *args: Any, **kwargs: Any) -> int:
        if Path(os.fsdecode(path)).name == "checkpoint.json":
            raise OSError(errno.ENOSPC, "No space left on device", os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    with mock.patch("os.open", full):
        plugin.save_checkpoint(_checkpoint(epoch=2), tmp_path / "a.ckpt")
        with pytest.raises(tk.CheckpointWriteError):
            plugin.teardown()
    assert plugin.load_checkpoint(tmp_path / "a.ckpt")["epoch"] == 1
    assert os.listdir(tmp_path) == ["a.ckpt"]


def test_refusals(tmp_path: Path) -> None:
    plugin = CheckpointIO()
    with pytest.raises(tk.InvalidArgumentError, match="storage_options"):
        plugin.save_checkpoint(_checkpoint(), tmp_path / "a.ckpt", storage_options={"x": 1})
    with pytest.raises(tk.InvalidArgumentError, match="local paths"):
        plugin.save_checkpoint(_checkpoint(), "s3://bucket/a.ckpt")
    with pytest.raises(tk.InvalidArgumentError):
        CheckpointIO(max_shard_size="lots")
    with pytest.raises(FileNotFoundError):
        plugin.load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "torn.ckpt").mkdir()
    (tmp_path / "torn.ckpt" / "tensors-00000.safetensors").write_bytes(b"partial")
    with pytest.raises(tk.CorruptFileError, match="not a committed checkpoint"):
        plugin.load_checkpoint(tmp_path / "torn.ckpt")


@pytest.mark.slow
def test_import_is_lazy_and_a_missing_lightning_says_how_to_install() -> None:
    code = textwrap.dedent(
        """
        import sys
        import torchkeep as tk
        assert "lightning" not in sys.modules, "importing torchkeep imported lightning"
        sys.modules["lightning"] = None  # as if it were not installed
        try:
            tk.lightning
        except tk.MissingDependencyError as exc:
            assert "pip install torchkeep[lightning]" in str(exc), exc
        else:
            raise AssertionError("no MissingDependencyError")
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


def test_the_package_reaches_the_plugin() -> None:
    assert tk.lightning.CheckpointIO is CheckpointIO
    assert isinstance(CheckpointIO(), L.fabric.plugins.CheckpointIO)
