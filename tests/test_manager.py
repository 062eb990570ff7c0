"""CheckpointManager: naming, listing, retention, restart, async saves, torn folders."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

import torchkeep.training.manager as manager_module
from torchkeep.errors import CheckpointNotFoundError
from torchkeep.training.checkpoint import CheckpointWriteError, load_checkpoint
from torchkeep.training.manager import CheckpointManager
from torchkeep.training.retention import AnyOf, Checkpoint, KeepBest, KeepEvery, KeepLast

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def records(*items: tuple[int, float | None]) -> list[Checkpoint]:
    return [
        Checkpoint(step, Path(f"step-{step}"), {} if loss is None else {"loss": loss})
        for step, loss in items
    ]


# ---------------------------------------------------------------------------- policies


def test_policies_pick_the_right_steps() -> None:
    cps = records((10, 0.5), (20, 0.2), (30, None), (40, 0.9), (50, float("nan")), (60, 0.2))
    assert KeepLast(2).keep(cps) == {50, 60}
    assert KeepBest("loss", "min").keep(cps) == {60}  # ties: the newer one
    assert KeepBest("loss", "min", n=2).keep(cps) == {20, 60}
    assert KeepBest("loss", "max").keep(cps) == {40}
    assert KeepEvery(20).keep(cps) == {20, 40, 60}
    assert AnyOf(KeepLast(1), KeepBest("loss", "max")).keep(cps) == {40, 60}
    assert KeepBest("accuracy").keep(cps) == set()


@pytest.mark.parametrize(
    "make",
    [
        lambda: KeepLast(0),
        lambda: KeepBest("loss", n=0),
        lambda: KeepEvery(-5),
        lambda: KeepBest("loss", "lowest"),
        lambda: AnyOf(),
        lambda: KeepLast(True),
    ],
)
def test_policies_refuse_nonsense(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_manager_refuses_ambiguous_configuration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="monitor"):
        CheckpointManager(tmp_path, keep_best=1)
    with pytest.raises(ValueError, match="not both"):
        CheckpointManager(tmp_path, keep_last=1, policy=KeepLast(2))
    with pytest.raises(ValueError, match="mode"):
        CheckpointManager(tmp_path, mode="lowest")  # type: ignore[arg-type]


# ------------------------------------------------------------------- saving, listing


def test_naming_listing_and_restore(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "run")
    assert mgr.steps() == [] and mgr.latest() is None
    assert mgr.restore(model=nn.Linear(2, 2)) is None  # nothing to resume
    model = nn.Linear(2, 2)
    for step in (0, 5, 120):
        with torch.no_grad():
            model.weight.fill_(step)
        mgr.save(step, model=model, step=step)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "step-00000000",
        "step-00000005",
        "step-00000120",
    ]
    assert mgr.steps() == [0, 5, 120] and mgr.latest() == 120

    target = nn.Linear(2, 2)
    assert mgr.restore(model=target) == {"step": 120}
    assert torch.all(target.weight == 120)
    assert mgr.restore(5, model=target) == {"step": 5}
    assert torch.all(target.weight == 5)
    with pytest.raises(CheckpointNotFoundError, match="step 7"):
        mgr.restore(7)
    with pytest.raises(ValueError, match="non-negative"):
        mgr.save(-1, x=1)
    mgr.close()


def test_keep_last_and_best_with_newest_always_kept(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="val_loss")
    losses = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.6, 5: 0.7}
    for step, loss in losses.items():
        mgr.save(step, epoch=step, metrics={"val_loss": torch.tensor(loss)})
    assert mgr.steps() == [2, 4, 5]
    assert mgr.best() == 2
    assert mgr.restore("best") == {"epoch": 2}

    only_best = CheckpointManager(tmp_path / "b", policy=KeepBest("acc", "max"), monitor="acc")
    only_best.save(1, x=1, metrics={"acc": 0.9})
    only_best.save(2, x=2, metrics={"acc": 0.1})  # worse, but the newest: kept
    assert only_best.steps() == [1, 2]
    only_best.save(3, x=3, metrics={"acc": 0.2})
    assert only_best.steps() == [1, 3]


def test_keep_every_and_keep_all(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "every", keep_last=1, keep_every=100)
    for step in range(0, 501, 50):
        mgr.save(step, step=step)
    assert mgr.steps() == [0, 100, 200, 300, 400, 500]
    keep_all = CheckpointManager(tmp_path / "all")
    for step in range(4):
        keep_all.save(step, step=step)
    assert keep_all.steps() == [0, 1, 2, 3]


def test_a_new_manager_governs_older_checkpoints(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path)
    for step, loss in [(10, 0.2), (20, 0.8), (30, 0.5), (40, 0.9)]:
        first.save(step, epoch=step, metrics={"loss": loss})
    first.close()

    again = CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="loss")
    assert again.best() == 10  # metrics read back from checkpoint.json
    assert again.steps() == [10, 20, 30, 40]  # nothing deleted before a save
    again.save(50, epoch=50, metrics={"loss": 1.0})
    assert again.steps() == [10, 50]
    assert [c.metrics for c in again.checkpoints()] == [{"loss": 0.2}, {"loss": 1.0}]


def test_best_needs_a_monitor_and_a_metric(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, monitor="loss")
    assert mgr.restore("best") is None
    mgr.save(1, x=1)
    with pytest.raises(CheckpointNotFoundError, match="'loss'"):
        mgr.restore("best")
    with pytest.raises(ValueError, match="monitor"):
        CheckpointManager(tmp_path).best()


# ------------------------------------------------------------------------------ async


class Gate:
    """Holds every checkpoint write until opened, recording the writing thread."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()  # a write has started
        self.threads: list[str] = []
        self.real = manager_module.write_native

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.open.wait(10), "gate never opened"
        return self.real(*args, **kwargs)


