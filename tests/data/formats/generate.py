"""Write the format-stability golden files: what torchkeep writes today, to be read forever.

    python tests/data/formats/generate.py tests/data/formats/torchkeep-<version>

Every file in the output folder is written by torchkeep's own writers (``save``,
``save_model``, ``save_checkpoint``, ``CheckpointManager``, its distributed save) from small
objects built from fixed seeds (``format_models.py``). Beside them, ``manifest.json`` records
what each file must give back, computed here from the objects in memory, never by reading
the files: every tensor's dtype, shape and SHA-256 of its bytes, every non-tensor value
described exactly (:func:`format_models.describe`), optimizer and scheduler states, RNG
states, metrics, and the SHA-256 of every file, so a golden file that was changed is noticed.
``tests/test_format_stability.py`` reads every folder here that holds a ``manifest.json``
with the current code and compares.

Regenerating is only for a NEW format version: write a new folder named after the torchkeep
version that introduced it, commit it beside the old ones and keep the old ones, which are
the point (files written by earlier versions must stay readable). This script refuses to
write into an existing folder. Nothing in the tests runs it.

The files are small (a few hundred kB in all). Checkpoints hold a creation time and an id,
so two runs never give identical bytes; that does not matter, since a folder is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import platform
import random
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import format_models as fm  # noqa: E402

import torchkeep as tk  # noqa: E402

# ------------------------------------------------------------------- what reading gives back

# A checkpoint gives back each value as the documented type of its layout; these two
# functions write that contract down, so that the expected values come from the objects in
# memory and never from reading the files.


def native_reads(value: Any) -> Any:
    """``value`` as a native checkpoint folder gives it back.

    A dataclass comes back as the dict of its fields (its class is never built from a file),
    a bytearray as bytes, and a numpy scalar that is also a Python number or string (numpy's
    float64) as that plain value; everything else keeps its type.
    """
    if isinstance(value, np.generic):
        for plain in (bool, int, float, str):
            if isinstance(value, plain):
                return plain(value)
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: native_reads(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, argparse.Namespace):
        return argparse.Namespace(**{k: native_reads(v) for k, v in vars(value).items()})
    if isinstance(value, bytearray):
        return bytes(value)
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(native_reads(v) for v in value)
    if isinstance(value, dict):
        return type(value)((native_reads(k), native_reads(v)) for k, v in value.items())
    return value


def torch_reads(value: Any) -> Any:
    """``value`` as a ``.pt`` checkpoint gives it back (what ``torch.load`` can hold).

    Namespaces come back as Namespaces; dataclasses as dicts of their fields; numpy arrays
    as tensors in native byte order, numpy scalars as Python numbers; paths as strings;
    frozensets as sets.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value.astype(value.dtype.newbyteorder("="))))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: torch_reads(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, argparse.Namespace):
        return argparse.Namespace(**{k: torch_reads(v) for k, v in vars(value).items()})
    if type(value) in (list, tuple):
        return type(value)(torch_reads(v) for v in value)
    if type(value) in (set, frozenset):
        return {torch_reads(v) for v in value}
    if isinstance(value, dict):
        return type(value)((torch_reads(k), torch_reads(v)) for k, v in value.items())
    return value


