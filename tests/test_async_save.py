"""Asynchronous saves by a forked writer (``snapshot="fork"``) and by staging copies.

The forked writer must write what a blocking save writes, as the state was when ``save``
returned; a writer killed mid-write, or a main process killed mid-save, must leave the
previous checkpoint whole, the torn step unlisted and its leftovers removed by the next save.
Every test checks that no child process outlives it.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.errors import CheckpointWriteError, TorchkeepWarning
from torchkeep.training import background
from torchkeep.training.checkpoint import load_checkpoint
from torchkeep.training.manager import CheckpointManager

pytestmark = pytest.mark.skipif(not background.available(), reason="needs os.fork")

ROOT = Path(__file__).resolve().parents[1]


def children() -> set[int]:
    """This process's child processes (Linux: /proc; elsewhere nothing is checked)."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        found.update(int(pid) for pid in task.read_text().split())
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def describe(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()[:3]
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return "gone"
    return f"{'; '.join(status)}; {command.decode(errors='replace')}"


@pytest.fixture(autouse=True)
def no_stray_children() -> Iterator[None]:
    before = children()
    yield
    deadline = time.monotonic() + 10
    while children() - before and time.monotonic() < deadline:
        time.sleep(0.02)
    stray = {pid: describe(pid) for pid in children() - before}
    assert stray == {}, f"child processes outlived the test: {stray}"


class Model(nn.Module):
    """Several dtypes, a frozen part, a buffer, a tie and a parameter of no elements."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.low = nn.Parameter(torch.randn(8, 8).to(torch.bfloat16))
        self.empty = nn.Parameter(torch.empty(0, 4))
        self.register_buffer("counts", torch.arange(10, dtype=torch.int64))
        self.register_buffer("mask", torch.rand(7) > 0.5)


def trained() -> tuple[Model, torch.optim.Optimizer]:
    model = Model()
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    model.body(model.embed(torch.arange(5))).sum().backward()
    optimizer.step()
    return model, optimizer


def snapshot_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),  # its tensors are live
    }


def train_in_place(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Change every saved tensor, as the training loop does right after ``save`` returns."""
    model.body(model.embed(torch.arange(5))).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.dtype == torch.bool:
                tensor.logical_not_()
            else:
                tensor.add_(1)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def without_identity(manifest: bytes) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(manifest)
    record.pop("id")
    record.pop("created")
    return record


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("max_shard_size", ["256MB", 3000])
def test_a_forked_save_writes_what_a_blocking_save_writes(
    tmp_path: Path, max_shard_size: int | str
) -> None:
    model, optimizer = trained()
    before = snapshot_of(model, optimizer)
    forked = CheckpointManager(tmp_path / "forked", snapshot="fork", max_shard_size=max_shard_size)
    blocking = CheckpointManager(tmp_path / "blocking", max_shard_size=max_shard_size)

    forked.save(1, model=model, optimizer=optimizer, t=model.head.weight, rng=False, blocking=False)
    writer = forked._writer
    assert writer is not None and writer.pid is not None  # the fork path was taken
    train_in_place(model, optimizer)  # the child must not see this
    forked.wait()
    assert not alive(writer.pid)

    model.load_state_dict(before["model"])
    optimizer.load_state_dict(before["optimizer"])
    blocking.save(1, model=model, optimizer=optimizer, t=model.head.weight, rng=False)

    ours, theirs = files(forked.path(1)), files(blocking.path(1))
    assert ours.keys() == theirs.keys() and len(ours) > (2 if max_shard_size == 3000 else 1)
    manifest = ours.pop("checkpoint.json")
    assert without_identity(manifest) == without_identity(theirs.pop("checkpoint.json"))
    assert ours == theirs  # every shard byte for byte
    assert tk.verify(forked.path(1)).ok
    assert hidden(tmp_path / "forked") == []

    target, target_opt = trained()
    extra = forked.restore(model=target, optimizer=target_opt, verify=True)
    assert extra is not None and torch.equal(extra["t"], before["model"]["embed.weight"])
    for name, value in before["model"].items():
        assert torch.equal(target.state_dict()[name], value), name
    saved = target_opt.state_dict()["state"]
    for index, state in before["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(saved[index][key], value), (index, key)


def test_forked_saves_keep_retention_and_recycle_working(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2, recycle=True, snapshot="fork")
    weights = torch.zeros(20_000)
    for step in range(1, 6):
        weights.fill_(step)
        mgr.save(step, weights=weights, step=step, blocking=False)
        weights.fill_(-1)  # training goes on
        mgr.wait()
    assert mgr.steps() == [4, 5]
    for step in (4, 5):
        out = load_checkpoint(mgr.path(step), verify=True)
        assert out["step"] == step and torch.equal(out["weights"], torch.full((20_000,), step))
    mgr.close()


# ----------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize(
    ("options", "save"),
    [
        ({}, {}),  # copies unless told to fork
        ({"snapshot": "copy"}, {}),
        ({"snapshot": "fork"}, {"allow_pickle": True}),  # pickled values keep the copy path
    ],
)
def test_what_the_forked_writer_does_not_take_is_copied(
    tmp_path: Path, options: dict[str, Any], save: dict[str, Any]
) -> None:
    mgr = CheckpointManager(tmp_path, **options)
    weights = torch.ones(1000)
    mgr.save(1, weights=weights, blocking=False, **save)
    weights.zero_()
    mgr.wait()
    assert mgr._writer is None and mgr._staging._buffers  # staged, not forked
    assert torch.equal(load_checkpoint(mgr.path(1), trust=True)["weights"], torch.ones(1000))


def test_tensors_a_process_cannot_share_are_not_forkable() -> None:
    assert background.forkable({"a": torch.ones(3)})
    assert not background.forkable({"a": torch.ones(3), "b": torch.ones(3, device="meta")})
    assert not background.forkable({"s": torch.eye(3).to_sparse()})


def test_without_fork_async_saves_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "fork")
    assert not background.available()
    mgr = CheckpointManager(tmp_path, snapshot="fork")
    weights = torch.ones(1000)
    mgr.save(1, weights=weights, blocking=False)
    weights.zero_()
    mgr.wait()
    assert mgr._writer is None
    assert torch.equal(load_checkpoint(mgr.path(1))["weights"], torch.ones(1000))


