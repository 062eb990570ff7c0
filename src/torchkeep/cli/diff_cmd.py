"""``torchkeep diff``: how two checkpoints differ, name by name and value by value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from torchkeep.cli._app import (
    EXIT_FOUND,
    EXIT_OK,
    debug_option,
    entry_option,
    json_option,
    trust_options,
)
from torchkeep.cli._output import (
    console,
    emit_json,
    jsonable,
    number,
    print_columns,
    progress_bar,
    shape_text,
)
from torchkeep.tools.diff import DiffReport, Rename, TensorDiff, diff

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
        _print(console(), report, same, show_all)
    ctx.exit(EXIT_OK if same else EXIT_FOUND)


def _where(path: str, entry: str) -> str:
    return f"{path} (entry {entry!r})" if entry else path


def _prefix_change(rename: Rename) -> str | None:
    """``module.fc.w -> fc.w``: "prefix 'module.' removed"; None for other renames."""
    if rename.reason != "prefix":
        return None
    if rename.name_a.endswith(rename.name_b):
        return f"prefix {rename.name_a[: -len(rename.name_b)]!r} removed"
    if rename.name_b.endswith(rename.name_a):
        return f"prefix {rename.name_b[: -len(rename.name_a)]!r} added"
    return None


def _rows(report: DiffReport, show_all: bool) -> list[tuple[str, str, str, str | None]]:
    rows: list[tuple[str, str, str, str | None]] = []
    for name in report.removed:
        rows.append(("removed", name, "only in A", "red"))
    for name in report.added:
        rows.append(("added", name, "only in B", "green"))
    grouped: dict[str, int] = {}
    for rename in report.renamed:
        change = _prefix_change(rename)
        if change is not None:
            grouped[change] = grouped.get(change, 0) + 1
        else:
            how = "same values" if rename.reason == "values" else "same after prefixes"
            rows.append(("renamed", f"{rename.name_a} -> {rename.name_b}", how, "yellow"))
    for change, count in grouped.items():
        rows.append(("renamed", f"{count} tensors", change, "yellow"))
    for t in report.tensors:
        rows.extend(_tensor_rows(t, show_all))
    return rows


def _tensor_rows(t: TensorDiff, show_all: bool) -> list[tuple[str, str, str, str | None]]:
    rows: list[tuple[str, str, str, str | None]] = []
    if t.status == "shape":
        rows.append(
            ("shape", t.name_b, f"{shape_text(t.shape_a)} -> {shape_text(t.shape_b)}", "red")
        )
    if t.dtype_changed:
        rows.append(("dtype", t.name_b, f"{t.dtype_a} -> {t.dtype_b}", "magenta"))
    if t.status in ("different", "equal"):
        detail = f"max|a-b| {number(t.max_abs)}  rel L2 {number(t.rel_l2)}  cos {number(t.cosine)}"
        if t.status == "different":
            count = f"{t.mismatched:,} element{'s' if t.mismatched != 1 else ''} differ"
            rows.append(("values", t.name_b, f"{detail}  {count}", "red"))
        elif show_all:
            rows.append(("close", t.name_b, f"{detail}  all within tolerance", None))
    elif t.status == "identical" and show_all:
        rows.append(("identical", t.name_b, "", "dim"))
    return rows


def _print(out: Console, report: DiffReport, same: bool, show_all: bool) -> None:
    out.print(Text(f"A: {_where(report.path_a, report.entry_a)}"))
    out.print(Text(f"B: {_where(report.path_b, report.entry_b)}"))
    rows = _rows(report, show_all)
    print_columns(
        out,
        [[Text(kind, style="bold"), name, detail] for kind, name, detail, _ in rows],
        styles=[style for *_, style in rows],
    )
    exact = not report.renamed and all(
        t.status == "identical" and not t.dtype_changed for t in report.tensors
    )
    word = ("identical" if exact else "same") if same else "different"
    verdict = Text(word, style="green bold" if same else "red bold")
    verdict.append(f": {len(report.tensors)} tensors compared; {report.summary()}", style="")
    if report.atol or report.rtol:
        verdict.append(f" (atol {report.atol:g}, rtol {report.rtol:g})")
    out.print(verdict)
