"""Peak memory of loading a model: torch's recipes against torchkeep's, same files, same run.

Each way of loading runs in a fresh subprocess, which reports how far its peak resident set
(``VmHWM``, the same as ``resource.getrusage(...).ru_maxrss`` for a child of a small
process) grew above where it stood after the imports:

- ``torch``: ``model = Net()``; ``model.load_state_dict(torch.load(path))`` (the tutorials);
- ``torch-mmap-assign``: ``Net()`` built on the meta device, ``torch.load(mmap=True)``,
  ``load_state_dict(assign=True)`` (torch's own low-memory recipe);
- ``torchkeep``: ``tk.load(Net(), path)`` (read straight into the parameters);
- ``torchkeep-assign``: ``Net()`` on the meta device, ``tk.load(model, path, assign=True)``.

Usage: ``python benchmarks/rss.py [--mb 400]``; prints a table (MB and multiples of the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("torch", "torch-mmap-assign", "torchkeep", "torchkeep-assign")
_WIDTH = 2048  # one Linear(2048, 2048) layer is 16 MiB of float32


def build(layers: int) -> object:
    from torch import nn

    return nn.Sequential(*(nn.Linear(_WIDTH, _WIDTH) for _ in range(layers)))


def _peak_mb() -> float:
    """This process's peak resident set, in MiB.

    ``ru_maxrss`` (KiB on Linux) carries the parent's high-water mark across fork and exec,
    so a child started by a large process (pytest after importing torch) would read its
    parent's peak; Linux's per-process ``VmHWM`` starts afresh at exec and is preferred.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, folder: str, layers: int) -> dict[str, float]:
    """Load the model one way; return the peak growth in MB."""
    import torch

    import torchkeep as tk

    torch.set_num_threads(1)
    base = _peak_mb()
    started = time.perf_counter()
    if method == "torch":
        model = build(layers)
        model.load_state_dict(torch.load(Path(folder) / "model.pt", weights_only=True))  # type: ignore[attr-defined]
    elif method == "torch-mmap-assign":
        with torch.device("meta"):
            model = build(layers)
        state = torch.load(Path(folder) / "model.pt", weights_only=True, mmap=True)
        model.load_state_dict(state, assign=True)  # type: ignore[attr-defined]
    elif method == "torchkeep":
        model = build(layers)
        tk.load(model, Path(folder) / "model.safetensors")  # type: ignore[arg-type]
    elif method == "torchkeep-assign":
        with torch.device("meta"):
            model = build(layers)
        tk.load(model, Path(folder) / "model.safetensors", assign=True)  # type: ignore[arg-type]
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - started
    total = sum(float(p.sum()) for p in model.parameters())  # type: ignore[attr-defined,misc]
    return {"growth_mb": _peak_mb() - base, "seconds": seconds, "checksum": total}


def prepare(folder: str, layers: int) -> None:
    """Write the model as ``model.pt`` (torch.save) and ``model.safetensors`` (torchkeep)."""
    import torch

    import torchkeep as tk

    torch.manual_seed(0)
    model = build(layers)
    torch.save(model.state_dict(), Path(folder) / "model.pt")  # type: ignore[attr-defined]
    tk.save(model, Path(folder) / "model.safetensors")  # type: ignore[arg-type]


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, __file__, *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def measure(layers: int, methods: tuple[str, ...] = METHODS) -> dict[str, dict[str, float]]:
    """Write the model once, then load it every way; ``{method: {growth_mb, seconds}}``.

    This process never imports torch: a child's ``ru_maxrss`` starts from its parent's
    resident size at fork (Linux carries the high-water mark across fork and exec), so a
    large parent would hide the children's peaks.
    """
    with tempfile.TemporaryDirectory(prefix="torchkeep-rss-") as folder:
        _run("--prepare", folder, "--layers", str(layers))
        results: dict[str, dict[str, float]] = {}
        checksums = set()
        for method in methods:
            reply = json.loads(_run("--child", method, folder, "--layers", str(layers)))
            results[method] = {"growth_mb": reply["growth_mb"], "seconds": reply["seconds"]}
            checksums.add(round(reply["checksum"], 2))
        if len(checksums) != 1:
            raise AssertionError(f"the methods loaded different weights: {checksums}")
    return results


def weights_mb(layers: int) -> float:
    return layers * (_WIDTH * _WIDTH + _WIDTH) * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=400, help="approximate model size")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"))
    parser.add_argument("--prepare", metavar="FOLDER")
    args = parser.parse_args()
    layers = args.layers or max(1, round(args.mb / weights_mb(1)))
    if args.prepare:
        prepare(args.prepare, layers)
        return
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], layers)))
        return
    results = measure(layers)
    size = weights_mb(layers)
    print(f"model: {layers} x Linear({_WIDTH}, {_WIDTH}), {size:.0f} MB of float32 weights")
    print(f"{'method':<20} {'peak RSS growth':>16} {'x weights':>10} {'load time':>10}")
    for method, result in results.items():
        grown = result["growth_mb"]
        line = f"{method:<20} {grown:>13.0f} MB {grown / size:>10.2f} {result['seconds']:>9.2f}s"
        print(line)


if __name__ == "__main__":
    main()
