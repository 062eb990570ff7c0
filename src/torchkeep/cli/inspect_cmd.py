"""``torchkeep inspect``: what a checkpoint holds, read from its header where possible."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

import torchkeep as tk
from torchkeep.cli._app import debug_option, entry_option, json_option, trust_options
from torchkeep.cli._output import console, emit_json, progress_bar
from torchkeep.weights.info import CheckpointInfo, header_info
from torchkeep.weights.info_render import checkpoint_blocks
from torchkeep.weights.render import renderable
from torchkeep.weights.state_tree import build_tree, tree_json

if TYPE_CHECKING:
    from torchkeep.tools.stats import TensorStats

EPILOG = """\b
Examples:
  torchkeep inspect model.safetensors
  torchkeep inspect checkpoint.pt --tensors
  torchkeep inspect checkpoint.pt --all
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
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Also show torchkeep's own records (format version, creation time, RNG states).",
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
    show_all: bool,
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
    values = _stats(path, info, trust, allow_globals) if stats else None
    if as_json:
        emit_json(_as_dict(info, values, show_tensors or stats, show_all))
        return
    blocks = checkpoint_blocks(info, tensors=show_tensors, stats=values, depth=depth, all=show_all)
    console().print(renderable(blocks))


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
    values: list[TensorStats] | None,
    with_tensors: bool,
    show_all: bool,
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
        "training": asdict(info.training) if info.training else None,
        "tree": tree_json(build_tree(info.tensors, "", {m.name: m.type for m in info.modules})),
        "classes_not_imported": list(info.stubbed),
    }
    if show_all:
        data["bookkeeping"] = info.bookkeeping
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
