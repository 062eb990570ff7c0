"""torchkeep.accelerate: Accelerator.save_state / load_state, atomic and without pickle.

Real accelerate on the CPU with a tiny model (tests/helpers/accelerate_worker.py builds it:
dropout, numpy and Python noise, a shuffled stateful dataloader, an object registered for
checkpointing). In-process tests check the files, the restore, naming and total_limit, states
accelerate wrote itself and the errors; the slow ones resume in a new process bit for bit and
SIGKILL a worker during a save.
"""

from __future__ import annotations

import copy
import importlib
import json
import random
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import torchkeep as tk
from torchkeep._common import TEMP_MARKER

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from accelerate_worker import Run  # noqa: E402

WORKER = [sys.executable, str(HELPERS / "accelerate_worker.py")]
PICKLE_STARTS = (b"\x80", b"PK\x03\x04")


def snapshot(run: Run) -> dict[str, Any]:
    """Everything a restore must bring back, copied."""
    return {
        "params": run.params(),
        "optimizer": copy.deepcopy(run.optimizer.state_dict()),
        "scheduler": copy.deepcopy(run.scheduler.state_dict()),
        "progress": run.progress.state_dict(),
        "step": run.accelerator.step,
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(legacy=True)[1].copy(),  # type: ignore[index]
        "python": random.getstate(),
    }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path, dict[str, Any]]:
    """A run saved through the integration after 3 steps, then trained on."""
    project = tmp_path_factory.mktemp("saved")
    run = Run(str(project), total_limit=2)
    run.train(3, frozenset({3}))
    expected = snapshot(run)
    expected["next_loss"] = run.train(5)[4]
    return run, project / "checkpoints" / "checkpoint_0", expected


# ------------------------------------------------------------------------------ files


def test_a_state_holds_safetensors_and_a_native_checkpoint_and_no_pickle(
    saved: tuple[Run, Path, dict[str, Any]],
) -> None:
    run, folder, expected = saved
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files[0] == "model.safetensors"
    assert "training_state/checkpoint.json" in files
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    for path in folder.rglob("*"):
        if path.is_file():
            assert not path.read_bytes()[:4].startswith(PICKLE_STARTS), path
    # Both readers take the weights, and torchkeep's checksums hold.
    names = [n for n, _ in run.accelerator.unwrap_model(run.model).named_parameters()]
    weights = load_file(folder / "model.safetensors")
    assert_same([weights[n] for n in names], expected["params"])
    fresh = copy.deepcopy(run.accelerator.unwrap_model(run.model))
    report = tk.load(fresh, folder / "model.safetensors", verify=True)
    assert not report.missing and not report.unexpected
    assert_same([p.detach() for p in fresh.parameters()], expected["params"])
    assert tk.verify(folder / "training_state").ok
    manifest = json.loads((folder / "training_state" / "checkpoint.json").read_text())
    # The registered progress and data position; the wrapped loader is saved by its wrapper.
    assert set(manifest["state"]) == {
        "optimizer",
        "scheduler",
        "custom_checkpoint_0",
        "custom_checkpoint_1",
        "step",
    }
    assert manifest["rng"] is not None and manifest["objects"] is None


def test_load_state_restores_everything_in_place(saved: tuple[Run, Path, dict[str, Any]]) -> None:
    run, folder, expected = saved
    assert run.progress.step == 5  # moved on since the save
    run.resume(folder)
    assert_same(snapshot(run), {k: v for k, v in expected.items() if k != "next_loss"})
    # The data position too: the next step takes the batch the saved run took.
    assert run.train(4) == {4: expected["next_loss"]}


def test_pre_hooks_run_and_their_files_are_committed_with_the_state(tmp_path: Path) -> None:
    run = Run(str(tmp_path / "hooks"), total_limit=None)
    seen: list[tuple[int, str]] = []

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        assert TEMP_MARKER in Path(output_dir).name  # the folder being written
        (Path(output_dir) / "config.json").write_text("{}")
        seen.append((len(weights), "save"))

    def load_hook(models: list[Any], input_dir: str) -> None:
        seen.append((len(models), input_dir))

    run.accelerator.register_save_state_pre_hook(save_hook)
    run.accelerator.register_load_state_pre_hook(load_hook)
    folder = run.accelerator.save_state()
    assert (folder / "config.json").is_file()
    run.accelerator.load_state(verify=True)
    assert seen == [(1, "save"), (1, str(folder))]


# --------------------------------------------------------------- naming and total_limit


