"""Peak memory of one save, load or convert, measured in a fresh process.

Run by bench.py as ``python memory_probe.py OPERATION MEGABYTES FOLDER``; prints one JSON line:
the resident set before the operation, the peak during it, the bytes of tensors the operation
returns (``load_state_dict``: they are the state, not overhead), and the largest tensor, all in
bytes. The peak is read from ``VmHWM`` after resetting it through ``/proc/self/clear_refs``
(so that building the model cannot hide the operation's own peak), else from ``ru_maxrss``.

Save and load operations first build the model (the state in memory); converts work on files
alone, so they build it on the meta device, for the size of its largest tensor only. The
inputs are written by bench.py (:data:`INPUTS`); whatever an operation writes is removed
after the measurement.

bench.py imports :data:`ROWS`, :data:`WHOLE_RECORD` and :func:`prepare` from here.
"""

from __future__ import annotations

import importlib
import json
import resource
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from workload import Transformer, make_model, shape_for

import torchkeep as tk
from torchkeep.cli import main as cli_main

# Files and folders bench.py writes before the probes run, by role.
INPUTS = {
    "safetensors": "model.safetensors",
    "torch": "model.pt",
    "st": "model-st.safetensors",
    "sharded": "mem-input-shards",
    "checkpoint": "mem-input-checkpoint",
    "run": "mem-input-run",
}
# Shards of the sharded inputs and outputs: several files, each holding several tensors.
SHARD_SIZE = "64MB"

# Every row of the memory table: the torchkeep operation and its peers' operations by column.
ROWS: tuple[tuple[str, dict[str, str]], ...] = (
    (
        "save .safetensors",
        {"torch": "torch.save", "safetensors": "safetensors save_file"},
    ),
    ("save .pt", {"torch": "torch.save"}),
    ("save sharded folder", {"safetensors": "safetensors save_file"}),
    ("save_checkpoint folder", {"torch": "torch.save checkpoint dict"}),
    ("manager.save (blocking)", {}),
    (
        "load .safetensors into model",
        {"torch": "torch.load + load_state_dict", "safetensors": "load_file + load_state_dict"},
    ),
    ("load .pt into model", {"torch": "torch.load + load_state_dict"}),
    ("load sharded folder into model", {}),
    (
        "load_state_dict .safetensors",
        {"torch": "torch.load (state dict)", "safetensors": "load_file (state dict)"},
    ),
    ("load_state_dict .pt", {"torch": "torch.load (state dict)"}),
    ("load_checkpoint(folder, model=)", {"torch": "torch.load checkpoint dict"}),
    ("manager.restore(model=)", {}),
    ("convert .pt -> .safetensors", {"safetensors": "torch.load + safetensors save_file"}),
    ("convert .safetensors -> .pt", {"torch": "load_file + torch.save"}),
    ("convert .pt -> .safetensors bf16", {}),
    ("convert sharded -> .safetensors", {}),
    ("convert .safetensors -> sharded", {}),
    ("convert .pt -> sharded", {}),
    ("torchkeep convert .pt .safetensors (CLI)", {}),
)
# Rows whose output is a torch zip written from a file: torch's zip writer takes each record
# in one call, so one whole tensor is held there (the other outputs are copied by chunks).
WHOLE_RECORD = frozenset({"convert .safetensors -> .pt"})
# What those rows may hold over the largest tensor: the pickle, the plans.
WHOLE_RECORD_SLACK_MB = 2.0


def prepare(model: nn.Module, folder: Path) -> None:
    """Write the inputs bench.py does not write itself (the folders of :data:`INPUTS`)."""
    tk.save(model, folder / INPUTS["sharded"], max_shard_size=SHARD_SIZE, durable=False)
    tk.save_checkpoint(folder / INPUTS["checkpoint"], model=model, rng=False)
    with tk.CheckpointManager(folder / INPUTS["run"]) as manager:
        manager.save(1, model=model, rng=False)


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


def _returned_bytes(value: Any) -> int:
    """Bytes of the distinct storages of the tensors in ``value`` (a state dict), each page
    read once first: a state mapped from its file is resident only once it is read."""
    if not isinstance(value, Mapping):
        return 0
    seen: dict[int, int] = {}
    for tensor in value.values():
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.numel():
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            torch.tensor([], dtype=torch.uint8).set_(storage)[::4096].sum()
    return sum(seen.values())


def _cli(*args: str) -> None:
    try:
        cli_main(args=list(args), prog_name="torchkeep")
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"torchkeep {' '.join(args)} exited with {exc.code}") from exc


