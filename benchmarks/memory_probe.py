"""Peak memory of one save or load, measured in a fresh process.

Run by bench.py as ``python memory_probe.py OPERATION MEGABYTES FOLDER``; prints one JSON line:
the resident set before the operation (the model's state), the peak during it, and the largest
tensor, all in bytes. The peak is read from ``ru_maxrss`` (and from ``VmHWM`` after resetting
it through ``/proc/self/clear_refs``, where the kernel allows, so that building the model
cannot hide the operation's own peak).
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from workload import make_model

import torchkeep as tk


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")
    except OSError:
        return False
    return True


def main() -> None:
    operation, megabytes, folder = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(2)
    model = make_model(megabytes, seed=1)
    state = model.state_dict()
    largest = max(t.numel() * t.element_size() for t in state.values())
    operations: dict[str, Callable[[], object]] = {
        "torchkeep save": lambda: tk.save(model, folder / "mem.safetensors", durable=False),
        "torch save": lambda: torch.save(state, folder / "mem.pt"),
        "safetensors save": lambda: save_file(state, folder / "mem-st.safetensors"),
        "torchkeep load": lambda: tk.load(model, folder / "model.safetensors"),
        "torch load": lambda: model.load_state_dict(
            torch.load(folder / "model.pt", weights_only=True, map_location="cpu")
        ),
        "safetensors load": lambda: model.load_state_dict(
            load_file(folder / "model-st.safetensors")
        ),
    }
    before = _status("VmRSS")
    reset = _reset_peak()
    operations[operation]()
    peak_kernel = _status("VmHWM") if reset else 0
    peak_rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "before": before,
                "peak": peak_kernel or peak_rusage,
                "ru_maxrss": peak_rusage,
                "reset": reset,
                "largest": largest,
            }
        )
    )


if __name__ == "__main__":
    main()