def test_automatic_naming_and_total_limit_leave_accelerates_folders(tmp_path: Path) -> None:
    listings = []
    for install in (False, True):
        run = Run(str(tmp_path / f"install-{install}"), total_limit=2, install=install)
        for step in range(1, 5):
            run.train(step, frozenset({step}))
        listings.append(
            sorted(p.name for p in (tmp_path / f"install-{install}/checkpoints").iterdir())
        )
        assert run.accelerator.project_configuration.iteration == 4
    assert listings[0] == listings[1] == ["checkpoint_2", "checkpoint_3"]
    # The newest is what load_state() takes.
    run.train(6)
    run.accelerator.load_state()
    assert run.progress.step == 4


def test_a_name_taken_already_is_refused_with_what_to_do(tmp_path: Path) -> None:
    run = Run(str(tmp_path / "p"), total_limit=None)
    run.accelerator.save_state()
    run.accelerator.project_configuration.iteration = 0
    with pytest.raises(tk.InvalidArgumentError, match=r"project_configuration\.iteration"):
        run.accelerator.save_state()
    assert sorted(p.name for p in (tmp_path / "p/checkpoints").iterdir()) == ["checkpoint_0"]


def test_what_a_killed_save_left_is_removed_by_the_next_save(tmp_path: Path) -> None:
    run = Run(str(tmp_path / "p"), total_limit=None)
    torn = tmp_path / "p" / "checkpoints" / f".checkpoint_0{TEMP_MARKER}0123456789ab"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"half")
    run.accelerator.save_state()
    assert sorted(p.name for p in (tmp_path / "p/checkpoints").iterdir()) == ["checkpoint_0"]


def test_an_explicit_folder_is_replaced_only_when_it_is_a_state(tmp_path: Path) -> None:
    run = Run(str(tmp_path / "p"), total_limit=None)
    run.accelerator.project_configuration.automatic_checkpoint_naming = False
    target = tmp_path / "state"
    run.train(1)
    assert run.accelerator.save_state(target) == target
    run.train(2)
    run.accelerator.save_state(target)  # replaced whole
    run.accelerator.load_state(target)
    assert run.progress.step == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(tk.InvalidArgumentError, match="choose a new or empty folder"):
        run.accelerator.save_state(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------- states accelerate wrote itself


def test_a_state_written_by_accelerate_loads_without_running_its_pickles(tmp_path: Path) -> None:
    plain = Run(str(tmp_path / "plain"), total_limit=None, install=False)
    plain.train(3, frozenset({3}))
    expected = snapshot(plain)
    folder = tmp_path / "plain" / "checkpoints" / "checkpoint_0"
    assert (folder / "optimizer.bin").is_file() and (folder / "random_states_0.pkl").is_file()
    next_loss = plain.train(5)[4]
    tk.accelerate.install(plain.accelerator)
    plain.resume(folder)
    assert_same(snapshot(plain), expected)
    assert plain.train(4) == {4: next_loss}


class Opaque:
    """A class a pickle would have to import."""


class Holder:
    def state_dict(self) -> dict[str, Any]:
        return {"thing": Opaque()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


def test_pickled_user_classes_need_trust_and_are_never_saved(tmp_path: Path) -> None:
    plain = Run(str(tmp_path / "plain"), total_limit=None, install=False)
    holder = Holder()
    plain.accelerator.register_for_checkpointing(holder)
    folder = plain.accelerator.save_state()
    with pytest.raises(tk.UnsafeFileError, match="trust=True"):
        tk.accelerate.load_state(plain.accelerator, folder)
    tk.accelerate.load_state(plain.accelerator, folder, trust=True)
    assert isinstance(holder.loaded["thing"], Opaque)
    with pytest.raises(tk.UnsupportedValueError, match="custom_checkpoint_2") as info:
        tk.accelerate.save_state(plain.accelerator)
    assert "allow_pickle" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "plain/checkpoints").iterdir()) == ["checkpoint_0"]


# ------------------------------------------------------------------------------ errors


def test_a_state_with_other_registered_objects_is_refused_before_anything_changes(
    saved: tuple[Run, Path, dict[str, Any]], tmp_path: Path
) -> None:
    _, folder, _ = saved
    other = Run(str(tmp_path / "other"), total_limit=None)
    other.accelerator.register_for_checkpointing(Holder())
    before = snapshot(other)
    with pytest.raises(
        tk.KeyMismatchError, match="custom_checkpoint_2.*register_for_checkpointing"
    ):
        other.accelerator.load_state(folder)
    assert_same(snapshot(other)["params"], before["params"])