def operations(model: nn.Module, folder: Path) -> dict[str, Callable[[], object]]:
    """Every measured operation by name; outputs are named ``mem-out*``."""
    state = model.state_dict()
    inputs = {role: folder / name for role, name in INPUTS.items()}
    out = folder / "mem-out"
    st_out, pt_out = out.with_suffix(".safetensors"), out.with_suffix(".pt")

    def manager_save() -> object:
        with tk.CheckpointManager(folder / "mem-out-run") as manager:
            return manager.save(1, model=model, rng=False)

    def manager_restore() -> object:
        with tk.CheckpointManager(inputs["run"]) as manager:
            return manager.restore(model=model, rng=False)

    return {
        # saves
        "save .safetensors": lambda: tk.save(model, st_out, durable=False),
        "save .pt": lambda: tk.save(model, pt_out, durable=False),
        "save sharded folder": lambda: tk.save(
            model, out, max_shard_size=SHARD_SIZE, durable=False
        ),
        "save_checkpoint folder": lambda: tk.save_checkpoint(out, model=model, rng=False),
        "manager.save (blocking)": manager_save,
        "torch.save": lambda: torch.save(state, pt_out),
        "torch.save checkpoint dict": lambda: torch.save({"model": state, "step": 1}, pt_out),
        "safetensors save_file": lambda: save_file(state, st_out),
        # loads into the model
        "load .safetensors into model": lambda: tk.load(model, inputs["safetensors"]),
        "load .pt into model": lambda: tk.load(model, inputs["torch"]),
        "load sharded folder into model": lambda: tk.load(model, inputs["sharded"]),
        "load_checkpoint(folder, model=)": lambda: tk.load_checkpoint(
            inputs["checkpoint"], model=model, rng=False
        ),
        "manager.restore(model=)": manager_restore,
        "torch.load + load_state_dict": lambda: model.load_state_dict(
            torch.load(inputs["torch"], weights_only=True, map_location="cpu")
        ),
        "load_file + load_state_dict": lambda: model.load_state_dict(load_file(inputs["st"])),
        "torch.load checkpoint dict": lambda: model.load_state_dict(
            torch.load(inputs["torch"], weights_only=True, map_location="cpu")
        ),
        # loads that return the state
        "load_state_dict .safetensors": lambda: tk.load_state_dict(inputs["safetensors"]),
        "load_state_dict .pt": lambda: tk.load_state_dict(inputs["torch"]),
        "torch.load (state dict)": lambda: torch.load(
            inputs["torch"], weights_only=True, map_location="cpu"
        ),
        "load_file (state dict)": lambda: load_file(inputs["st"]),
        # converts
        "convert .pt -> .safetensors": lambda: tk.convert(inputs["torch"], st_out, durable=False),
        "convert .safetensors -> .pt": lambda: tk.convert(
            inputs["safetensors"], pt_out, durable=False
        ),
        "convert .pt -> .safetensors bf16": lambda: tk.convert(
            inputs["torch"], st_out, dtype="bfloat16", durable=False
        ),
        "convert sharded -> .safetensors": lambda: tk.convert(
            inputs["sharded"], st_out, durable=False
        ),
        "convert .safetensors -> sharded": lambda: tk.convert(
            inputs["safetensors"], out, max_shard_size=SHARD_SIZE, durable=False
        ),
        "convert .pt -> sharded": lambda: tk.convert(
            inputs["torch"], out, max_shard_size=SHARD_SIZE, durable=False
        ),
        "torchkeep convert .pt .safetensors (CLI)": lambda: _cli(
            "convert", str(inputs["torch"]), str(st_out)
        ),
        "torch.load + safetensors save_file": lambda: save_file(
            torch.load(inputs["torch"], weights_only=True, map_location="cpu"), st_out
        ),
        "load_file + torch.save": lambda: torch.save(load_file(inputs["st"]), pt_out),
    }


def _works_on_files(operation: str) -> bool:
    return "convert" in operation or operation in (
        "torch.load + safetensors save_file",
        "load_file + torch.save",
    )


def _returns_state(operation: str) -> bool:
    return operation.startswith("load_state_dict") or operation.endswith("(state dict)")


def _warm() -> None:
    """Import what the operations use, so that the measurement is of the operation alone."""
    verbs = ("save", "load", "load_state_dict", "convert", "save_checkpoint", "load_checkpoint")
    for name in (*verbs, "CheckpointManager"):
        getattr(tk, name)
    importlib.import_module("torchkeep.cli.convert_cmd")
    importlib.import_module("torchkeep.formats.registry")


def _largest(model: nn.Module) -> int:
    return max(int(t.numel() * t.element_size()) for t in model.state_dict().values())


def _clean(folder: Path) -> None:
    for path in folder.glob("mem-out*"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def main() -> None:
    operation, megabytes, folder = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(2)
    if _works_on_files(operation):
        with torch.device("meta"):
            model: nn.Module = Transformer(*shape_for(megabytes))
    else:
        model = make_model(megabytes, seed=1)
    largest = _largest(model)
    work = operations(model, folder)[operation]
    _warm()
    before = _status("VmRSS")
    reset = _reset_peak()
    result = work()
    returned = _returned_bytes(result) if _returns_state(operation) else 0
    peak_kernel = _status("VmHWM") if reset else 0
    peak_rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del result
    _clean(folder)
    print(
        json.dumps(
            {
                "before": before,
                "peak": peak_kernel or peak_rusage,
                "ru_maxrss": peak_rusage,
                "reset": reset,
                "returned": returned,
                "largest": largest,
            }
        )
    )


if __name__ == "__main__":
    main()
