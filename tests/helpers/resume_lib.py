"""A small training run shared by tests/test_resume.py and its subprocess worker.

Dropout draws from torch's global RNG, the DataLoader shuffles with its own generator, and
Adam and a step LR schedule carry state: resuming bit-exactly needs all of them back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SAMPLES = 40
BATCH = 8
PER_EPOCH = SAMPLES // BATCH
TOTAL_STEPS = 13


@dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # the loader's shuffling generator
    epoch_generator: torch.Generator  # its state when the current epoch began
    loader: DataLoader[tuple[torch.Tensor, ...]]

    def state(self) -> dict[str, object]:
        """What a checkpoint must hold to resume this run exactly."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "generator": self.generator,
            "epoch_generator": self.epoch_generator,
        }


def build() -> Run:
    torch.set_num_threads(1)  # the same reduction order in every process
    data_gen = torch.Generator().manual_seed(7)
    inputs = torch.randn(SAMPLES, 6, generator=data_gen)
    labels = torch.randint(0, 3, (SAMPLES,), generator=data_gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    generator = torch.Generator().manual_seed(1234)
    loader = DataLoader(
        TensorDataset(inputs, labels), batch_size=BATCH, shuffle=True, generator=generator
    )
    return Run(model, optimizer, scheduler, generator, torch.Generator(), loader)


def train(
    run: Run, start: int, stop: int, on_step: Callable[[int], None] | None = None
) -> list[float]:
    """Train from global step ``start`` to ``stop``; return each step's loss."""
    losses: list[float] = []
    step = start
    while step < stop:
        skip = step % PER_EPOCH
        if skip == 0:
            run.epoch_generator.set_state(run.generator.get_state())
        else:
            # Resuming mid-epoch: replay this epoch's shuffle and skip what was done.
            run.generator.set_state(run.epoch_generator.get_state())
        batches = iter(run.loader)
        for _ in range(skip):
            next(batches)
        for inputs, labels in batches:
            if step >= stop:
                break
            run.model.train()
            run.optimizer.zero_grad()
            loss = nn.functional.cross_entropy(run.model(inputs), labels)
            loss.backward()
            run.optimizer.step()
            run.scheduler.step()
            losses.append(loss.item())
            step += 1
            if on_step is not None:
                on_step(step)
    return losses
