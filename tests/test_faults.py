"""Crashes and disk errors during a save never cost the previous checkpoint.

- Real SIGKILLs: a helper process (tests/helpers/crash_server.py) forks savers that kill
  themselves just before their k-th file-system call, for every k of a save (writes, fsyncs,
  renames, retention's deletions). After each kill this process checks what a restarted
  manager sees, then saves again.
- Write errors: ENOSPC injected at os.write and os.fsync calls.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

import torchkeep as tk
from torchkeep.storage import local as local_storage
from torchkeep.training.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from torchkeep.training.manager import CheckpointManager

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import crash_server  # noqa: E402


def check_committed(folder: Path, step: int) -> None:
    """The checkpoint of ``step`` loads, passes every checksum and holds that step's state."""
    out = load_checkpoint(crash_server.manager(str(folder)).path(step), verify=True)
    expected = crash_server.state_for(step)
    assert out["step"] == step and out["note"] == expected["note"]
    assert out["weights"].keys() == expected["weights"].keys()
    for name, value in expected["weights"].items():
        assert torch.equal(out["weights"][name], value), (step, name)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("step-"))


class Server:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HELPERS / "crash_server.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "crash server died"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write('{"cmd": "quit"}\n')
        self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture
def server() -> Iterator[Server]:
    started = Server()
    yield started
    started.close()


@pytest.mark.slow
def test_sigkill_at_every_instant_of_a_save(tmp_path: Path, server: Server) -> None:
    folder = tmp_path / "run"
    mgr = crash_server.manager(str(folder))
    for step in (1, 2):
        mgr.save(step, **crash_server.state_for(step))
    reply = server.ask(cmd="count", dir=str(folder), step=3)
    ops = reply["ops"]
    assert ops >= 30, reply  # enough distinct instants: writes, fsyncs, renames, deletions

    step = 3
    outcomes = {"before commit": 0, "after commit": 0, "completed": 0}
    for kill_at in range(1, ops + 2):
        reply = server.ask(
            cmd="crash", dir=str(folder), step=step, kill_at=kill_at, blocking=kill_at % 2 == 0
        )
        if kill_at <= ops:
            assert reply.get("signal") == signal.SIGKILL, (kill_at, reply)
        else:
            assert reply.get("exit") == 0, reply

        restarted = crash_server.manager(str(folder))
        steps = restarted.steps()
        assert step - 1 in steps, (kill_at, steps)  # the previous checkpoint survives
        assert restarted.latest() in (step - 1, step), (kill_at, steps)
        # Nothing torn is visible: every step folder is committed and intact.
        visible = sorted(p.name for p in folder.iterdir() if p.name.startswith("step-"))
        assert visible == [restarted.path(s).name for s in steps], (kill_at, visible)
        for committed in steps:
            check_committed(folder, committed)
        if restarted.latest() == step:
            outcomes["completed" if kill_at > ops else "after commit"] += 1
            step += 1
        else:
            outcomes["before commit"] += 1

        # The next save succeeds, cleans up whatever the kill left behind, and applies
        # retention.
        restarted.save(step, **crash_server.state_for(step))
        assert restarted.steps() == [step - 1, step], kill_at
        assert leftovers(folder) == [], (kill_at, leftovers(folder))
        check_committed(folder, step)
        step += 1
    assert outcomes["before commit"] >= 20 and outcomes["after commit"] >= 3, outcomes
    assert outcomes["completed"] == 1


# ------------------------------------------------------------------------ write errors


