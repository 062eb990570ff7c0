"""How a :class:`~torchkeep.CheckpointInfo` reads: what ``print(info)``, notebooks and
``torchkeep inspect`` show, from one description. Needs no torch."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text

from torchkeep.formats.safetensors_header import CHECKSUMS_KEY
from torchkeep.weights.render import (
    Block,
    Cell,
    Columns,
    Heading,
    Line,
    Pairs,
    human_bytes,
    human_count,
    number,
    plural,
    shape_text,
)
from torchkeep.weights.state_tree import build_tree, tree_node

if TYPE_CHECKING:
    from torchkeep.tools.stats import TensorStats
    from torchkeep.weights.info import CheckpointInfo
    from torchkeep.weights.summary import TrainingSummary

_MAX_METADATA = 100


def checkpoint_blocks(
    info: CheckpointInfo,
    *,
    tensors: bool = False,
    stats: Sequence[TensorStats] | None = None,
    depth: int | None = None,
    all: bool = False,
) -> list[Block]:
    """The description of ``info``.

    Args:
        info: what was inspected.
        tensors: list every tensor (name, shape, dtype, bytes).
        stats: per-tensor statistics to list with them (``inspect --stats``).
        depth: how deep the module tree is drawn (``None``: all of it).
        all: show torchkeep's own records in the file too (``inspect --all``).
    """
    blocks: list[Block] = [Line(Text(info.path, style="bold")), Pairs(_summary_rows(info))]
    others = _group_entries({k: v for k, v in info.entries.items() if k != info.entry})
    if others:
        blocks.append(Heading("Other tensor dicts"))
        blocks.append(
            Pairs(
                [
                    (
                        pattern or "(root)",
                        plural(count, "tensor")
                        if dicts == 1
                        else f"{dicts} dicts, {plural(count, 'tensor')}",
                    )
                    for pattern, (dicts, count) in others.items()
                ]
            )
        )
    if info.training:
        blocks.append(Heading("Training state"))
        blocks.append(Pairs(_training_rows(info.training)))
    elif info.extras:
        blocks.append(Heading("Other values"))
        blocks.append(Pairs(list(info.extras.items())))
    if all and info.bookkeeping:
        blocks.append(Heading("torchkeep records"))
        blocks.append(Pairs(list(info.bookkeeping.items())))
    if info.tensors:
        main_dtype = max(info.dtypes.items(), key=lambda item: item[1])[0]
        classes = {module.name: module.type for module in info.modules}
        root = build_tree(info.tensors, info.entry or Path(info.path).name, classes)
        blocks.append(Heading("Modules"))
        blocks.append(tree_node(root, main_dtype, depth))
    if tensors or stats is not None:
        blocks += _tensor_blocks(info, stats)
    return blocks


def checkpoint_summary(info: CheckpointInfo) -> str:
    """One line: path, format, entry, tensor and parameter counts."""
    where = f" (entry {info.entry!r})" if info.entry else ""
    return (
        f"{info.path} [{info.format}]{where}: {plural(len(info.tensors), 'tensor')}, "
        f"{human_count(info.num_params)} parameters, {human_bytes(info.nbytes)}"
    )


def _summary_rows(info: CheckpointInfo) -> list[tuple[str, Cell]]:
    rows: list[tuple[str, Cell]] = [
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
    if info.modules:
        rows.append(("pickled model", info.modules[0].type))
    if info.stubbed:
        rows.append(
            (
                "classes",
                ", ".join(info.stubbed) + " (read as inert stand-ins: none of their code is run)",
            )
        )
    return rows


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


def _joined(values: dict[str, str]) -> str:
    return "  ".join(f"{k}={v}" for k, v in values.items())


def _training_rows(training: TrainingSummary) -> list[tuple[str, Cell]]:
    rows: list[tuple[str, Cell]] = list(training.values.items())
    if training.metrics:
        rows.append(("metrics", _joined(training.metrics)))
    for key, settings in training.settings.items():
        rows.append((key, _joined(settings)))
    for opt in training.optimizers:
        groups = "1 group" if opt.groups == 1 else f"{opt.groups} groups"
        head = Text(opt.type, style="bold")
        head.append(f" at {opt.where}: {groups}, {opt.params} params ({opt.with_state} with state)")
        rows.append(("optimizer", head))
        rows.append(("", _joined(opt.hyperparameters)))
    for sched in training.schedulers:
        head = Text(sched.type, style="bold")
        head.append(f" at {sched.where}")
        rows.append(("scheduler", head))
        rows.append(("", _joined(sched.settings)))
    return rows


def _tensor_blocks(info: CheckpointInfo, values: Sequence[TensorStats] | None) -> list[Block]:
    header = ["name", "shape", "dtype", "bytes"]
    if values is not None:
        header += ["min", "max", "mean", "std", "nan", "inf", "zeros"]
    by_name = {s.name: s for s in values or []}
    rows: list[list[Cell]] = []
    styles: list[str | None] = []
    for t in info.tensors:
        row: list[Cell] = [t.name, shape_text(t.shape), t.dtype, f"{t.nbytes:,}"]
        stats = by_name.get(t.name)
        if stats is not None:
            row += [number(stats.min), number(stats.max), number(stats.mean), number(stats.std)]
            row += [str(stats.nan), str(stats.inf), str(stats.zeros)]
        rows.append(row)
        styles.append("red" if stats is not None and (stats.nan or stats.inf) else None)
    blocks: list[Block] = [
        Heading("Tensors"),
        Columns(rows, header=header, right=frozenset(range(3, len(header))), styles=styles),
    ]
    if values is not None:
        with_nan = sum(1 for s in values if s.nan)
        with_inf = sum(1 for s in values if s.inf)
        line = f"{with_nan} tensors hold NaN, {with_inf} hold Inf"
        blocks.append(Line(Text(line, style="red bold" if with_nan or with_inf else "green")))
    return blocks
