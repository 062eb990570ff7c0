"""A tiny accelerate training run for tests/test_integration_accelerate.py, in its own process.

- ``train PROJECT OUT --steps N [--save-at K ...] [--resume]``: train N steps (with dropout,
  numpy and Python noise, so every RNG matters), ``accelerator.save_state()`` after each step
  K; with ``--resume``, ``accelerator.load_state()`` first and carry on from the step it
  restores. Writes ``OUT/result.json`` (every loss as float.hex) and ``OUT/final.safetensors``.
- ``crash PROJECT OUT``: save state A after 4 steps, train 3 more (state B), then for each
  instant k of a second save fork a child that saves B and SIGKILLs itself just before its
  k-th file-system call (tests/helpers/crash_server.py). After each kill another child calls
  ``load_state()`` on what is left, takes one training step and reports which state it got
  and that step's loss. Writes ``OUT/result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch import nn

import torchkeep as tk

sys.path.insert(0, str(Path(__file__).parent))
import crash_server

BATCHES_PER_EPOCH = 6


class Progress:
    """Where the loop is; registered for checkpointing like a user's own object."""

    def __init__(self) -> None:
        self.epoch = 0
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step = state["epoch"], state["step"]


class Run:
    """One accelerator with a model, optimizer, scheduler and stateful shuffled dataloader."""

    def __init__(self, project: str, *, total_limit: int | None, install: bool = True) -> None:
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        self.accelerator = Accelerator(
            cpu=True,
            project_config=ProjectConfiguration(
                project_dir=project, automatic_checkpoint_naming=True, total_limit=total_limit
            ),
            dataloader_config=DataLoaderConfiguration(
                use_stateful_dataloader=True, use_seedable_sampler=True
            ),
        )
        data = torch.utils.data.TensorDataset(
            torch.randn(4 * BATCHES_PER_EPOCH, 4), torch.randn(4 * BATCHES_PER_EPOCH, 1)
        )
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
        loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
        self.progress = Progress()
        self.accelerator.register_for_checkpointing(self.progress)
        self.model, self.optimizer, prepared, self.scheduler = self.accelerator.prepare(
            model, optimizer, loader, scheduler
        )
        # The prepared loader's position is accelerate's; the wrapper also keeps the random
        # draws of its first iterator after a resume from shifting every later dropout mask.
        self.loader = tk.ResumableLoader(prepared)
        self.accelerator.register_for_checkpointing(self.loader)
        if install:
            tk.accelerate.install(self.accelerator)
        self._steps = self._loop()

    def resume(self, folder: Path | None = None) -> None:
        """``load_state`` (the newest state by default); the next step continues from it."""
        self.accelerator.load_state(folder)
        self._steps = self._loop()

    def _loop(self) -> Iterator[torch.Tensor]:
        """One training step per item, epoch after epoch, the loss of each."""
        while True:
            self.loader.set_epoch(self.progress.epoch)
            for x, y in self.loader:
                noise = torch.from_numpy(np.random.normal(0, 0.05, x.shape)).float()
                loss = nn.functional.mse_loss(self.model(x + noise * random.random()), y)
                self.accelerator.backward(loss)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
                self.progress.step += 1
                yield loss
            self.progress.epoch += 1

    def train(self, until: int, save_at: frozenset[int] = frozenset()) -> dict[int, str]:
        """Train up to step ``until``; the loss of each step, as float.hex."""
        losses: dict[int, str] = {}
        while self.progress.step < until:
            loss = next(self._steps)
            losses[self.progress.step] = loss.item().hex()
            if self.progress.step in save_at:
                self.accelerator.save_state()
        return losses

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def train(args: argparse.Namespace) -> None:
    run = Run(args.project, total_limit=2)
    if args.resume:
        run.resume()
        # As with accelerate's own save_state: the next automatic name is the caller's choice.
        run.accelerator.project_configuration.iteration = len(
            os.listdir(Path(args.project) / "checkpoints")
        )
    start = run.progress.step
    losses = run.train(args.steps, frozenset(args.save_at))
    out = Path(args.out)
    tk.save(run.accelerator.unwrap_model(run.model), out / "final.safetensors")
    result = {"start": start, "losses": losses, "step": run.accelerator.step}
    (out / "result.json").write_text(json.dumps(result))


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def crash(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # no intra-op thread pool across fork()
    base = Path(args.project)
    run = Run(str(base), total_limit=1)
    losses = run.train(4, save_at=frozenset({4}))
    state_a = run.params()
    losses |= run.train(7)
    state_b = run.params()

    def copy(name: str) -> Path:
        where = Path(args.out) / name
        shutil.copytree(base, where)
        return where

    # A forked child reseeds Python's random module; it must save and train as this process.
    python_rng = random.getstate()

    def saver(project: Path, kill_at: int | None) -> Any:
        def work(out: int) -> None:
            random.setstate(python_rng)
            run.accelerator.project_configuration.project_dir = str(project)
            counter = crash_server.hook(kill_at)
            run.accelerator.save_state()
            os.write(out, json.dumps({"ops": counter[0]}).encode())

        return work

    def resumer(project: Path) -> Any:
        def work(out: int) -> None:
            random.setstate(python_rng)
            run.accelerator.project_configuration.project_dir = str(project)
            run.resume()
            params = run.params()
            got = "A" if same(params, state_a) else "B" if same(params, state_b) else "neither"
            step = run.progress.step
            loss = run.train(step + 1)[step + 1]
            os.write(out, json.dumps({"state": got, "step": step, "loss": loss}).encode())

        return work

    ops = crash_server.in_child(saver(copy("count"), None))["ops"]
    trials = []
    # Every sixth instant, and each of the last ones: the commit and total_limit's deletion.
    for kill_at in sorted(set(range(1, ops + 1, 6)) | set(range(ops - 14, ops + 1))):
        project = copy(f"kill-{kill_at}")
        ended = crash_server.in_child(saver(project, kill_at))
        resumed = crash_server.in_child(resumer(project))
        visible = sorted(os.listdir(project / "checkpoints"))
        trials.append({"kill_at": kill_at, "ended": ended, "resumed": resumed, "visible": visible})
        shutil.rmtree(project)
    losses |= run.train(8)
    result = {"ops": ops, "losses": losses, "trials": trials}
    (Path(args.out) / "result.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "crash"])
    parser.add_argument("project")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--save-at", type=int, nargs="*", default=[])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    train(args) if args.mode == "train" else crash(args)


if __name__ == "__main__":
    main()
