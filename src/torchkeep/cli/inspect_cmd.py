"""``torchkeep inspect``: what a checkpoint holds, read from its header where possible."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.text import Text

import torchkeep as tk
from torchkeep.cli._app import debug_option, entry_option, json_option, trust_options
from torchkeep.cli._module_tree import build_tree, render_tree, tree_json
from torchkeep.cli._output import (
    console,
    emit_json,
    heading,
    human_bytes,
    human_count,
    number,
    print_columns,
    print_pairs,
    progress_bar,
    shape_text,
)
from torchkeep.formats.safetensors_header import CHECKSUMS_KEY
from torchkeep.weights.info import CheckpointInfo, header_info

if TYPE_CHECKING:
    from torchkeep.cli._training import TrainingSummary
    from torchkeep.tools.stats import TensorStats

EPILOG = """\b
Examples:
  torchkeep inspect model.safetensors
  torchkeep inspect checkpoint.pt --tensors
  torchkeep inspect checkpoint.pt --entry optimizer_state_dict.state.0
  torchkeep inspect model.pt --stats
  torchkeep inspect model.pt --json | jq .num_params

\b
Exit codes:
  0  described
  2  error: no such file, unknown format, damaged file, refused pickle, bad option
"""
_MAX_METADATA = 100


@click.command("inspect", epilog=EPILOG)
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--tensors", "show_tensors", is_flag=True, help="List every tensor: name, shape, dtype, bytes."
)
@click.option(
    "--stats",
    is_flag=True,
    help="Add min/max/mean/std, NaN/Inf and zero counts per tensor (reads all data).",
)
@click.option(
    "--depth",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Show the module tree N levels deep (default: all; repeats folded).",
)
@entry_option
@trust_options
@json_option
@debug_option
def command(
    path: Path,
    show_tensors: bool,
    stats: bool,
    depth: int | None,
    entry: str | None,
    trust: bool,
    allow_globals: tuple[str, ...],
    as_json: bool,
) -> None:
    """Show what a checkpoint holds: format, size, tensors, parameters, dtypes, metadata,
    the module tree and, for training checkpoints, optimizer, scheduler, epoch and loss.

    Only headers are read where the format allows (safetensors, sharded folders): a
    multi-gigabyte file is described in well under a second. --stats reads every tensor.
    """
    # A safetensors header is described without importing torch; anything else needs it.
    info = header_info(path, entry) or tk.inspect(
        path, entry=entry, trust=trust, allow_globals=allow_globals
    )
    training = _training(path, info, trust, allow_globals)
    values = _stats(path, info, trust, allow_globals) if stats else None
    if as_json:
        emit_json(_as_dict(info, training, values, show_tensors or stats))
        return
    out = console()
    _print_summary(out, info)
    if training:
        _print_training(out, training)
    main_dtype = max(info.dtypes.items(), key=lambda item: item[1])[0] if info.tensors else ""
    if info.tensors:
        heading(out, "Modules")
        classes = {module.name: module.type for module in info.modules}
        root = build_tree(info.tensors, info.entry or Path(info.path).name, classes)
        out.print(render_tree(root, main_dtype, depth))
    if show_tensors or stats:
        _print_tensors(out, info, values)


def _training(
    path: Path, info: CheckpointInfo, trust: bool, allow_globals: tuple[str, ...]
) -> TrainingSummary | None:
    if not info.extras:
        return None
    from torchkeep.cli._training import summarize
    from torchkeep.formats._base import OpenOptions
    from torchkeep.formats.registry import open_source

    # CheckpointInfo keeps extras as short text; the optimizer's param_groups need the values.
    options = OpenOptions(device="meta", trust=trust, allow_globals=allow_globals)
    with open_source(path, options) as source:
        return summarize(source.extras)


def _stats(
    path: Path, info: CheckpointInfo, trust: bool, allow_globals: tuple[str, ...]
) -> list[TensorStats]:
    from torchkeep.formats._base import OpenOptions
    from torchkeep.formats.registry import open_source
    from torchkeep.tools.stats import tensor_stats

    options = OpenOptions(trust=trust, allow_globals=allow_globals, mmap=True)
    found: list[TensorStats] = []
    done = 0
    with open_source(path, options) as source, progress_bar("statistics") as update:
        for tensor in info.tensors:
            found.append(tensor_stats(tensor.name, source.get(info.entry, tensor.name)))
            done += tensor.nbytes
            update(done, info.nbytes)
    return found


def _as_dict(
    info: CheckpointInfo,
    training: TrainingSummary | None,
    values: list[TensorStats] | None,
    with_tensors: bool,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "path": info.path,
        "format": info.format,
        "size": info.size,
        "entry": info.entry,
        "entries": info.entries,
        "tensor_count": len(info.tensors),
        "num_params": info.num_params,
        "nbytes": info.nbytes,
        "dtypes": info.dtypes,
        "metadata": info.metadata,
        "extras": info.extras,
        "training": asdict(training) if training else None,
        "tree": tree_json(build_tree(info.tensors, "", {m.name: m.type for m in info.modules})),
        "classes_not_imported": list(info.stubbed),
    }
    if with_tensors:
        by_name = {s.name: s for s in values or []}
        rows = []
        for t in info.tensors:
            row: dict[str, Any] = {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "nbytes": t.nbytes,
            }
            if t.name in by_name:
                stats = asdict(by_name[t.name])
                del stats["name"]
                row.update(stats)
            rows.append(row)
        data["tensors"] = rows
    return data


def _print_summary(out: Console, info: CheckpointInfo) -> None:
    out.print(Text(info.path, style="bold"))
    rows: list[tuple[str, str | Text]] = [
        ("format", info.format),
        ("size", f"{human_bytes(info.size)} ({info.size:,} bytes)"),
    ]
    if info.entry:
        rows.append(("entry", info.entry))
    rows.append(("tensors", f"{len(info.tensors):,}"))
    rows.append(("parameters", f"{human_count(info.num_params)} ({info.num_params:,})"))
    rows.append(("data", f"{human_bytes(info.nbytes)} ({info.nbytes:,} bytes)"))
    dtypes = sorted(info.dtypes.items(), key=lambda item: -item[1])
    rows.append(("dtypes", " · ".join(f"{name} ({count})" for name, count in dtypes) or "-"))
    for i, (key, value) in enumerate(info.metadata.items()):
        rows.append(("metadata" if i == 0 else "", f"{key}={_metadata_text(key, value)}"))
    if info.stubbed:
        rows.append(("pickled model", f"{info.modules[0].type if info.modules else '?'}"))
        rows.append(("not imported", ", ".join(info.stubbed)))
    print_pairs(out, rows)
    others = _group_entries({k: v for k, v in info.entries.items() if k != info.entry})
    if others:
        heading(out, "Other tensor dicts")
        print_pairs(
            out,
            [
                (
                    pattern or "(root)",
                    f"{tensors} tensors" if dicts == 1 else f"{dicts} dicts, {tensors} tensors",
                )
                for pattern, (dicts, tensors) in others.items()
            ],
        )


def _metadata_text(key: str, value: str) -> str:
    """Metadata as shown: torchkeep's checksum table as a count, long values cut short."""
    if key == CHECKSUMS_KEY:
        try:
            return f"<{len(json.loads(value))} xxh3 checksums>"
        except (json.JSONDecodeError, TypeError):
            pass
    return value if len(value) <= _MAX_METADATA else value[: _MAX_METADATA - 3] + "..."