# ---------------------------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_table(folder: Path) -> dict[str, Any]:
    return {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def seed_global_rngs() -> dict[str, Any]:
    """Seed Python's, numpy's and torch's global RNGs; describe the states a save captures."""
    random.seed(fm.PYTHON_RNG_SEED)
    np.random.seed(fm.NUMPY_RNG_SEED)
    torch.manual_seed(fm.TORCH_RNG_SEED)
    return {
        "python": fm.python_rng_state(random.getstate()),
        "numpy": fm.numpy_rng_state(np.random.get_state(legacy=True)),
        "torch": fm.sha256(fm.tensor_bytes(torch.get_rng_state())),
    }


def module_versions(model: torch.nn.Module) -> dict[str, Any]:
    """torch's per-submodule ``_metadata`` (``{"bn": {"version": 2}}``) of the state dict."""
    meta = getattr(model.state_dict(), "_metadata", {})
    return {prefix: dict(entry) for prefix, entry in meta.items()}


# -------------------------------------------------------------------------------- weights


def write_weights(out: Path) -> dict[str, Any]:
    model = fm.tied_net()
    state = model.state_dict()
    tied = [["emb.weight", "head.weight"]]
    metadata = {"purpose": "format stability", "note": "ünïcode ✓"}
    entries: dict[str, Any] = {}

    tk.save(model, out / "weights.safetensors", metadata=metadata)
    entries["weights.safetensors"] = {
        "format": "safetensors",
        "written_by": "torchkeep.save(TiedNet, 'weights.safetensors', metadata=...)",
        "model": "tied_net",
        "tensors": fm.describe_tensors(state),
        "tied": tied,
        "metadata": metadata,
    }

    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, generator=g)
    dtypes: dict[str, torch.Tensor] = {
        "f64": base.double(),
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "f8_e4m3fn": base.to(torch.float8_e4m3fn),
        "f8_e5m2": base.to(torch.float8_e5m2),
        "c64": torch.complex(base, -base),
        "i64": torch.arange(-5, 5, dtype=torch.int64),
        "i32": torch.arange(-5, 5, dtype=torch.int32),
        "i16": torch.arange(-5, 5, dtype=torch.int16),
        "i8": torch.arange(-5, 5, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "u16": torch.arange(65530, 65536, dtype=torch.int64).to(torch.uint16),
        "u32": torch.tensor([0, 2**32 - 1], dtype=torch.int64).to(torch.uint32),
        "u64": torch.tensor([0, 2**63 - 1], dtype=torch.int64).to(torch.uint64),
        "bool": base > 0,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "transposed": base.t(),
        "alias_of_f32": base,
    }
    tk.save(dtypes, out / "dtypes.safetensors")
    entries["dtypes.safetensors"] = {
        "format": "safetensors",
        "written_by": "torchkeep.save(dict of every dtype, 'dtypes.safetensors')",
        "tensors": fm.describe_tensors(dtypes),
        "tied": [["f32", "alias_of_f32"]],
        "metadata": {},
    }

    big = fm.tied_net(seed=fm.MODEL_SEED + 1)
    tk.save(big, out / "sharded", max_shard_size=400)
    entries["sharded"] = {
        "format": "sharded",
        "written_by": "torchkeep.save(TiedNet, 'sharded', max_shard_size=400)",
        "model": "tied_net",
        "tensors": fm.describe_tensors(big.state_dict()),
        "tied": tied,
        "metadata": {},
    }

    tk.save(model, out / "weights.pt")
    entries["weights.pt"] = {
        "format": "torch-zip",
        "written_by": "torchkeep.save(TiedNet, 'weights.pt')",
        "model": "tied_net",
        "tensors": fm.describe_tensors(state),
        "tied": tied,
    }
    tk.save(model, out / "weights_legacy.pt", format="torch-legacy")
    entries["weights_legacy.pt"] = {
        "format": "torch-legacy",
        "written_by": "torchkeep.save(TiedNet, 'weights_legacy.pt', format='torch-legacy')",
        "model": "tied_net",
        "tensors": fm.describe_tensors(state),
        "tied": tied,
    }

    tk.save_model(model, out / "model.safetensors", init=fm.TIED_INIT, metadata=metadata)
    entries["model.safetensors"] = {
        "format": "safetensors",
        "written_by": "torchkeep.save_model(TiedNet, 'model.safetensors', init=...)",
        "model": "tied_net",
        "tensors": fm.describe_tensors(state),
        "tied": tied,
        "metadata": metadata,
        "class": "format_models:TiedNet",
        "init": fm.describe(fm.TIED_INIT),
    }
    return entries


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_state(layout: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state saved into a checkpoint, and what reading it gives back, described."""
    native = layout == "native"
    run = fm.training()
    fm.train(run, 3)
    tensors = fm.special_tensors(jagged=native)
    values = fm.plain_values(bytearrays=native)
    # The same tensor twice (stored once) and a tensor shared with the model's weights.
    values["alias_a"] = values["alias_b"] = torch.arange(4.0)
    values["first_layer"] = run.model.fc1.weight
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state: dict[str, Any] = {
        "model": run.model,
        "optimizer": run.optimizer,
        "scheduler": run.scheduler,
        "generator": fm.generator(),
        "numpy_generator": fm.numpy_generator(),
        "counter": fm.counter(),
        "scaler": scaler,
        "epoch": 3,
        "config": fm.config(),
        "args": fm.args(),
        "extra": values,
        "tensors": tensors,
        "ema": OrderedDict((k, v.clone()) for k, v in run.model.state_dict().items()),
    }
    reads = native_reads if native else torch_reads
    captured = {
        "model": ("module", run.model.state_dict()),
        "optimizer": ("optimizer", run.optimizer.state_dict()),
        "scheduler": ("scheduler", run.scheduler.state_dict()),
        "generator": ("generator", state["generator"].get_state()),
        "numpy_generator": ("numpy_generator", state["numpy_generator"].bit_generator.state),
        "counter": ("stateful", state["counter"].state_dict()),
        "scaler": ("stateful", scaler.state_dict()),
    }
    entries = {}
    for name, value in state.items():
        kind, saved = captured.get(name, ("value", value))
        entries[name] = {"kind": kind, "value": fm.describe(reads(saved))}
    return state, {"entries": entries, "module_metadata": module_versions(run.model)}


METRICS = {"val_loss": 0.25, "accuracy": 0.875}
METADATA = {"run": "golden", "tags": ["a", "b"], "seed": 5}


def write_checkpoints(out: Path) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for name, layout in (("checkpoint", "native"), ("checkpoint.pt", "torch")):
        state, expected = checkpoint_state(layout)
        rng = seed_global_rngs()
        tk.save_checkpoint(
            out / name,
            metrics=METRICS,
            metadata=METADATA,
            max_shard_size="2KB",
            **state,
        )
        entries[name] = {
            "layout": layout,
            "written_by": f"torchkeep.save_checkpoint({name!r}, ..., rng=True)",
            **expected,
            "rng": rng,
            "metrics": fm.describe(METRICS),
            "metadata": fm.describe(METADATA),
        }
    return entries


# ------------------------------------------------------------------------------ managers


def write_runs(out: Path) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    run = fm.training()
    losses = {100: 0.5, 200: 0.2, 300: 0.4}
    steps: dict[str, Any] = {}
    with tk.CheckpointManager(out / "run", keep_last=1, keep_best=1, monitor="val_loss") as mgr:
        for index, (step, loss) in enumerate(losses.items()):
            fm.train(run, 1, seed=fm.TRAIN_SEED + index)
            mgr.save(
                step,
                model=run.model,
                optimizer=run.optimizer,
                step=step,
                metrics={"val_loss": loss},
                rng=False,
            )
            steps[str(step)] = {
                "metrics": fm.describe({"val_loss": loss}),
                "entries": {
                    "model": {"kind": "module", "value": fm.describe(run.model.state_dict())},
                    "optimizer": {
                        "kind": "optimizer",
                        "value": fm.describe(native_reads(run.optimizer.state_dict())),
                    },
                    "step": {"kind": "value", "value": fm.describe(step)},
                },
            }
    kept = [200, 300]
    runs["run"] = {
        "written_by": "CheckpointManager('run', keep_last=1, keep_best=1, monitor='val_loss')",
        "distributed": False,
        "monitor": "val_loss",
        "mode": "min",
        "steps": kept,
        "best": 200,
        "checkpoints": {str(s): steps[str(s)] for s in kept},
    }

    run = fm.training()
    fm.train(run, 2)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optimizer_state = get_optimizer_state_dict(run.model, run.optimizer)
    rng = seed_global_rngs()
    with tk.CheckpointManager(out / "run_dcp", distributed=True) as mgr:
        mgr.save(
            5,
            model=run.model,
            optimizer=run.optimizer,
            epoch=2,
            args=fm.args(),
            metrics={"val_loss": 0.3},
        )
    runs["run_dcp"] = {
        "written_by": "CheckpointManager('run_dcp', distributed=True), one process",
        "distributed": True,
        "monitor": None,
        "mode": "min",
        "steps": [5],
        "best": None,
        "rng": rng,
        "checkpoints": {
            "5": {
                "metrics": fm.describe({"val_loss": 0.3}),
                "entries": {
                    "model": {"kind": "module", "value": fm.describe(run.model.state_dict())},
                    "optimizer": {"kind": "optimizer", "value": fm.describe(optimizer_state)},
                    "epoch": {"kind": "value", "value": fm.describe(2)},
                    "args": {"kind": "value", "value": fm.describe(fm.args())},
                },
            }
        },
    }
    return runs


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a NEW folder: tests/data/formats/torchkeep-X.Y.Z")
    options = parser.parse_args(argv)
    out: Path = options.out
    if out.exists():
        parser.error(f"{out} exists: golden folders are written once and never replaced")
    torch.set_num_threads(1)
    steps: list[tuple[str, Callable[[Path], dict[str, Any]]]] = [
        ("weights", write_weights),
        ("checkpoints", write_checkpoints),
        ("runs", write_runs),
    ]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as temp:
        folder = Path(temp)
        manifest: dict[str, Any] = {
            "generated_by": {
                "torchkeep": tk.__version__,
                "torch": str(torch.__version__),
                "numpy": np.__version__,
                "safetensors": safetensors.__version__,
                "python": platform.python_version(),
                "byteorder": sys.byteorder,
            },
        }
        for key, write in steps:
            manifest[key] = write(folder)
        manifest["files"] = file_table(folder)
        text = json.dumps(manifest, indent=1, ensure_ascii=False, allow_nan=False)
        (folder / "manifest.json").write_text(text + "\n", encoding="utf-8")
        folder.rename(out)
    print(f"wrote {out} ({sum(f['bytes'] for f in manifest['files'].values())} bytes)")


if __name__ == "__main__":
    main()
