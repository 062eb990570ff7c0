"""`torchkeep ls` and `torchkeep prune` on real CheckpointManager folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

import torchkeep as tk
from torchkeep.cli import main


def run(*args: str | os.PathLike[str]) -> Result:
    return CliRunner().invoke(main, [os.fspath(a) for a in args])


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    manager = tk.CheckpointManager(tmp_path / "run")
    for step, loss in ((10, 0.9), (20, 0.5), (30, 0.7), (40, 0.6)):
        manager.save(step, weights=torch.full((4,), float(step)), metrics={"val_loss": loss})
    # What an interrupted save leaves behind.
    (tmp_path / "run" / "step-00000050").mkdir()
    (tmp_path / "run" / ".step-00000060.tmp-torchkeep-0123456789ab").mkdir()
    return tmp_path / "run"


def test_ls_lists_committed_and_torn(run_dir: Path) -> None:
    result = run("ls", run_dir)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["step", "created", "size", "status"]
    assert any("40 (latest)" in line for line in lines)
    assert "val_loss=0.5" in result.output
    assert result.output.count("torn (interrupted save)") == 2
    assert "step-00000050" in result.output


def test_ls_json(run_dir: Path) -> None:
    result = run("ls", run_dir, "--json")
    rows = json.loads(result.output)
    assert [r["step"] for r in rows if r["committed"]] == [10, 20, 30, 40]
    assert sum(not r["committed"] for r in rows) == 2
    assert rows[1]["metrics"] == {"val_loss": 0.5} and rows[1]["bytes"] > 0


def test_prune_dry_run_changes_nothing(run_dir: Path) -> None:
    before = sorted(os.listdir(run_dir))
    result = run("prune", run_dir, "--keep-last", "1", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would delete step 10" in result.output and "would remove torn" in result.output
    assert sorted(os.listdir(run_dir)) == before


def test_prune_keeps_last_and_best(run_dir: Path) -> None:
    result = run(
        "prune",
        run_dir,
        "--keep-last",
        "1",
        "--keep-best",
        "1",
        "--monitor",
        "val_loss",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["deleted_steps"] == [10, 30] and len(summary["removed_torn"]) == 2
    assert tk.CheckpointManager(run_dir).steps() == [20, 40]
    assert sorted(os.listdir(run_dir)) == ["step-00000020", "step-00000040"]


def test_prune_without_policy_only_removes_torn(run_dir: Path) -> None:
    result = run("prune", run_dir)
    assert result.exit_code == 0
    assert tk.CheckpointManager(run_dir).steps() == [10, 20, 30, 40]
    assert tk.CheckpointManager(run_dir).torn() == []


def test_prune_never_deletes_the_newest(run_dir: Path) -> None:
    run("prune", run_dir, "--keep-best", "1", "--monitor", "val_loss")
    assert tk.CheckpointManager(run_dir).steps() == [20, 40]


def test_usage_errors_and_missing_folder(tmp_path: Path) -> None:
    result = run("prune", tmp_path, "--keep-best", "1")
    assert result.exit_code == 2 and "--monitor" in result.output
    result = run("ls", tmp_path / "missing")
    assert result.exit_code == 2 and "no checkpoint folder" in result.output


@pytest.mark.slow
def test_ls_as_a_real_process(run_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep", "ls", str(run_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout  # no colour in a pipe
    assert "committed" in done.stdout
