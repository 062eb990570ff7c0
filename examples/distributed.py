"""Distributed checkpoints on the CPU: FSDP2 on gloo, saved and resumed by CheckpointManager.

Run it with one command (2 processes; any number works)::

    torchrun --nproc-per-node 2 examples/distributed.py

Every rank writes its own shards; rank 0 commits each checkpoint after a barrier. Run it again
and it resumes from the latest checkpoint; run it with a different ``--nproc-per-node`` and
the checkpoint is resharded on load. At the end rank 0 converts the latest checkpoint's model
into one safetensors file, one tensor in memory at a time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import torchkeep as tk
from torchkeep.distributed.dcp import dcp_to_safetensors


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="demo-output/distributed", help="checkpoint folder or URL")
    parser.add_argument("--steps", type=int, default=6, help="train until this step")
    parser.add_argument("--every", type=int, default=2, help="save every this many steps")
    args = parser.parse_args()

    if "RANK" not in os.environ:
        raise SystemExit("start it with: torchrun --nproc-per-node 2 examples/distributed.py")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    mgr = tk.CheckpointManager(args.dir, keep_last=2, monitor="loss")
    extra = mgr.restore(model=model, optimizer=optimizer)
    start = 0 if extra is None else extra["step"] + 1
    if rank == 0:
        where = "a fresh run" if extra is None else f"step {extra['step']} of {mgr.directory}"
        print(f"{world} ranks, starting at step {start} ({where})")

    for step in range(start, args.steps):
        generator = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
        x = torch.randn(16, 32, generator=generator)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps - 1:
            # Captured now, written by a background thread on a gloo group of its own.
            mgr.save(
                step,
                model=model,
                optimizer=optimizer,
                step=step,
                metrics={"loss": loss.item()},
                blocking=False,
            )
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f}, saving")
    mgr.close()

    if rank == 0:
        latest = mgr.latest()
        print(f"committed steps: {mgr.steps()} (latest {latest}, best {mgr.best()})")
        if latest is not None and isinstance(mgr.directory, Path):
            out = mgr.directory / "model.safetensors"
            dcp_to_safetensors(mgr.path(latest), out, prefix="model")
            info = tk.inspect(out)
            print(f"{out}: {len(info.tensors)} tensors, unsharded")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
