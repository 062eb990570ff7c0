"""The benchmark's data and its raw limits: a transformer-shaped model, plain I/O loops.

The state is shaped like a language model: two large vocabulary matrices, a few large
matrices per block and many small vectors (biases, layer norms). The raw limits are the
simplest code that moves the same bytes: parallel ``os.pwrite`` of every tensor, one
sequential read, one ``memcpy``. They are what the hardware and kernel allow, so torchkeep's
time is reported as a fraction of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)


class Transformer(nn.Module):
    """Only the parameter shapes matter here; there is no forward pass."""

    def __init__(self, vocab: int, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)


def shape_for(megabytes: float) -> tuple[int, int, int]:
    """``(vocab, width, layers)`` of a float32 model of about ``megabytes`` MB."""
    vocab, width = (32000, 1024) if megabytes >= 768 else (16000, 512)
    if megabytes < 96:
        vocab, width = 8000, 256
    block = (12 * width * width + 13 * width) * 4
    rest = megabytes * 1e6 - 2 * vocab * width * 4
    return vocab, width, max(1, round(rest / block))


def make_model(megabytes: float, seed: int = 0) -> Transformer:
    """A model of about ``megabytes`` MB, every parameter random (no zero pages)."""
    torch.manual_seed(seed)
    vocab, width, layers = shape_for(megabytes)
    with torch.device("meta"):
        model = Transformer(vocab, width, layers)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)  # in place: no temporary the size of the tensor
    return model


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def views(state: dict[str, torch.Tensor]) -> list[memoryview]:
    return [t.reshape(-1).view(torch.uint8).numpy().data for t in state.values() if t.numel()]


# ------------------------------------------------------------------------------ raw limits


def _stretches(data: Sequence[memoryview], parts: int) -> list[list[tuple[int, memoryview]]]:
    """``(file offset, bytes)`` pieces, cut into ``parts`` contiguous stretches."""
    pieces: list[tuple[int, memoryview]] = []
    offset = 0
    for view in data:
        for start in range(0, view.nbytes, 64 << 20):
            pieces.append((offset + start, view[start : start + (64 << 20)]))
        offset += view.nbytes
    share = -(-offset // parts)
    out: list[list[tuple[int, memoryview]]] = [[] for _ in range(parts)]
    for position, piece in pieces:
        out[min(position // share, parts - 1)].append((position, piece))
    return out


def raw_write(
    path: Path, data: Sequence[memoryview], *, threads: int = 2, fsync: bool = False
) -> None:
    """The limit: the same bytes written to ``path`` by plain parallel ``os.pwrite``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)

    def work(stretch: list[tuple[int, memoryview]]) -> None:
        for position, piece in stretch:
            while piece:
                done = os.pwrite(fd, piece, position)
                piece, position = piece[done:], position + done

    try:
        workers = [threading.Thread(target=work, args=(s,)) for s in _stretches(data, threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def raw_read(path: Path, buffer: memoryview) -> None:
    """The limit for cold reads: one thread reading the file front to back into memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < buffer.nbytes:
            step = os.preadv(fd, [buffer[done : done + (64 << 20)]], done)
            if step <= 0:
                break
            done += step
    finally:
        os.close(fd)


def memcpy(destination: torch.Tensor, source: torch.Tensor) -> None:
    """The limit for warm loads: one plain ``memcpy`` of the same number of bytes."""
    ctypes.memmove(destination.data_ptr(), source.data_ptr(), source.numel())


def drop_caches() -> bool:
    """Empty the page cache (needs root); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        return False
    return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def written_bytes() -> int:
    """Bytes this process passed to write calls so far (``wchar`` in /proc/self/io)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


# -------------------------------------------------------------------------------- timing


@dataclass
class Peer:
    """One contender in a comparison: what to time, and what to do untimed around each run."""

    name: str
    run: Callable[[], object]
    before: Callable[[], object] = lambda: None
    after: Callable[[], object] = lambda: None
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def compare(peers: Sequence[Peer], runs: int, warmup: int = 1) -> None:
    """Time every peer ``runs`` times, interleaved, alternating the order each round.

    Interleaving spreads slow moments of the machine (other tenants, memory the hypervisor
    has to fault in) over every peer instead of one.
    """
    for round_ in range(warmup + runs):
        order = list(peers) if round_ % 2 == 0 else list(reversed(peers))
        for peer in order:
            peer.before()
            start = time.perf_counter()
            peer.run()
            elapsed = time.perf_counter() - start
            peer.after()
            if round_ >= warmup:
                peer.samples.append(elapsed)
