"""Resume the run of resume_lib from a checkpoint in a fresh process and finish it.

Usage: resume_worker.py (manager|pt) CHECKPOINT OUTPUT
Writes {"losses", "model", "optimizer", "scheduler", "step"} to OUTPUT with torch.save.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import resume_lib

from torchkeep.training.checkpoint import load_checkpoint
from torchkeep.training.manager import CheckpointManager


def main() -> None:
    mode, checkpoint, output = sys.argv[1:4]
    run = resume_lib.build()  # fresh objects, fresh RNGs: everything must come from the file
    if mode == "manager":
        extra = CheckpointManager(checkpoint).restore(**run.state())
    else:
        extra = load_checkpoint(checkpoint, **run.state())
    assert extra is not None
    step = int(extra["step"])
    losses = list(extra["losses"]) + resume_lib.train(run, step, resume_lib.TOTAL_STEPS)
    torch.save(
        {
            "step": step,
            "losses": losses,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
        },
        output,
    )


if __name__ == "__main__":
    main()