def test_async_save_snapshots_before_returning(tmp_path: Path) -> None:
    model = nn.Linear(3, 3)
    history = [1, 2]
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    gate = Gate()
    mgr = CheckpointManager(tmp_path)
    with mock.patch.object(manager_module, "write_native", gate):
        mgr.save(1, blocking=False, model=model, history=history, t=model.weight)
        assert mgr.steps() == []  # still being written
        with torch.no_grad():
            model.weight.add_(100.0)  # training goes on at once
            model.bias.zero_()
        history.append(3)
        gate.open.set()
        mgr.wait()
    assert gate.threads == ["torchkeep-save_0"]
    target = nn.Linear(3, 3)
    out = mgr.restore(model=target)
    assert out is not None and out["history"] == [1, 2]
    assert torch.equal(out["t"], expected["weight"])
    for name, value in expected.items():
        assert torch.equal(target.state_dict()[name], value), name


def test_sync_save_is_async_plus_wait(tmp_path: Path) -> None:
    gate = Gate()
    gate.open.set()
    mgr = CheckpointManager(tmp_path)
    with mock.patch.object(manager_module, "write_native", gate):
        mgr.save(1, x=1)
    assert gate.threads == ["torchkeep-save_0"] and mgr.steps() == [1]


def test_at_most_one_save_in_flight(tmp_path: Path) -> None:
    gate = Gate()
    mgr = CheckpointManager(tmp_path)
    progressed = threading.Event()  # the second save either waits or returns
    waiting = threading.Event()
    returned = threading.Event()
    real_result = Future.result

    def result(future: Future[Any], timeout: float | None = None) -> Any:
        if threading.current_thread().name == "second-save":
            waiting.set()  # about to block on the save in flight
            progressed.set()
        return real_result(future, timeout)

    def second_save() -> None:
        mgr.save(2, x=2, blocking=False)
        returned.set()
        progressed.set()

    with (
        mock.patch.object(manager_module, "write_native", gate),
        mock.patch.object(Future, "result", result),
    ):
        mgr.save(1, blocking=False, x=1)
        assert gate.entered.wait(10), "the first write never started"
        second = threading.Thread(target=second_save, name="second-save")
        second.start()
        assert progressed.wait(10)
        assert waiting.is_set() and not returned.is_set(), "the second save did not wait"
        assert gate.threads == ["torchkeep-save_0"]  # the second write has not started
        gate.open.set()
        second.join(10)
        assert returned.is_set()
        mgr.wait()
    assert len(gate.threads) == 2
    assert mgr.steps() == [1, 2]


def test_async_errors_surface_on_wait_and_on_the_next_save(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, x=1)
    written = threading.Event()

    def disk_full(*args: Any, **kwargs: Any) -> Path:
        written.set()
        raise CheckpointWriteError(28, "disk full")

    failing = mock.patch.object(manager_module, "write_native", side_effect=disk_full)
    with failing:
        mgr.save(2, blocking=False, x=2)
        with pytest.raises(CheckpointWriteError, match="disk full"):
            mgr.wait()
    mgr.wait()  # reported once
    written.clear()
    with failing:
        mgr.save(3, blocking=False, x=3)
        assert written.wait(10)  # the write failed while the disk was full
    with pytest.raises(CheckpointWriteError):
        mgr.save(4, x=4)  # the previous failure comes first
    assert mgr.steps() == [1]
    mgr.save(4, x=4)
    assert mgr.steps() == [1, 4]


def test_close_waits_for_the_write_in_flight(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(7, blocking=False, weights=torch.randn(1000))
    assert mgr.steps() == [7]
    with pytest.raises(RuntimeError, match="closed"):
        mgr.save(8, x=1)


# -------------------------------------------------------------------------- torn folders


def test_torn_folders_are_skipped_then_cleaned(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=5)
    mgr.save(100, x=100)
    torn = tmp_path / "step-00000300"
    torn.mkdir()
    (torn / "tensors-00000.safetensors").write_bytes(b"\x00" * 10)
    temp = tmp_path / ".step-00000400.tmp-torchkeep-0123456789ab"
    temp.mkdir()
    (temp / "checkpoint.json").write_text("{}")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("mine")

    assert mgr.steps() == [100] and mgr.latest() == 100
    assert CheckpointManager(tmp_path).restore() == {"x": 100}
    mgr.save(200, x=200)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt",
        "step-00000100",
        "step-00000200",
    ]
    torn.mkdir()
    mgr.save(300, x=300)  # a torn folder of the very step being saved is replaced
    assert mgr.steps() == [100, 200, 300] and mgr.restore() == {"x": 300}


def test_saving_an_existing_step_replaces_it(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, x="old")
    mgr.save(3, x="new")
    assert mgr.steps() == [3]
    assert load_checkpoint(mgr.path(3))["x"] == "new"


@needs_cuda
def test_async_save_of_cuda_tensors_is_staged(tmp_path: Path) -> None:
    model = nn.Linear(64, 64).cuda()
    expected = model.weight.detach().cpu().clone()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, blocking=False, model=model)
    with torch.no_grad():
        model.weight.mul_(0)
    mgr.wait()
    target = nn.Linear(64, 64)
    mgr.restore(model=target)
    assert torch.equal(target.weight, expected)
