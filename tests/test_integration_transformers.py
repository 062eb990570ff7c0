"""tk.transformers.Trainer: transformers' Trainer with checkpoints written and read by torchkeep.

Real transformers throughout, a tiny GPT-2 on the CPU (tests/helpers/transformers_worker.py).
Runs are shared between tests through module-scoped fixtures; resuming in a new process and
the crash tests run the worker as a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from transformers.trainer_utils import get_last_checkpoint  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import torchkeep as tk  # noqa: E402
from torchkeep._common import TEMP_MARKER  # noqa: E402
from torchkeep.integrations.transformers import STATE_DIR, is_torchkeep_checkpoint  # noqa: E402

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import transformers_worker as worker  # noqa: E402

STEPS = list(range(worker.SAVE_STEPS, worker.MAX_STEPS + 1, worker.SAVE_STEPS))
ALL_CHECKPOINTS = [f"checkpoint-{step}" for step in STEPS]


@pytest.fixture(autouse=True, scope="module")
def _quiet() -> Iterator[None]:
    verbosity, threads = hf_logging.get_verbosity(), torch.get_num_threads()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(worker.THREADS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    hf_logging.set_verbosity(verbosity)
    torch.set_num_threads(threads)


class Run:
    def __init__(self, folder: Path, **options: Any) -> None:
        self.folder = folder
        self.losses, self.model, self.trainer = worker.run(folder, **options)
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def checkpoints(self) -> list[str]:
        return sorted(
            (p.name for p in self.folder.iterdir() if p.name.startswith("checkpoint-")),
            key=lambda name: int(name.split("-")[1]),
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The uninterrupted run with torchkeep's checkpoints, every one kept."""
    return Run(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """transformers.Trainer itself, keeping two checkpoints."""
    return Run(tmp_path_factory.mktemp("plain"), plain=True, save_total_limit=2)


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """torchkeep's Trainer writing in the background, keeping two checkpoints."""
    return Run(tmp_path_factory.mktemp("background"), blocking=False, save_total_limit=2)


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of nested states."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def not_data(folder: Path) -> list[str]:
    """Files that are not plain data: anything but JSON that parses and safetensors files
    that the safetensors package opens (a pickle is neither)."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
                continue
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as opened:
                    opened.keys()
                continue
        except ValueError:
            pass
        found.append(str(path.relative_to(folder)))
    return found


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    model = worker.build_model()
    tk.load(model, folder)
    return model.state_dict()


# ------------------------------------------------------------------------------- import


@pytest.mark.slow
def test_torchkeep_imports_without_transformers_and_names_the_extra() -> None:
    code = (
        "import sys\n"
        "import torchkeep as tk\n"
        "assert 'transformers' not in sys.modules, 'import torchkeep imported transformers'\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "try:\n"
        "    tk.transformers\n"
        "except tk.MissingDependencyError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "pip install 'torchkeep[transformers]'" in done.stdout


def test_a_bad_shard_size_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(tk.InvalidArgumentError, match="size"):
        tk.transformers.Trainer(
            model=worker.build_model(), args=worker.arguments(tmp_path), max_shard_size="lots"
        )


# -------------------------------------------------------------------- what is written


def test_checkpoints_hold_no_pickle(reference: Run, plain: Run) -> None:
    assert reference.checkpoints() == ALL_CHECKPOINTS
    for name in ALL_CHECKPOINTS:
        folder = reference.folder / name
        assert not_data(folder) == []
        assert is_torchkeep_checkpoint(folder)
        for expected in ("config.json", "model.safetensors.index.json", "trainer_state.json"):
            assert (folder / expected).is_file()
        assert (folder / STATE_DIR / "checkpoint.json").is_file()
    # The check sees the pickles transformers.Trainer writes.
    found = not_data(plain.folder / plain.checkpoints()[-1])
    assert {"optimizer.pt", "rng_state.pth", "training_args.bin"} <= set(found)


def test_from_pretrained_and_tk_load_read_the_weights(reference: Run) -> None:
    folder = reference.folder / ALL_CHECKPOINTS[-1]
    loaded = type(reference.model).from_pretrained(folder)
    assert same(loaded.state_dict(), reference.state)
    assert same(weights_of(folder), reference.state)


def test_the_training_state_is_a_native_checkpoint(reference: Run) -> None:
    folder = reference.folder / ALL_CHECKPOINTS[-1] / STATE_DIR
    values = tk.load_checkpoint(folder, rng=False)
    trainer = reference.trainer
    assert same(values["optimizer"], trainer.optimizer.state_dict())
    assert same(values["lr_scheduler"], trainer.lr_scheduler.state_dict())
    assert tk.verify(folder).ok


# ------------------------------------------------------------------------------- resume


KILL_POINTS = ("weights", "state", "commit")


class Worker:
    """One new process (tests/helpers/transformers_worker.py): killed mid-save in a forked
    child once per kill point, then resuming the reference run from its checkpoint-4."""

    def __init__(self, reference: Run, folder: Path) -> None:
        self.resumed = folder / "resumed"
        shutil.copytree(reference.folder / "checkpoint-4", self.resumed / "checkpoint-4")
        self.killed = {point: folder / point for point in KILL_POINTS}
        result = folder / "result"
        subprocess.run(
            [
                sys.executable,
                str(HELPERS / "transformers_worker.py"),
                str(result),
                str(self.resumed / "checkpoint-4"),
                *(f"--kill={point}={path}" for point, path in self.killed.items()),
            ],
            check=True,
            timeout=300,
        )
        report = json.loads(result.with_suffix(".json").read_text())
        self.losses = {int(step): loss for step, loss in report["losses"].items()}
        self.signals: dict[str, int] = report["killed"]
        self.weights = weights_of(result.with_suffix(".safetensors"))


@pytest.fixture(scope="module")
def process(reference: Run, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    return Worker(reference, tmp_path_factory.mktemp("worker"))


@pytest.mark.slow
def test_resume_in_a_new_process_matches_the_uninterrupted_run(
    reference: Run, process: Worker
) -> None:
    assert process.losses == {step: loss for step, loss in reference.losses.items() if step > 4}
    assert same(process.weights, reference.state)
    # The checkpoints written after resuming are the uninterrupted run's, bit for bit.
    for name in ALL_CHECKPOINTS[2:]:
        assert same(weights_of(process.resumed / name), weights_of(reference.folder / name))
        assert same(
            tk.load_checkpoint(process.resumed / name / STATE_DIR, rng=False),
            tk.load_checkpoint(reference.folder / name / STATE_DIR, rng=False),
        )


def test_background_saves_write_the_same_checkpoints(reference: Run, background: Run) -> None:
    assert background.losses == reference.losses
    assert same(background.state, reference.state)
    for name in background.checkpoints():
        ours, theirs = background.folder / name, reference.folder / name
        assert same(weights_of(ours), weights_of(theirs))
        assert same(
            tk.load_checkpoint(ours / STATE_DIR, rng=False),
            tk.load_checkpoint(theirs / STATE_DIR, rng=False),
        )


def test_resumes_a_checkpoint_of_transformers_trainer(
    reference: Run, plain: Run, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(plain.folder / "checkpoint-6", run_dir / "checkpoint-6")
    losses, model, _ = worker.run(run_dir, resume=True)
    assert losses == {step: loss for step, loss in reference.losses.items() if step > 6}
    assert same(model.state_dict(), reference.state)


# ---------------------------------------------------------------------------- retention


def test_save_total_limit_keeps_what_transformers_keeps(plain: Run, background: Run) -> None:
    assert plain.losses == background.losses
    assert plain.checkpoints() == ALL_CHECKPOINTS[-2:]
    assert background.checkpoints() == plain.checkpoints()
    assert [p.name for p in background.folder.iterdir() if TEMP_MARKER in p.name] == []


# ------------------------------------------------------------------------------- faults


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_during_a_save_leaves_the_previous_checkpoint(
    point: str, reference: Run, process: Worker
) -> None:
    run_dir = process.killed[point]
    assert process.signals[point] == signal.SIGKILL
    # The killed save left only hidden temporary folders; checkpoint-2 is the last one.
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
        "checkpoint-2"
    ]
    assert any(TEMP_MARKER in p.name for p in run_dir.iterdir())
    assert get_last_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-2")
    assert tk.verify(run_dir / "checkpoint-2").ok
    assert tk.verify(run_dir / "checkpoint-2" / STATE_DIR).ok
    assert same(weights_of(run_dir / "checkpoint-2"), weights_of(reference.folder / "checkpoint-2"))

    losses, model, _ = worker.run(run_dir, resume=True)
    assert losses == {step: loss for step, loss in reference.losses.items() if step > 2}
    assert same(model.state_dict(), reference.state)
    assert sorted(p.name for p in run_dir.iterdir()) == ALL_CHECKPOINTS  # torn ones removed


def test_a_failed_background_save_raises_and_commits_nothing(
    reference: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def full_disk(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if ".checkpoint-4" in os.fspath(path) and flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", full_disk)
    with pytest.raises(tk.CheckpointWriteError, match="No space left"):
        worker.run(tmp_path, blocking=False)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert same(
        weights_of(tmp_path / "checkpoint-2"), weights_of(reference.folder / "checkpoint-2")
    )