def _group_entries(entries: dict[str, int]) -> dict[str, tuple[int, int]]:
    """``optimizer.state.0`` ... ``optimizer.state.5`` -> ``optimizer.state.*``: (6, tensors)."""
    groups: dict[str, tuple[int, int]] = {}
    for name, count in entries.items():
        pattern = re.sub(r"\[\d+\]", "[*]", name)
        pattern = ".".join("*" if part.isdigit() else part for part in pattern.split("."))
        dicts, tensors = groups.get(pattern, (0, 0))
        groups[pattern] = (dicts + 1, tensors + count)
    return groups


def _print_training(out: Console, training: TrainingSummary) -> None:
    heading(out, "Training state")
    rows: list[tuple[str, str | Text]] = list(training.values.items())
    for key, settings in training.settings.items():
        rows.append((key, "  ".join(f"{k}={v}" for k, v in settings.items())))
    for opt in training.optimizers:
        groups = "1 group" if opt.groups == 1 else f"{opt.groups} groups"
        head = Text(opt.type, style="bold")
        head.append(f" at {opt.where}: {groups}, {opt.params} params ({opt.with_state} with state)")
        rows.append(("optimizer", head))
        rows.append(("", "  ".join(f"{k}={v}" for k, v in opt.hyperparameters.items())))
    for sched in training.schedulers:
        head = Text(sched.type, style="bold")
        head.append(f" at {sched.where}")
        rows.append(("scheduler", head))
        rows.append(("", "  ".join(f"{k}={v}" for k, v in sched.settings.items())))
    print_pairs(out, rows)


def _print_tensors(out: Console, info: CheckpointInfo, values: list[TensorStats] | None) -> None:
    header = ["name", "shape", "dtype", "bytes"]
    if values is not None:
        header += ["min", "max", "mean", "std", "nan", "inf", "zeros"]
    by_name = {s.name: s for s in values or []}
    rows: list[list[str | Text]] = []
    styles: list[str | None] = []
    for t in info.tensors:
        row: list[str | Text] = [t.name, shape_text(t.shape), t.dtype, f"{t.nbytes:,}"]
        stats = by_name.get(t.name)
        if stats is not None:
            row += [number(stats.min), number(stats.max), number(stats.mean), number(stats.std)]
            row += [str(stats.nan), str(stats.inf), str(stats.zeros)]
        rows.append(row)
        styles.append("red" if stats is not None and (stats.nan or stats.inf) else None)
    heading(out, "Tensors")
    print_columns(out, rows, header=header, right=frozenset(range(3, len(header))), styles=styles)
    if values is not None:
        with_nan = sum(1 for s in values if s.nan)
        with_inf = sum(1 for s in values if s.inf)
        line = f"{with_nan} tensors hold NaN, {with_inf} hold Inf"
        out.print(Text(line, style="red bold" if with_nan or with_inf else "green"))
