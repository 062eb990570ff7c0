"""``torchkeep convert``: rewrite weights in another format, dtype or naming, streaming."""

from __future__ import annotations

from pathlib import Path

import click
from rich.text import Text

from torchkeep._common import parse_size
from torchkeep.cli._app import debug_option, json_option, trust_options
from torchkeep.cli._output import console, emit_json, human_bytes, progress_bar
from torchkeep.tools.convert import convert, parse_rename

EPILOG = """\b
Examples:
  torchkeep convert model.pt model.safetensors
  torchkeep convert checkpoint.pt weights.safetensors --extract model_state_dict
  torchkeep convert ddp.pth model.safetensors --strip-prefix module.
  torchkeep convert model.safetensors model-bf16.safetensors --dtype bfloat16
  torchkeep convert big.safetensors big-sharded/ --shard-size 2GB
  torchkeep convert model.safetensors old.pt --format torch-legacy
  torchkeep convert model.pt out.safetensors --rename '^encoder\\.=backbone.'

\b
The output format comes from --format, --shard-size (a folder of safetensors shards plus
model.safetensors.index.json) or OUT's suffix (.safetensors; .pt/.pth/.bin: torch zip).
safetensors and sharded outputs are written one tensor at a time: memory stays near the
largest tensor. torch outputs are written by torch.save, which holds every tensor at once.
The result appears atomically: OUT is replaced only once it is complete.

\b
Exit codes:
  0  written
  2  error (nothing written)
"""

_FORMATS = ("safetensors", "torch", "torch-legacy", "sharded")
_DTYPES = ("bfloat16", "float16", "float32", "float64")


def _check_size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            parse_size(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
    return value


def _check_rules(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> list[tuple[str, str]]:
    try:
        return [parse_rename(rule) for rule in value]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("convert", epilog=EPILOG)
@click.argument("source", metavar="IN", type=click.Path(path_type=Path))
@click.argument("dest", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(_FORMATS),
    default=None,
    help="Output format (default: from --shard-size or OUT's suffix).",
)
@click.option(
    "--dtype",
    type=click.Choice(_DTYPES, case_sensitive=False),
    default=None,
    help="Cast floating point tensors (integer and bool tensors are kept).",
)
@click.option(
    "--extract",
    "entry",
    default=None,
    metavar="ENTRY",
    help="Tensor dict to take from a checkpoint dict (e.g. model_state_dict); "
    "default: the weights torchkeep finds.",
)
@click.option(
    "--strip-prefix",
    multiple=True,
    metavar="PREFIX",
    help="Remove PREFIX from names that start with it (repeatable).",
)
@click.option(
    "--rename",
    "rules",
    multiple=True,
    metavar="REGEX=REPL",
    callback=_check_rules,
    help="Rename with re.sub(REGEX, REPL, name), after --strip-prefix; split at the "
    "last '=' (repeatable, applied in order).",
)
@click.option(
    "--shard-size",
    default=None,
    metavar="SIZE",
    callback=_check_size,
    help="Write a sharded folder whose shards stay under SIZE (e.g. 2GB, 500MB).",
)
@trust_options
@json_option
@debug_option
def command(
    source: Path,
    dest: Path,
    fmt: str | None,
    dtype: str | None,
    entry: str | None,
    strip_prefix: tuple[str, ...],
    rules: list[tuple[str, str]],
    shard_size: str | None,
    trust: bool,
    allow_globals: tuple[str, ...],
    as_json: bool,
) -> None:
    """Convert the weights in IN (any supported format, including training checkpoints and
    pickles) to OUT: torch zip, legacy torch, safetensors or a sharded folder."""
    with progress_bar("converting") as update:
        result = convert(
            source,
            dest,
            format=fmt,
            dtype=dtype.lower() if dtype else None,
            entry=entry,
            strip_prefix=strip_prefix,
            rename=rules,
            max_shard_size=shard_size,
            trust=trust,
            allow_globals=allow_globals,
            progress=update,
        )
    if as_json:
        emit_json(result)
        return
    line = Text("wrote ", style="green")
    line.append(f"{result.path} [{result.format}]", style="bold")
    shards = f" in {result.files} shards" if result.files > 1 else ""
    line.append(f": {result.tensors} tensors, {human_bytes(result.nbytes)}{shards}")
    out = console()
    out.print(line)
    picked = f" (entry {result.entry!r})" if result.entry else ""
    out.print(Text(f"from {result.source} [{result.source_format}]{picked}"))
    if result.renamed:
        old, new = result.renamed[0]
        more = f" and {len(result.renamed) - 1} more" if len(result.renamed) > 1 else ""
        out.print(Text(f"renamed {len(result.renamed)}: {old} -> {new}{more}"))
    if result.cast:
        out.print(Text(f"cast {len(result.cast)} tensors to {dtype}"))
