"""Ranks of the real multi-process (gloo, CPU) runs in tests/test_distributed.py.

Each function runs in one process of a ``torch.multiprocessing.spawn`` world. Assertions fail
the rank, which fails the spawn and so the test.
"""

from __future__ import annotations

import datetime
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

import torchkeep as tk

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build() -> nn.Module:
    """The same model on every rank (odd sizes, so 3 ranks shard unevenly)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 3))


def fsdp(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def train(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, steps: int) -> None:
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 * rank + step)
        optimizer.zero_grad()
        model(torch.randn(4, 6, generator=generator)).square().mean().backward()
        optimizer.step()


def start(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors, unsharded, under flat names (rank 0 gets them)."""
    out = {f"model.{k}": v.clone() for k, v in get_model_state_dict(model, options=FULL).items()}
    optim = get_optimizer_state_dict(model, optimizer, options=FULL)
    for fqn, values in optim.get("state", {}).items():
        for key, value in values.items():
            out[f"optimizer.{fqn}.{key}"] = torch.as_tensor(value).clone()
    return out


def save_fsdp_then_crash(rank: int, world: int, port: int, folder: str, ref: str) -> None:
    """FSDP2 on 2 ranks: an asynchronous save of step 1, then rank 1 dies saving step 2."""
    start(rank, world, port)
    model = fsdp(build())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, optimizer, rank, 2)
    mgr = tk.CheckpointManager(folder, keep_last=2)
    reference = full_state(model, optimizer)
    mgr.save(1, model=model, optimizer=optimizer, epoch=1, metrics={"loss": 0.5}, blocking=False)
    train(model, optimizer, rank, 1)  # changes every tensor while step 1 is written
    mgr.wait()
    if rank == 0:
        tk.save(reference, Path(ref) / "fsdp.safetensors")
    dist.barrier()
    if rank == 1:
        from torch.distributed.checkpoint import FileSystemWriter

        def die(*args: Any, **kwargs: Any) -> Any:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: this rank dies mid-save

        FileSystemWriter.write_data = die  # type: ignore[method-assign]
    mgr.save(2, model=model, optimizer=optimizer, epoch=2)
    raise AssertionError("step 2 was saved although rank 1 died")


def reshard_and_save_ddp(
    rank: int, world: int, port: int, folder: str, ref: str, ddp_folder: str
) -> None:
    """3 ranks: restore the 2-rank FSDP2 checkpoint, then save a DDP one."""
    start(rank, world, port)
    model = fsdp(build())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    extra = tk.CheckpointManager(folder).restore(model=model, optimizer=optimizer)
    assert extra == {"epoch": 1}, extra
    got = full_state(model, optimizer)
    if rank == 0:
        expected = tk.load_state_dict(Path(ref) / "fsdp.safetensors")
        assert got.keys() == expected.keys(), (sorted(got), sorted(expected))
        for name, value in expected.items():
            assert torch.equal(got[name], value), (name, got[name], value)
    assert optimizer.param_groups[0]["lr"] == 0.01  # hyperparameters come back too

    ddp = nn.parallel.DistributedDataParallel(build())
    ddp_optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    train(ddp, ddp_optimizer, rank, 2)
    mgr = tk.CheckpointManager(ddp_folder, keep_last=1)
    mgr.save(7, model=ddp, optimizer=ddp_optimizer, note="ddp")
    if rank == 0:
        tk.save(ddp, Path(ref) / "ddp.safetensors")
    dist.barrier()
    dist.destroy_process_group()