def fail_on_call(real: Callable[..., Any], number: int) -> Callable[..., Any]:
    """``real``, except that call ``number`` raises ENOSPC; counts calls in ``.calls``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wrapper.calls += 1  # type: ignore[attr-defined]
        if wrapper.calls == number:  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    wrapper.calls = 0  # type: ignore[attr-defined]
    return wrapper


def calls_in_one_save(name: str, save: Callable[[], object]) -> int:
    counter = fail_on_call(getattr(os, name), 0)
    with mock.patch(f"os.{name}", counter):
        save()
    return int(counter.calls)  # type: ignore[attr-defined]


STATE: dict[str, Any] = {
    "weights": {f"w{i}": torch.full((50,), float(i)) for i in range(4)},
    "epoch": 1,
}


@pytest.mark.parametrize("call", ["write", "fsync"])
def test_enospc_commits_nothing_and_keeps_the_previous_checkpoint(
    tmp_path: Path, call: str
) -> None:
    folder = tmp_path / "run"
    mgr = CheckpointManager(folder, keep_last=1, max_shard_size=400)
    mgr.save(1, **STATE)
    total = calls_in_one_save(
        call, lambda: CheckpointManager(tmp_path / "probe", max_shard_size=400).save(5, **STATE)
    )
    assert total >= 4
    # Every fsync (shards, manifest, folder, and the parent's after the rename) and the
    # first, a middle and the last write (the manifest).
    numbers = range(1, total + 1) if call == "fsync" else sorted({1, total // 2, total})
    for number in numbers:
        failing = mock.patch(f"os.{call}", fail_on_call(getattr(os, call), number))
        with failing, pytest.raises(CheckpointWriteError) as caught:
            mgr.save(2, epoch=2, weights=STATE["weights"])
        assert caught.value.errno == errno.ENOSPC
        assert "No space left on device" in str(caught.value)
        assert "nothing was committed" in str(caught.value)
        assert mgr.steps() == [1], number
        assert leftovers(folder) == [], number
        assert load_checkpoint(mgr.path(1), verify=True)["epoch"] == 1
    mgr.save(2, epoch=2, weights=STATE["weights"])
    assert mgr.steps() == [2] and leftovers(folder) == []


def test_enospc_in_an_async_save_surfaces_on_wait(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, **STATE)
    with mock.patch("os.write", fail_on_call(os.write, 2)):
        mgr.save(2, blocking=False, **STATE)
        with pytest.raises(CheckpointWriteError, match="No space left"):
            mgr.wait()
    assert mgr.steps() == [1]
    mgr.save(2, **STATE)
    assert mgr.steps() == [1, 2] and leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_checkpoint_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    save_checkpoint(path, epoch=1, **{k: v for k, v in STATE.items() if k != "epoch"})
    total = calls_in_one_save("fsync", lambda: save_checkpoint(tmp_path / "probe", **STATE))
    for number in range(1, total + 1):  # the last one is the parent's, after the rename
        failing = mock.patch("os.fsync", fail_on_call(os.fsync, number))
        with failing, pytest.raises(CheckpointWriteError):
            save_checkpoint(path, epoch=2, weights=STATE["weights"])
        assert load_checkpoint(path, verify=True)["epoch"] == 1, number
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "probe"], number


def test_enospc_while_writing_a_pt_file_keeps_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, epoch=1)

    def full_disk(obj: object, f: Any) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with mock.patch("torch.save", full_disk), pytest.raises(CheckpointWriteError) as caught:
        save_checkpoint(path, epoch=2)
    assert caught.value.errno == errno.ENOSPC and "nothing was committed" in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(path)["epoch"] == 1


@pytest.mark.parametrize("verb", ["save", "save-pt", "save-sharded", "convert"])
def test_a_full_disk_in_save_and_convert_is_a_typed_write_error(tmp_path: Path, verb: str) -> None:
    model = torch.nn.Linear(64, 64)
    source = tmp_path / "source.safetensors"
    tk.save(model, source)
    targets = {
        "save": tmp_path / "w.safetensors",
        "save-pt": tmp_path / "w.pt",
        "save-sharded": tmp_path / "shards",
        "convert": tmp_path / "c.pt",
    }
    target = targets[verb]
    calls = {
        "save": lambda: tk.save(model, target),
        "save-pt": lambda: tk.save(model, target),
        "save-sharded": lambda: tk.save(model, target, max_shard_size=4096),
        "convert": lambda: tk.convert(source, target),
    }
    # The first fsync fails as a full disk would; every writer fsyncs before committing.
    with (
        mock.patch("os.fsync", fail_on_call(os.fsync, 1)),
        pytest.raises(tk.CheckpointWriteError) as caught,
    ):
        calls[verb]()
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert str(target) in str(caught.value) and "untouched" in str(caught.value)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source.safetensors"]


# ------------------------------------------------------------------------- read errors


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize(
    ("code", "error", "builtin"),
    [
        (errno.EACCES, tk.FileAccessError, PermissionError),
        (errno.EIO, tk.CheckpointReadError, OSError),
    ],
    ids=["permission", "io-error"],
)
def test_operating_system_errors_while_reading_are_typed(
    tmp_path: Path, suffix: str, code: int, error: type[Exception], builtin: type[Exception]
) -> None:
    path = tk.save(torch.nn.Linear(3, 2), tmp_path / f"w{suffix}")
    real_os_open, real_open = os.open, open

    def refuse(name: Any) -> None:
        if os.fspath(name) == str(path):
            raise OSError(code, os.strerror(code), str(path))

    def os_open(name: Any, *args: Any, **kwargs: Any) -> Any:
        refuse(name)
        return real_os_open(name, *args, **kwargs)

    def builtin_open(name: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(name, str | os.PathLike):
            refuse(name)
        return real_open(name, *args, **kwargs)

    with (
        mock.patch("os.open", os_open),
        mock.patch("builtins.open", builtin_open),
        pytest.raises(error) as caught,
    ):
        tk.load_state_dict(path)
    assert isinstance(caught.value, builtin) and isinstance(caught.value, tk.TorchkeepError)
    assert caught.value.errno == code and str(path) in str(caught.value)


@pytest.mark.skipif(local_storage._RENAMEAT2 is None, reason="needs renameat2 (Linux)")
def test_an_overwrite_swaps_the_folders_in_one_step(tmp_path: Path) -> None:
    """No instant without a checkpoint at the path: no rename-aside-then-rename-in."""
    path = tmp_path / "ckpt"
    save_checkpoint(path, epoch=1, weights=STATE["weights"])
    with mock.patch("os.replace", side_effect=AssertionError("a two-step overwrite")):
        save_checkpoint(path, epoch=2, weights=STATE["weights"])
    assert load_checkpoint(path, verify=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_without_a_one_step_swap_an_overwrite_renames_aside_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_storage, "_RENAMEAT2", None)
    path = tmp_path / "ckpt"
    save_checkpoint(path, epoch=1, weights=STATE["weights"])
    renames = calls_in_one_save(
        "replace", lambda: save_checkpoint(path, epoch=2, weights=STATE["weights"])
    )
    assert renames >= 2  # the old folder aside, the new one in
    assert load_checkpoint(path, verify=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
