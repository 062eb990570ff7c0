"""A tiny deterministic Lightning run, used in-process and as a separate process.

tests/test_integration_lightning.py imports :func:`train` and the model; run as a script it
trains in a fresh process (for resume and crash tests):

    lightning_worker.py OUTPUT ROOT EPOCHS [--resume PATH|last] [--kill-at N] [--async]

It writes ``{"losses": {global_step: loss}, "params": state_dict}`` to OUTPUT with torch.save.
``--kill-at N`` sends the process SIGKILL just before the N-th save of ``last.ckpt`` writes its
``checkpoint.json`` (every shard is written by then; nothing is committed yet).
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk

BATCHES_PER_EPOCH = 4
TOP_K = 2


class Model(L.LightningModule):
    def __init__(self, width: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)]


class Losses(L.Callback):
    """Every training loss, by the global step it ended at."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, *_: Any) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"].item())


def data() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16 * BATCHES_PER_EPOCH, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(len(x), 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


@dataclass
class Run:
    losses: dict[int, float]
    params: dict[str, torch.Tensor]
    folder: Path  # where ModelCheckpoint wrote


def train(
    root: Path,
    epochs: int,
    plugin: Any = None,
    resume: str | None = None,
) -> Run:
    """Train ``Model`` for ``epochs`` epochs under ``root``, checkpointing every epoch."""
    warnings.filterwarnings("ignore", module="lightning")
    L.seed_everything(0, verbose=False)
    losses = Losses()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        log_every_n_steps=1,
        default_root_dir=root,
        plugins=[plugin] if plugin is not None else None,
        callbacks=[
            losses,
            ModelCheckpoint(monitor="val_loss", save_top_k=TOP_K, save_last=True),
        ],
    )
    model = Model()
    trainer.fit(model, data(), data(), ckpt_path=resume)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Run(losses.losses, params, root / "checkpoints")


def kill_before_manifest(count: int) -> None:
    """SIGKILL this process when the ``count``-th save of last.ckpt opens its manifest."""
    real_open = os.open
    seen = [0]

    def hooked(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        target = Path(os.fsdecode(path))
        creates = bool(flags & os.O_CREAT)  # not the read-only opens that fsync the files
        if creates and target.name == "checkpoint.json" and target.parent.name.startswith(".last"):
            seen[0] += 1
            if seen[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_open(path, flags, *args, **kwargs)

    os.open = hooked  # type: ignore[assignment]


def main(argv: list[str]) -> None:
    output, root, epochs = Path(argv[0]), Path(argv[1]), int(argv[2])
    options = argv[3:]
    resume = options[options.index("--resume") + 1] if "--resume" in options else None
    if "--kill-at" in options:
        kill_before_manifest(int(options[options.index("--kill-at") + 1]))
    plugin = tk.lightning.CheckpointIO(async_save="--async" in options)
    run = train(root, epochs, plugin, resume)
    torch.save({"losses": run.losses, "params": run.params}, output)


if __name__ == "__main__":
    main(sys.argv[1:])
