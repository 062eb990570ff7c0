"""How long the command line takes to answer, against the time to import torch.

Each command runs as a new process (as a user runs it), several times; the medians are
compared with the median of ``python -c "import torch"`` in the same run. The goal for the
commands that need no torch is at most 0.3 of that. ``scan`` runs every pickle on the
loaders' own machine, which needs torch, so it is listed for comparison without a goal.

    python benchmarks/cli_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.3


def _fixtures(folder: Path) -> dict[str, Path]:
    import torch

    import torchkeep as tk

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    files = {"safetensors": folder / "model.safetensors", "pt": folder / "model.pt"}
    tk.save(model, files["safetensors"])
    torch.save(model.state_dict(), files["pt"])
    manager = tk.CheckpointManager(folder / "run")
    for step in (1, 2, 3):
        manager.save(step, model=model, metrics={"loss": 1 / step})
    files["run"] = folder / "run"
    return files


def _time(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env={**os.environ})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="processes per figure (median)")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "torchkeep"]
    with tempfile.TemporaryDirectory() as scratch:
        files = _fixtures(Path(scratch))
        torch_time = _time([sys.executable, "-c", "import torch"], args.runs)
        rows = [
            ("torchkeep --help", [*cli, "--help"], True),
            ("torchkeep inspect x.safetensors", [*cli, "inspect", str(files["safetensors"])], True),
            ("torchkeep verify x.safetensors", [*cli, "verify", str(files["safetensors"])], True),
            ("torchkeep ls run/", [*cli, "ls", str(files["run"])], True),
            ("torchkeep scan x.pt", [*cli, "scan", str(files["pt"])], False),
        ]
        print(f"python -c 'import torch': {torch_time:.3f} s (median of {args.runs})")
        print(f"{'command':34} {'seconds':>8} {'ratio':>6}  goal")
        for label, command, has_goal in rows:
            seconds = _time(command, args.runs)
            ratio = seconds / torch_time
            if has_goal:
                verdict = f"<= {GOAL} {'met' if ratio <= GOAL else 'NOT met'}"
            else:
                verdict = "- (runs pickles on the loaders' machine, which needs torch)"
            print(f"{label:34} {seconds:8.3f} {ratio:6.2f}  {verdict}")


if __name__ == "__main__":
    main()
