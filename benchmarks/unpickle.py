"""torchkeep's checking reader against torch.load(weights_only=True), same files, same run.

Usage::

    python benchmarks/unpickle.py              # default sizes, 7 runs per figure
    python benchmarks/unpickle.py --runs 3 --mb 64

Each row reads one file both ways (torchkeep's ``safe_torch_load`` — the reader under
``load_state_dict``, ``inspect`` and ``load`` for torch files — and ``torch.load(...,
weights_only=True)``), alternating the order each round; figures are medians of ``--runs``
timed runs after one warm-up, and ``ratio`` is torch's median divided by torchkeep's (above 1:
torchkeep is faster). Files sit in the page cache: this measures parsing, checks and copies, not
the disk. Plain pickles compare with ``pickle.loads``, which checks nothing.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchkeep.safety.unpickle import safe_pickle_load, safe_torch_load


def _many_small(count: int) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.weight": torch.randn(16) for i in range(count)}


def _few_large(mb: int) -> dict[str, torch.Tensor]:
    per = max(1, mb // 8)
    return {f"block{i}.weight": torch.randn(per * 262_144) for i in range(8)}


def _training(count: int) -> dict[str, Any]:
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(count)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    return {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "history": collections.OrderedDict((f"step{i}", float(i)) for i in range(1000)),
    }


def _pair(ours: Callable[[], Any], theirs: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Medians of both, one warm-up each, the order alternating every round."""
    ours()
    theirs()
    times: dict[int, list[float]] = {0: [], 1: []}
    for round_ in range(runs):
        order = (0, 1) if round_ % 2 == 0 else (1, 0)
        for side in order:
            start = time.perf_counter()
            (ours if side == 0 else theirs)()
            times[side].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--mb", type=int, default=256, help="size of the large-tensor file")
    parser.add_argument("--count", type=int, default=5000, help="tensors in the small-tensor file")
    args = parser.parse_args()

    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases: list[tuple[str, Any, bool, bool]] = [
            (f"zip, {args.count} small tensors", _many_small(args.count), True, False),
            (f"legacy, {args.count} small tensors", _many_small(args.count), False, False),
            (f"zip, {args.mb} MB in 8 tensors", _few_large(args.mb), True, False),
            (f"zip, {args.mb} MB in 8 tensors, mmap", _few_large(args.mb), True, True),
            ("zip, checkpoint dict (AdamW, 200 layers)", _training(200), True, False),
        ]
        for label, value, zipped, mmap in cases:
            path = folder / "case.pt"
            torch.save(value, path, _use_new_zipfile_serialization=zipped)
            name = str(path)

            def ours_read(name: str = name, mmap: bool = mmap) -> Any:
                return safe_torch_load(name, map_location="cpu", mmap=mmap)

            def torch_read(name: str = name, mmap: bool = mmap) -> Any:
                return torch.load(name, map_location="cpu", weights_only=True, mmap=mmap or None)

            ours, theirs = _pair(ours_read, torch_read, args.runs)
            rows.append((label, ours, theirs, "torch.load(weights_only=True)"))
            del value
        plain = pickle.dumps(
            {"config": {f"k{i}": [i, float(i), str(i)] for i in range(20_000)}}, protocol=4
        )
        ours, theirs = _pair(
            lambda: safe_pickle_load(plain, path="plain.pkl"),
            lambda: pickle.loads(plain),
            args.runs,
        )
        rows.append(("plain pickle, 20k-entry config", ours, theirs, "pickle.loads (unchecked)"))

    print(f"{'file':44} {'torchkeep':>10} {'peer':>10} {'ratio':>6}  peer")
    for label, ours, theirs, peer in rows:
        print(f"{label:44} {ours * 1e3:8.1f}ms {theirs * 1e3:8.1f}ms {theirs / ours:6.2f}  {peer}")


if __name__ == "__main__":
    main()
