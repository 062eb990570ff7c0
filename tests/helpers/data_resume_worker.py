"""A training run with dropout and a shuffling loader with workers, killed and resumed.

Usage: data_resume_worker.py (plain|stateful) RUN_DIR OUTPUT [KILL_AT_STEP]

Restores the latest checkpoint in RUN_DIR if there is one, trains to the end, saving after
every step (in the background), and writes {"first_step", "losses", "model"} to OUTPUT with
torch.save. With KILL_AT_STEP the process sends itself SIGKILL right after that step's save
was handed to the background writer, so the kill may land in the middle of writing it.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk

EPOCHS = 3
SAMPLES = 48
BATCH = 8  # 6 batches an epoch


def build(mode: str) -> tuple[nn.Module, torch.optim.Optimizer, tk.ResumableLoader]:
    torch.set_num_threads(1)  # the same reduction order in every process
    data = torch.Generator().manual_seed(7)
    dataset = TensorDataset(
        torch.randn(SAMPLES, 6, generator=data), torch.randint(0, 3, (SAMPLES,), generator=data)
    )
    torch.manual_seed(0)  # the loader shuffles from the global generator, dropout too
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    if mode == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        loader: DataLoader[tuple[torch.Tensor, ...]] = StatefulDataLoader(
            dataset, batch_size=BATCH, shuffle=True, num_workers=2
        )
    else:
        loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=2)
    return model, optimizer, tk.ResumableLoader(loader)


def main() -> None:
    mode, run_dir, output = sys.argv[1:4]
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.save(train(mode, run_dir, kill_at), output)


def train(mode: str, run_dir: str, kill_at: int | None = None) -> dict[str, object]:
    """Restore the latest checkpoint in ``run_dir`` if any, and train to the end."""
    model, optimizer, loader = build(mode)
    manager = tk.CheckpointManager(run_dir, keep_last=2)
    resumed = manager.restore(model=model, optimizer=optimizer, data=loader)
    epoch, step = (resumed["epoch"], resumed["step"]) if resumed else (0, 0)
    first_step, losses = step, []
    while epoch < EPOCHS:
        for inputs, labels in loader:
            model.train()
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            manager.save(
                step,
                model=model,
                optimizer=optimizer,
                data=loader,
                epoch=epoch,
                step=step,
                blocking=False,
            )
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        epoch += 1
    manager.close()
    return {"first_step": first_step, "losses": losses, "model": model.state_dict()}


if __name__ == "__main__":
    main()