def test_a_failed_fork_falls_back_to_a_copy(tmp_path: Path) -> None:
    def no_more_processes() -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    mgr = CheckpointManager(tmp_path, snapshot="fork")
    weights = torch.ones(1000)
    with (
        mock.patch("os.fork", no_more_processes),
        pytest.warns(TorchkeepWarning, match="could not fork a writer for step 1"),
    ):
        mgr.save(1, weights=weights, blocking=False)
    weights.zero_()
    mgr.wait()
    assert torch.equal(load_checkpoint(mgr.path(1), verify=True)["weights"], torch.ones(1000))
    assert hidden(tmp_path) == []


# -------------------------------------------------------------------------------- faults


def test_a_disk_error_in_the_writer_commits_nothing(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, snapshot="fork")
    mgr.save(1, weights=torch.ones(1000))

    parent, write = os.getpid(), os.write

    def full(fd: int, data: Any) -> int:
        if os.getpid() == parent or stat.S_ISFIFO(os.fstat(fd).st_mode):
            return write(fd, data)  # the disk is full, not the pipes
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # Patched before the fork, so the child inherits the failing call.
    with mock.patch("os.write", full):
        mgr.save(2, weights=torch.full((1000,), 2.0), blocking=False)
    with pytest.raises(CheckpointWriteError, match="nothing was committed") as caught:
        mgr.wait()
    assert caught.value.errno == errno.ENOSPC
    assert "tensors-00000.safetensors" in str(caught.value)
    assert mgr.steps() == [1] and hidden(tmp_path) == []
    assert torch.equal(mgr.restore()["weights"], torch.ones(1000))  # type: ignore[index]


