"""Forks processes that save a checkpoint and SIGKILL themselves at a chosen instant.

tests/test_faults.py starts this once (one torch import for all instants) and sends it one
JSON command per line on stdin; each reply is one JSON line on stdout:

- ``{"cmd": "count", "dir": D, "step": S}``: a child saves step S into a copy of D while
  counting file-system calls; reply ``{"ops": N}``.
- ``{"cmd": "crash", "dir": D, "step": S, "kill_at": K, "blocking": B}``: a child saves step S
  into D and sends itself SIGKILL just before its K-th file-system call; reply
  ``{"signal": 9}`` (or ``{"exit": 0}`` when the save had fewer calls).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from torchkeep.training.manager import CheckpointManager

# Every call that creates, fills, flushes, renames or removes something on disk.
HOOKED = ("open", "write", "close", "fsync", "replace", "rename", "mkdir", "unlink", "rmdir")
KEEP_LAST = 2
SHARD_BYTES = 600


def state_for(step: int) -> dict[str, Any]:
    """The state saved at ``step``: every value derived from the step, so it can be checked."""
    torch.manual_seed(step)
    return {
        "weights": {f"w{i}": torch.full((40,), float(step * 10 + i)) for i in range(6)},
        "step": step,
        "note": f"step {step}",
    }


def manager(folder: str) -> CheckpointManager:
    return CheckpointManager(folder, keep_last=KEEP_LAST, max_shard_size=SHARD_BYTES)


def hook(kill_at: int | None) -> list[int]:
    """Count hooked calls; SIGKILL this process right before call number ``kill_at``."""
    count = [0]
    lock = threading.Lock()
    for name in HOOKED:
        real = getattr(os, name)

        def hooked(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            with lock:
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)

        setattr(os, name, hooked)
    return count


def in_child(work: Any) -> dict[str, Any]:
    """Run ``work(write_fd)`` in a forked child; report how it ended and what it wrote."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 0
        try:
            work(write_fd)
        except BaseException as exc:  # report, never fall back into the server loop
            os.write(write_fd, json.dumps({"error": repr(exc)}).encode())
            code = 1
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    reply: dict[str, Any] = json.loads(data) if data else {}
    if os.WIFSIGNALED(status):
        reply["signal"] = os.WTERMSIG(status)
    else:
        reply["exit"] = os.WEXITSTATUS(status)
    return reply


def count(folder: str, step: int) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp()) / "copy"
    shutil.copytree(folder, scratch)

    def work(out: int) -> None:
        mgr = manager(str(scratch))
        counter = hook(None)
        mgr.save(step, **state_for(step))
        os.write(out, json.dumps({"ops": counter[0]}).encode())

    try:
        return in_child(work)
    finally:
        shutil.rmtree(scratch.parent)


def crash(folder: str, step: int, kill_at: int, blocking: bool) -> dict[str, Any]:
    def work(out: int) -> None:
        mgr = manager(folder)
        hook(kill_at)
        mgr.save(step, blocking=blocking, **state_for(step))
        mgr.wait()

    return in_child(work)


def main() -> None:
    torch.set_num_threads(1)  # no intra-op thread pool across fork()
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        if command["cmd"] == "count":
            reply = count(command["dir"], command["step"])
        else:
            reply = crash(
                command["dir"], command["step"], command["kill_at"], command.get("blocking", True)
            )
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
