"""``torchkeep diff``: how two checkpoints differ, name by name and value by value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from torchkeep.cli._app import (
    EXIT_FOUND,
    EXIT_OK,
    debug_option,
    entry_option,
    json_option,
    trust_options,
)
from torchkeep.cli._output import console, emit_json, jsonable, progress_bar
from torchkeep.tools.diff import diff
from torchkeep.weights.render import renderable

EPILOG = """\b
Examples:
  torchkeep diff before.pt after.pt
  torchkeep diff model.pt model.safetensors --atol 1e-6
  torchkeep diff ddp_checkpoint.pt plain.pt --ignore-renames
  torchkeep diff a.pt b.pt --json | jq '.tensors[] | select(.status != "identical")'

\b
Exit codes (as diff(1)):
  0  the same: names, shapes, dtypes and values (within --atol/--rtol), reported as
     "identical" when every byte matches, "same" when only tolerances or --ignore-* let it
     pass
  1  different
  2  error
"""


@click.command("diff", epilog=EPILOG)
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Absolute tolerance: values within atol + rtol*|b| count as equal.",
)
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Relative tolerance (to |b|).",
)
@click.option(
    "--ignore-renames",
    is_flag=True,
    help="Tensors found under another name (module. prefix, ...) do not count as a difference.",
)
@click.option(
    "--ignore-dtypes",
    is_flag=True,
    help="dtype changes do not count as a difference (values are still compared).",
)
@click.option("--all", "show_all", is_flag=True, help="List identical tensors too.")
@entry_option
@trust_options
@json_option
@debug_option
@click.pass_context
def command(
    ctx: click.Context,
    a: Path,
    b: Path,
    atol: float,
    rtol: float,
    ignore_renames: bool,
    ignore_dtypes: bool,
    show_all: bool,
    entry: str | None,
    trust: bool,
    allow_globals: tuple[str, ...],
    as_json: bool,
) -> None:
    """Compare the weights in A and B (any formats): added, removed and renamed tensors,
    shape and dtype changes, and per tensor the largest absolute difference, the relative
    L2 difference and the cosine similarity.

    Renamed means the names agree once wrapper prefixes (module., _orig_mod., model.) are
    removed, or the same bytes appear under another name.
    """
    with progress_bar("comparing") as update:
        report = diff(
            a,
            b,
            entry=entry,
            atol=atol,
            rtol=rtol,
            trust=trust,
            allow_globals=allow_globals,
            progress=update,
        )
    same = report.same(ignore_renames=ignore_renames, ignore_dtypes=ignore_dtypes)
    if as_json:
        data: dict[str, Any] = jsonable(report)
        data["same"] = same
        emit_json(data)
    else:
        blocks = report.view(
            show_all=show_all, ignore_renames=ignore_renames, ignore_dtypes=ignore_dtypes
        )
        console().print(renderable(blocks))
    ctx.exit(EXIT_OK if same else EXIT_FOUND)
