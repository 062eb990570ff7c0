"""A tiny GPT-2 trained by transformers' Trainer, with torchkeep's checkpoints or the plain ones.

Imported by tests/test_integration_transformers.py, and run as a separate process:

    transformers_worker.py RESULT CHECKPOINT [--kill POINT=RUN_DIR ...]

First, for each ``--kill``, a forked child trains a new run in RUN_DIR and SIGKILLs itself at
one filesystem call of its second save (``weights``: creating a weight shard; ``state``:
creating the training state's manifest; ``commit``: renaming the finished folder into place).
Then this process resumes the run of CHECKPOINT (a ``checkpoint-N`` folder) to the end and
writes RESULT.json (the losses it logged, and how each child ended) and RESULT.safetensors
(the final weights). One process for all of it: importing transformers is the slow part.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments
from transformers import Trainer as PlainTrainer
from transformers.utils import logging as hf_logging

import torchkeep as tk
from torchkeep._common import TEMP_MARKER
from torchkeep.integrations.transformers import Trainer

# 12 samples, 4 per step: 3 steps an epoch, so checkpoint-2, -4 and -8 fall mid-epoch.
SAMPLES, BATCH, MAX_STEPS, SAVE_STEPS = 12, 4, 8, 2
# Every process trains with one thread: bit-for-bit comparisons need the same count, and a
# model this small trains fastest so.
THREADS = 1
# The save whose folder the fault injection kills.
KILLED_SAVE = f"checkpoint-{2 * SAVE_STEPS}"


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, 64, (SAMPLES, 8), generator=generator)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class LossLog(TrainerCallback):
    """Every logged training loss, by global step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def build_model() -> GPT2LMHeadModel:
    """The same freshly initialised model in every process (dropout on, tied embeddings)."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def arguments(output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": MAX_STEPS,
        "save_steps": SAVE_STEPS,
        "report_to": [],
        "use_cpu": True,
        "seed": 7,
        "dataloader_num_workers": 0,
        "logging_steps": 1,
        "per_device_train_batch_size": BATCH,
        "learning_rate": 1e-2,
        "warmup_steps": 2,
        "disable_tqdm": True,
    }
    options.update(overrides)
    return TrainingArguments(**options)


def run(
    output_dir: str | Path,
    *,
    resume: str | bool | None = None,
    plain: bool = False,
    blocking: bool = True,
    **overrides: Any,
) -> tuple[dict[int, float], GPT2LMHeadModel, Any]:
    """Train (or resume) the run; return the logged losses, the model and the trainer."""
    log = LossLog()
    model = build_model()
    common: dict[str, Any] = {
        "model": model,
        "args": arguments(output_dir, **overrides),
        "train_dataset": Tokens(),
        "callbacks": [log],
    }
    if plain:
        trainer: Any = PlainTrainer(**common)
    else:
        trainer = Trainer(**common, blocking=blocking, max_shard_size="20KB")
    trainer.train(resume_from_checkpoint=resume)
    return log.losses, model, trainer


def _kill_at(point: str) -> None:
    """SIGKILL this process at one filesystem call of the save of KILLED_SAVE."""
    real_open, real_replace = os.open, os.replace

    def in_killed_save(path: Any) -> bool:
        return f".{KILLED_SAVE}{TEMP_MARKER}" in os.fspath(path)

    def fault_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        name = os.path.basename(os.fspath(path))
        target = (point == "weights" and name.endswith(".safetensors")) or (
            point == "state" and name == "checkpoint.json"
        )
        if target and flags & os.O_CREAT and in_killed_save(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_open(path, flags, *args, **kwargs)

    def fault_replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if point == "commit" and os.path.basename(os.fspath(dst)) == KILLED_SAVE:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, **kwargs)

    os.open = fault_open  # type: ignore[assignment]
    os.replace = fault_replace  # type: ignore[assignment]


def _killed_run(point: str, run_dir: str) -> int:
    """Train in a forked child that kills itself mid-save; its exit signal (0: it was not)."""
    pid = os.fork()
    if pid == 0:
        try:
            _kill_at(point)
            run(run_dir)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result")
    parser.add_argument("checkpoint")
    parser.add_argument("--kill", action="append", default=[], metavar="POINT=RUN_DIR")
    options = parser.parse_args()
    warnings.simplefilter("ignore")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(THREADS)
    # Children first, while this process has not started torch's worker threads.
    killed = {
        point: _killed_run(point, run_dir)
        for point, run_dir in (spec.split("=", 1) for spec in options.kill)
    }
    checkpoint = Path(options.checkpoint)
    losses, model, _ = run(checkpoint.parent, resume=str(checkpoint))
    result = Path(options.result)
    report = {"losses": {str(k): v for k, v in losses.items()}, "killed": killed}
    result.with_suffix(".json").write_text(json.dumps(report))
    tk.save(model, result.with_suffix(".safetensors"))


if __name__ == "__main__":
    main()
