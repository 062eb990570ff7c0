"""Resuming in a new process continues a training run bit for bit.

The run (tests/helpers/resume_lib.py) has dropout, a shuffled DataLoader, Adam and a step LR
schedule. It is trained N steps straight; then k steps, saved, and finished by a fresh Python
process that restores the checkpoint (tests/helpers/resume_worker.py). Parameters, optimizer
state, schedule and every loss must be identical.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from torchkeep.training.checkpoint import load_checkpoint, save_checkpoint
from torchkeep.training.manager import CheckpointManager

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import resume_lib  # noqa: E402

N = resume_lib.TOTAL_STEPS


@pytest.fixture(autouse=True)
def _keep_thread_count() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def identical(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(identical, a, b))
    return bool(a == b) and type(a) is type(b)


def straight_run() -> tuple[list[float], resume_lib.Run]:
    run = resume_lib.build()
    return resume_lib.train(run, 0, N), run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "k"),
    [("manager", 7), ("pt", resume_lib.PER_EPOCH)],
    ids=["native-mid-epoch", "pt-epoch-boundary"],
)
def test_resume_in_a_new_process_is_bit_exact(tmp_path: Path, layout: str, k: int) -> None:
    reference_losses, reference = straight_run()

    run = resume_lib.build()
    losses = resume_lib.train(run, 0, k)
    assert losses == reference_losses[:k]
    if layout == "manager":
        checkpoint = tmp_path / "run"
        CheckpointManager(checkpoint).save(k, step=k, losses=losses, **run.state())
    else:
        checkpoint = tmp_path / "ckpt.pt"
        save_checkpoint(checkpoint, step=k, losses=losses, **run.state())
    del run

    output = tmp_path / "resumed.pt"
    subprocess.run(
        [sys.executable, str(HELPERS / "resume_worker.py"), layout, str(checkpoint), str(output)],
        check=True,
        timeout=120,
    )
    resumed = torch.load(output, weights_only=True)

    assert resumed["step"] == k
    assert len(resumed["losses"]) == N
    assert resumed["losses"] == reference_losses  # exact float equality, every step
    assert identical(resumed["model"], reference.model.state_dict())
    assert identical(resumed["optimizer"], reference.optimizer.state_dict())
    assert identical(resumed["scheduler"], reference.scheduler.state_dict())


def test_resume_without_rng_or_shuffle_state_diverges(tmp_path: Path) -> None:
    """The exactness above is not luck: leave out either state and the run differs."""
    reference_losses, _ = straight_run()
    run = resume_lib.build()
    k = 7
    losses = resume_lib.train(run, 0, k)
    save_checkpoint(tmp_path / "c", step=k, losses=losses, **run.state())

    no_rng = resume_lib.build()
    load_checkpoint(tmp_path / "c", rng=False, **no_rng.state())
    assert resume_lib.train(no_rng, k, N) != reference_losses[k:]  # other dropout masks

    no_shuffle = resume_lib.build()
    state = no_shuffle.state()
    del state["epoch_generator"]
    load_checkpoint(tmp_path / "c", **state)
    assert resume_lib.train(no_shuffle, k, N) != reference_losses[k:]  # other batches

    exact = resume_lib.build()
    load_checkpoint(tmp_path / "c", **exact.state())
    assert resume_lib.train(exact, k, N) == reference_losses[k:]