def stall_after_first_file(signal_file: Path) -> Any:
    """A ``write_files`` for the child: writes the first file, says so, then waits forever."""
    real = background.write_files

    def stalled(plans: Any, **kwargs: Any) -> Any:
        real(plans[:1], **kwargs)
        temp = signal_file.with_suffix(".tmp")
        temp.write_text(str(os.getpid()))
        os.replace(temp, signal_file)  # whole: a reader never sees part of the number
        while True:
            time.sleep(1)

    return stalled


def wait_for(path: Path, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    return path.read_text()


def test_sigkill_of_the_forked_writer_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    mgr = CheckpointManager(folder, keep_last=1, snapshot="fork", max_shard_size=4000)
    mgr.save(1, weights=torch.ones(3000), step=1)
    started = tmp_path / "writer.pid"
    with mock.patch.object(background, "write_files", stall_after_first_file(started)):
        mgr.save(2, weights=torch.full((3000,), 2.0), step=2, blocking=False)
    pid = int(wait_for(started))
    assert mgr._writer is not None and pid == mgr._writer.pid
    assert any(folder.glob(".step-00000002*/tensors-00000.safetensors"))  # mid-write
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(CheckpointWriteError, match=f"process {pid}.* signal 9 .SIGKILL"):
        mgr.wait()
    assert mgr.steps() == [1] and mgr.torn() == [] and hidden(folder) == []
    out = mgr.restore(verify=True)
    assert out is not None and out["step"] == 1 and torch.equal(out["weights"], torch.ones(3000))
    mgr.save(2, weights=torch.full((3000,), 2.0), step=2, blocking=False)
    mgr.wait()
    assert mgr.steps() == [2]


MAIN = """
import os, sys, time
import torch
from torchkeep.training import background
from torchkeep.training.manager import CheckpointManager
sys.path.insert(0, {tests!r})
from test_async_save import stall_after_first_file
from pathlib import Path

folder, started = sys.argv[1], Path(sys.argv[2])
mgr = CheckpointManager(folder, keep_last=1, snapshot="fork", max_shard_size=4000)
mgr.save(1, weights=torch.ones(3000), step=1)
background.write_files = stall_after_first_file(started)
mgr.save(2, weights=torch.full((3000,), 2.0), step=2, blocking=False)
print("saving", flush=True)
time.sleep(600)
"""


def test_sigkill_of_the_main_process_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    folder, started = tmp_path / "run", tmp_path / "writer.pid"
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(MAIN.format(tests=str(Path(__file__).parent))))
    main = subprocess.Popen(
        [sys.executable, str(script), str(folder), str(started)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    writer = 0
    try:
        writer = int(wait_for(started, 120))
        assert main.stdout is not None and main.stdout.readline() == "saving\n"
        assert alive(writer)
        os.kill(main.pid, signal.SIGKILL)
        assert main.wait(30) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while alive(writer) and time.monotonic() < deadline:  # it dies with its parent
            time.sleep(0.01)
        assert not alive(writer), "the forked writer outlived the process that started it"
    finally:
        main.kill()
        main.wait()
        if writer and alive(writer):
            os.kill(writer, signal.SIGKILL)
    mgr = CheckpointManager(folder, keep_last=1)
    assert mgr.steps() == [1] and mgr.latest() == 1
    assert [Path(p).name for p in mgr.torn()] == hidden(folder) != []  # the writer's folder
    out = mgr.restore(verify=True)
    assert out is not None and out["step"] == 1 and torch.equal(out["weights"], torch.ones(3000))
    mgr.save(2, weights=torch.full((3000,), 2.0), step=2)
    assert mgr.steps() == [2] and mgr.torn() == [] and hidden(folder) == []
