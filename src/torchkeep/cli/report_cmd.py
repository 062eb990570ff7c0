"""``torchkeep report``: one self-contained HTML page about a checkpoint, or about two."""

from __future__ import annotations

from pathlib import Path

import click
from rich.text import Text

from torchkeep.cli._app import debug_option, entry_option, trust_options
from torchkeep.cli._output import console, human_bytes, progress_bar
from torchkeep.tools.report import report

EPILOG = """\b
Examples:
  torchkeep report model.safetensors -o model.html
  torchkeep report base.safetensors finetuned.pt -o changes.html
  torchkeep report checkpoint.pt -o report.html --entry model_state_dict --top 12

\b
The page: module tree with sizes, parameters and bytes by module and by dtype, statistics
of every tensor (the 200 largest listed), histograms of the largest tensors, and every
tensor holding NaN or Inf. With B: those describe B, NaN/Inf are looked for in both, and
the relative change ||b-a||/||a|| of each layer and the added, removed, renamed and
reshaped tensors are shown. Styles and charts (SVG) are inline; the page fetches nothing.
The charts need matplotlib: pip install torchkeep[report].

\b
Exit codes:
  0  the page was written
  2  error: no such file, refused pickle, matplotlib not installed
"""


@click.command("report", epilog=EPILOG)
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path), required=False)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The HTML file to write (replaced if it exists).",
)
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=6,
    show_default=True,
    help="How many of the largest tensors get a histogram.",
)
@entry_option
@trust_options
@debug_option
def command(
    a: Path,
    b: Path | None,
    output: Path,
    top: int,
    entry: str | None,
    trust: bool,
    allow_globals: tuple[str, ...],
) -> None:
    """Write one self-contained HTML page about checkpoint A, or about how B differs from A:
    module tree, sizes by module and dtype, tensor statistics and histograms, NaN and Inf
    findings, and with B the relative change of each layer.
    """
    with progress_bar("reading") as update:
        written = report(
            a,
            b,
            out=output,
            entry=entry,
            trust=trust,
            allow_globals=allow_globals,
            top=top,
            progress=update,
        )
    line = Text("wrote ", style="")
    line.append(str(written), style="bold")
    line.append(f" ({human_bytes(written.stat().st_size)})")
    console().print(line)