def test_missing_states_and_wrong_objects_are_typed_errors(tmp_path: Path) -> None:
    run = Run(str(tmp_path / "empty"), total_limit=None)
    with pytest.raises(tk.CheckpointNotFoundError, match="save one with accelerator.save_state"):
        run.accelerator.load_state()
    (tmp_path / "junk").mkdir()
    with pytest.raises(tk.CheckpointNotFoundError, match="not an accelerate state"):
        run.accelerator.load_state(tmp_path / "junk")
    with pytest.raises(tk.InvalidStateError, match="accelerate.Accelerator"):
        tk.accelerate.install(object())
    with pytest.raises(tk.InvalidArgumentError, match="safetensors"):
        run.accelerator.save_state(safe_serialization=False)


def test_without_accelerate_the_import_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "torchkeep.integrations.accelerate")
    with pytest.raises(tk.MissingDependencyError, match=r"pip install torchkeep\[accelerate\]"):
        importlib.import_module("torchkeep.integrations.accelerate")


# ---------------------------------------------------------------- in other processes


@pytest.fixture(scope="module", autouse=True)
def workers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    """The worker processes, started with the module so they run beside the quick tests.

    One runs uninterrupted (saving at step 8) and then resumes in a new process; the other
    is the crash run. Nothing starts when no slow test of this module was selected.
    """
    root = tmp_path_factory.mktemp("workers")
    wanted = any(
        item.get_closest_marker("slow") and item.module is sys.modules[__name__]
        for item in request.session.items
    )
    started: dict[str, subprocess.Popen[bytes]] = {}
    if wanted:
        for name in ("full-out", "resumed-out", "crash-out"):
            (root / name).mkdir()
        full = [*WORKER, "train", str(root / "full"), str(root / "full-out"), "--save-at", "8"]
        resume = [*WORKER, "train", str(root / "full"), str(root / "resumed-out"), "--resume"]
        crash = [*WORKER, "crash", str(root / "crash"), str(root / "crash-out")]
        started["train"] = subprocess.Popen(
            ["sh", "-c", f"{shlex.join(full)} && {shlex.join(resume)}"]
        )
        started["crash"] = subprocess.Popen(crash)
    yield Workers(root, started)
    for process in started.values():
        process.kill()
        process.wait()


class Workers:
    """Where the workers write, and their processes."""

    def __init__(self, root: Path, processes: dict[str, subprocess.Popen[bytes]]) -> None:
        self.root = root
        self.processes = processes

    def result(self, out: str, process: str, timeout: float = 120) -> dict[str, Any]:
        """``root/out/result.json`` once written; fails at once when the worker died."""
        path = self.root / out / "result.json"
        start = time.monotonic()
        while not path.is_file():
            code = self.processes[process].poll()
            assert code is None or path.is_file(), f"the {process} worker exited with {code}"
            assert time.monotonic() - start < timeout, f"no result in {path.parent}"
            time.sleep(0.1)
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded


@pytest.mark.slow
def test_a_new_process_resumes_bit_for_bit(workers: Workers) -> None:
    full = workers.result("full-out", "train")
    resumed = workers.result("resumed-out", "train")
    assert resumed["start"] == 8
    assert list(resumed["losses"]) == [str(s) for s in range(9, 16)]
    assert resumed["losses"] == {k: v for k, v in full["losses"].items() if int(k) > 8}
    assert_same(
        load_file(workers.root / "full-out" / "final.safetensors"),
        load_file(workers.root / "resumed-out" / "final.safetensors"),
    )


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_state_and_resume_takes_it(
    workers: Workers,
) -> None:
    crash = workers.result("crash-out", "crash")
    losses, trials = crash["losses"], crash["trials"]
    assert len(trials) > 20 and trials[-1]["kill_at"] == crash["ops"]
    got = set()
    for trial in trials:
        assert trial["ended"].get("signal") == signal.SIGKILL, trial
        resumed = trial["resumed"]
        assert resumed.get("exit") == 0, trial
        # Whatever instant the save died at, load_state() takes a whole state and the next
        # step's loss is the uninterrupted run's: A (saved after step 4) or the new B (step 7).
        assert (resumed["state"], resumed["step"]) in {("A", 4), ("B", 7)}, trial
        assert resumed["loss"] == losses[str(resumed["step"] + 1)], trial
        visible = [n for n in trial["visible"] if not n.startswith(".")]
        if resumed["state"] == "A":
            assert visible == ["checkpoint_0"], trial
        else:  # committed; total_limit=1 removes checkpoint_0 after that
            assert visible in (["checkpoint_0", "checkpoint_1"], ["checkpoint_1"]), trial
        got.add(resumed["state"])
    assert got == {"A", "B"}  # instants before and after the commit were both hit


@pytest.mark.slow
def test_importing_torchkeep_does_not_import_accelerate() -> None:
    code = (
        "import sys, torchkeep; assert 'accelerate' not in sys.modules; "
        "torchkeep.accelerate; assert 'accelerate' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
